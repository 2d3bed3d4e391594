"""The server's grammar compiles run in child processes under a timeout
(frontend/grammar_compile.py): a pathological regex gets a 400 naming its field once its
compile has run that long, its compile is killed; requests without a grammar are never held
up behind it, and a quick grammar waits at most that long for a process, ahead of slower
ones; the offline engine's in-process compile and the isolated one give the same grammar and
the same errors."""
from __future__ import annotations

import os
import threading
import time

import psutil
import pytest
import requests

from pagedserve.errors import ValidationError
from pagedserve.frontend.grammar_compile import isolate
from pagedserve.frontend.structured_output import GrammarCompileCancelled, GrammarCompiler
from pagedserve.sampling_params import StructuredOutputsParams
from tests.server.conftest import serving


def slow_regex(letter: str, alternatives: int = 300) -> str:
    """A ~5 KB regex that xgrammar takes tens of seconds to compile (distinct per letter)."""
    return "(" + "|".join(f"[a-z]{{{i}}}{letter}" for i in range(1, alternatives)) + ")"


def _compile_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children()
            if "pagedserve.frontend.grammar_compile" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def compilers(offline_llm):
    engine = offline_llm.engine
    inline = engine.grammar_compiler   # the offline engine's: in-process
    isolated = GrammarCompiler(inline.tokenizer, inline.vocab_size, inline.eos_token_ids)
    isolate(isolated, timeout_s=60.0, processes=1)
    yield inline, isolated
    isolated.close()


@pytest.mark.parametrize("params, error", [
    (StructuredOutputsParams(grammar="root ::= root"), "the grammar admits no output"),
    (StructuredOutputsParams(regex="[^\\s\\S]"), "the regex admits no output"),
    (StructuredOutputsParams(regex="("), "invalid regex"),
    (StructuredOutputsParams(json={"type": "object", "properties": 3}), "invalid JSON schema"),
])
def test_both_ways_refuse_the_same_grammars(compilers, params, error) -> None:
    for compiler in compilers:
        with pytest.raises(ValidationError) as info:
            compiler.compile(params)
        assert info.value.param == params.kind and error in info.value.message


def test_both_ways_give_the_same_masks(compilers) -> None:
    import xgrammar
    params = StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "integer"}},
                                           "required": ["n"]})
    masks = []
    for compiler in compilers:
        compiled = compiler.compile(params)
        assert compiler.compile(params) is compiled   # cached
        matcher = xgrammar.GrammarMatcher(compiled)
        rows = xgrammar.allocate_token_bitmask(2, compiled.tokenizer_info.vocab_size)
        matcher.fill_next_token_bitmask(rows, 0)
        for token in compiler.tokenizer.encode('{"n"', add_special_tokens=False):
            assert matcher.accept_token(token)
        matcher.fill_next_token_bitmask(rows, 1)
        masks.append(rows)
    assert masks[0].equal(masks[1]) and 0 < int(masks[0].count_nonzero()) < masks[0].numel()


def test_a_compile_past_its_timeout_is_killed_and_the_next_one_runs(compilers, monkeypatch) -> None:
    isolated = compilers[1]
    isolated.compile(StructuredOutputsParams(regex="[a-c]+"))   # a child is running
    before = {p.pid for p in _compile_children()}
    assert len(before) == 1
    start = time.monotonic()
    monkeypatch.setattr(isolated, "timeout_s", 1.0)
    with pytest.raises(ValidationError) as info:
        isolated.compile(StructuredOutputsParams(regex=slow_regex("q")))
    assert time.monotonic() - start < 10.0
    assert info.value.param == "regex" and "did not compile within 1 s" in info.value.message
    assert not any(p.pid in before for p in _compile_children())   # killed
    monkeypatch.setattr(isolated, "timeout_s", 60.0)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(GrammarCompileCancelled):
        isolated.compile(StructuredOutputsParams(regex=slow_regex("r")), cancel=cancel)
    compiled = isolated.compile(StructuredOutputsParams(regex="[0-9]{3}"))   # a fresh child
    assert compiled.tokenizer_info.vocab_size == isolated.vocab_size


# --- through a real server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_deadline_server(tmp_path_factory):
    yield from serving(tmp_path_factory, "grammar_deadline", "--grammar-compile-timeout", "3")


def test_slow_grammars_get_4xx_and_hold_up_no_plain_request_nor_a_quick_grammar(short_deadline_server) -> None:
    """Four slow regexes at once (two compile processes): the plain request answers before any
    of them; a quick grammar sent after them waits for a process (at most twice the timeout),
    goes ahead of the slow ones still waiting, and answers 200; each slow one is a 400 (its
    compile ran 3 s) or, if no process came free for it within 6 s, a 503 with Retry-After."""
    base = short_deadline_server.base_url
    finished: list[tuple[str, float, requests.Response]] = []

    def post(name: str, body: dict) -> None:
        response = requests.post(f"{base}/v1/completions", timeout=120, json={"max_tokens": 2, **body})
        finished.append((name, time.monotonic(), response))

    warm = [threading.Thread(target=post, args=(f"warm-{n}", {"prompt": "hi", "guided_regex": f"[a-z]{{{n}}}"}))
            for n in (1, 2)]   # both compile processes started (a start under load can take seconds)
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join(timeout=120)
    assert [r.status_code for _, _, r in finished] == [200, 200]
    slow = [threading.Thread(target=post, args=(f"slow-{c}", {"prompt": "hi", "guided_regex": slow_regex(c)}))
            for c in "wxyz"]   # four at once: more than the two compile processes
    for thread in slow:
        thread.start()
    time.sleep(0.5)
    quick = threading.Thread(target=post, args=("quick", {"prompt": "Count:", "guided_regex": "[0-9]{2}"}))
    quick.start()
    post("plain", {"prompt": "The capital of France is"})
    plain_done = finished[-1][1]
    for thread in (*slow, quick):
        thread.join(timeout=120)
    by_name = {name: (at, response) for name, at, response in finished}
    assert by_name["plain"][1].status_code == 200
    quick_response = by_name["quick"][1]
    assert quick_response.status_code == 200 and quick_response.json()["choices"][0]["text"].isdigit()
    statuses = []
    for c in "wxyz":
        at, response = by_name[f"slow-{c}"]
        statuses.append(response.status_code)
        assert at > plain_done   # the plain request never waited for them
        if response.status_code == 503:   # no process came free for it in 6 s: an overload, retry later
            assert "Retry-After" in response.headers
            continue
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "guided_regex" and "did not compile within 3 s" in error["message"]
    assert statuses.count(400) >= 2, statuses   # the two that got the processes first
    # the server is still whole: a grammar compiles and constrains
    response = requests.post(f"{base}/v1/completions", timeout=120, json={
        "prompt": "Count:", "max_tokens": 6, "guided_regex": "[0-9]{3}"})
    assert response.status_code == 200 and response.json()["choices"][0]["text"].isdigit()


def test_the_timeout_must_be_positive() -> None:
    from pagedserve.engine_args import EngineArgs
    for value in (0.0, -1.0, float("nan")):
        with pytest.raises(ValidationError) as info:
            EngineArgs(grammar_compile_timeout=value).validate()
        assert info.value.param == "grammar_compile_timeout"


def test_a_child_stopped_before_it_started_leaves_no_payload(compilers) -> None:
    from pagedserve.frontend.grammar_compile import _Child
    child = _Child(compilers[1].tokenizer_info_json())
    path = child.popen.args[-1]
    assert os.path.exists(path)   # the tokenizer's info, 1.6 MB in /dev/shm, until the child reads it
    child.kill()
    assert not os.path.exists(path)
