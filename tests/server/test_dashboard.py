"""The live dashboard (/dashboard) of a real server with an API key, in a real browser:
headless Chromium from the system (Debian's `chromium` package; scripts/setup.sh installs it)
driven by Playwright, while requests of both APIs stream. One server, one browser."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.server.conftest import API_KEY, ServerProcess, scrape_metrics, serving, wait_idle

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NUM_BLOCKS = 64
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# 40+ tokens: two full 16-token blocks shared through the prefix cache
PREFIX = ("You are a careful assistant. Answer in one short sentence, then stop. "
          "Here is the question that every request shares before its own ending: ")


@pytest.fixture(scope="module")
def dash_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    yield from serving(tmp_path_factory, "dash_server", "--api-key", API_KEY, "--num-kv-blocks", str(NUM_BLOCKS),
                       "--max-model-len", "512", "--max-num-seqs", "8")


def test_dashboard_routes_need_the_key(dash_server: ServerProcess):
    base = dash_server.base_url
    page = requests.get(f"{base}/dashboard", timeout=10)
    assert page.status_code == 401 and "API key" in page.text and page.headers["content-type"].startswith("text/html")
    for path in ("/dashboard/events", "/dashboard/results", "/dashboard/static/dashboard.js"):
        response = requests.get(f"{base}{path}", timeout=10)
        assert response.status_code == 401 and response.json()["error"]["type"] == "AuthenticationError", path
    cookie = {"pagedserve_api_key": API_KEY}
    assert requests.get(f"{base}/dashboard", cookies=cookie, timeout=10).status_code == 200
    assert requests.get(f"{base}/dashboard", cookies={"pagedserve_api_key": "wrong"}, timeout=10).status_code == 401
    assert requests.get(f"{base}/dashboard/static/app.py", headers=AUTH, timeout=10).status_code == 404
    assert requests.get(f"{base}/dashboard/static/..%2F..%2Fapp.py", headers=AUTH, timeout=10).status_code == 404
    figures = requests.get(f"{base}/dashboard/results", headers=AUTH, timeout=10).json()["figures"]
    engines = {f["engine"] for f in figures}
    assert {"pagedserve continuous", "pagedserve static", "transformers", "vllm 0.24.0"} <= engines

    def thr512(machine: str) -> dict:
        return {f["engine"]: f["value"] for f in figures if f["machine"] == machine and f["model"] == "llama-1b"
                and f["workload"] == "thr512" and f["metric"] == "output throughput"}

    assert thr512("nvidia-h100") == {"pagedserve": 35161.1, "transformers": 1082.3, "vllm 0.24.0": 31112.0}
    assert thr512("nvidia-h200") == {"pagedserve": 46673.7, "vllm 0.24.0": 24557.6}   # one machine, side by side


def _stream_openai(base: str, prompt: str, n: int, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": 48, "min_tokens": 48, "ignore_eos": True, "n": n, "stream": True,
            "temperature": 0.8, "seed": 1}
    with requests.post(f"{base}/v1/completions", json=body, headers=AUTH, stream=True, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                out.setdefault("ids", set()).add(json.loads(line[6:])["id"])


def _stream_tgi(base: str, prompt: str, out: dict) -> None:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 40}}
    with requests.post(f"{base}/generate_stream", json=body, headers=AUTH, stream=True, timeout=120) as response:
        out["tgi_status"] = response.status_code
        for line in response.iter_lines():
            if b"generated_text" in line and b'"generated_text":null' not in line:
                out["tgi_done"] = out.get("tgi_done", 0) + 1


def _page_counts(page) -> dict:
    return page.evaluate("""() => ({
        used: document.querySelectorAll('#grid rect.block.used').length,
        usedLabel: Number(document.getElementById('used-blocks').textContent),
        shared: [...document.querySelectorAll('#grid rect.block.shared')].map(r => Number(r.dataset.ref)),
        rows: [...document.querySelectorAll('#timeline g.tl-row')].map(g => g.dataset.req),
        finishedRows: document.querySelectorAll('#timeline g.tl-row[data-finished="true"]').length,
        finishMarks: document.querySelectorAll('#timeline .tl-finish').length,
        usedIds: [...document.querySelectorAll('#grid rect.block.used')].map(r => Number(r.dataset.block)),
        // blocks in the block tables of two requests or more that are not samples of one request
        prefixShared: (() => {
            const families = new Map();
            for (const r of (state.snapshot ? state.snapshot.running : []))
                for (const b of r.blocks) families.set(b, (families.get(b) || new Set()).add(r.parent || r.id));
            return [...families.values()].filter(f => f.size > 1).length;
        })(),
    })""")


def _metrics_used_blocks(base: str) -> int:
    samples = scrape_metrics(base)
    usage = next(v for (name, _), v in samples.items() if name == "pagedserve:kv_cache_usage_perc")
    return round(usage * NUM_BLOCKS)


def test_dashboard_in_a_browser_while_both_apis_stream(dash_server: ServerProcess, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright: scripts/setup.sh installs it")
    assert Path(CHROMIUM).exists(), "chromium is missing: scripts/setup.sh installs Debian's package"
    base = dash_server.base_url
    wait_idle(base)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1500})
            context.add_cookies([{"name": "pagedserve_api_key", "value": API_KEY, "url": base}])
            page = context.new_page()
            page.goto(f"{base}/dashboard")
            page.wait_for_selector("#status.live", timeout=10_000)
            assert _page_counts(page)["rows"] == []

            out: dict = {}
            threads = [threading.Thread(target=_stream_openai, args=(base, PREFIX + "What is 2+2?", 1, out)),
                       threading.Thread(target=_stream_openai, args=(base, PREFIX + "Name a colour.", 2, out)),
                       threading.Thread(target=_stream_tgi, args=(base, PREFIX + "Name a fruit.", out))]
            threads[0].start()
            time.sleep(0.5)   # its prompt blocks are cached before the others look them up
            for thread in threads[1:]:
                thread.start()
            # a running request's block table: one arrow per logical block (clicked as soon as one is
            # listed: on a busy CI machine the streams had once ended by the time the checks below were done)
            page.click("#request-list li:not(.waiting)", timeout=30_000)
            page.wait_for_selector("#arrows line.arrow", state="attached", timeout=5_000)

            # while they stream: the grid's used blocks equal /metrics' (both move; wait for a match)
            matched, shared_seen, prefix_shared, held = False, [], 0, set()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (matched and shared_seen and prefix_shared):
                counts = _page_counts(page)
                held |= set(counts["usedIds"])
                prefix_shared = max(prefix_shared, counts["prefixShared"])
                if counts["shared"]:
                    shared_seen = counts["shared"]
                if counts["used"] and counts["used"] == counts["usedLabel"] == _metrics_used_blocks(base) \
                        == _page_counts(page)["used"]:
                    matched = True
                time.sleep(0.05)
            assert matched, "the grid never showed /metrics' count of used blocks"
            assert shared_seen and max(shared_seen) > 1, "no shared block (ref count > 1) was shown"
            assert prefix_shared >= 1, "no block of the common prompt prefix was shared by two requests"
            page.screenshot(path=str(tmp_path / "dashboard-streaming.png"), full_page=True)

            for thread in threads:
                thread.join(120)
            assert out.get("tgi_status") == 200 and out.get("tgi_done") == 1 and len(out["ids"]) == 2
            wait_idle(base)
            # 1 + 2 (n=2: two sequences) + 1 engine requests: a row each, every one marked finished
            page.wait_for_function("document.querySelectorAll('#timeline g.tl-row[data-finished=\"true\"]')"
                                   ".length === 4", timeout=10_000)
            page.wait_for_function("document.getElementById('used-blocks').textContent === '0'", timeout=10_000)
            counts = _page_counts(page)
            assert len(counts["rows"]) == 4 and counts["finishMarks"] == 4
            assert sum(r.startswith("tgi-") for r in counts["rows"]) == 1
            # engine ids: "<response id>-<prompt index>", then "-<sample index>" for the n=2 one
            cmpl_rows = [r for r in counts["rows"] if r.startswith("cmpl-")]
            assert len(cmpl_rows) == 3 and all(any(r.startswith(i + "-0") for i in out["ids"]) for r in cmpl_rows)
            assert sorted(r[-4:] for r in cmpl_rows if r.count("-") == 3) == ["-0-0", "-0-1"]
            assert counts["used"] == 0 and held   # the finished requests' blocks turned free
            states = page.evaluate("ids => ids.map(b => document.querySelector(`#grid rect[data-block='${b}']`)"
                                   ".getAttribute('class'))", sorted(held))
            assert all("used" not in s for s in states)
            assert page.locator("#static-steps").text_content() not in ("", "–")
            assert page.locator("#charts .chart").count() >= 3
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            browser.close()
