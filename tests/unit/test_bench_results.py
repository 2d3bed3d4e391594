"""The dashboard's benchmark figures (server/bench_results.py): what is read from the one
results directory (bench JSON, peer JSON lines, the latest run of repeated peer figures),
and what is not (links, other suffixes, deeper folders, oversized or unparsable files)."""
from __future__ import annotations

import json
from pathlib import Path

from pagedserve.server import bench_results
from pagedserve.server.bench_results import read_results


def test_figures_from_bench_json_and_peer_lines(tmp_path: Path, monkeypatch):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "thr.json").write_text(json.dumps({
        "benchmark": "throughput", "date": "2026-11-24T01:01:26+00:00",
        "machine": {"cpu_model": "AMD EPYC", "nproc": 2}, "args": {"model": None},
        "results": [{"label": "pagedserve continuous", "output_tokens_per_s": 54.5,
                     "kv_memory": {"peak_blocks_in_use": 103}},
                    {"label": "transformers", "output_tokens_per_s": 41.0, "kv_memory": None}]}))
    (tmp_path / "gpu").mkdir()
    line = {"engine": "hf", "model": "llama-1b", "workload": "thr512", "out_tok_s": 1000.0}
    (tmp_path / "gpu" / "2026-11-24-h100-peers.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "gpu" / "2026-11-24-h100-peers-run2.jsonl").write_text(
        json.dumps({**line, "out_tok_s": 1082.3}) + "\n\n" + json.dumps({"no": "engine"}) + "\n")
    # none of these is read
    (tmp_path / "gpu" / "notes.txt").write_text(json.dumps(line))
    (tmp_path / "gpu" / "broken.json").write_text("{")
    (tmp_path / "gpu" / "big.jsonl").write_text(json.dumps(line) + " " * 700)
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.jsonl").write_text(json.dumps(line))
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_text(json.dumps(line))
    (tmp_path / "link.jsonl").symlink_to(outside)
    monkeypatch.setattr(bench_results, "MAX_FILE_BYTES", 600)
    figures = read_results(tmp_path)
    assert [(f["source"], f["engine"], f["machine"], f["model"], f["workload"], f["metric"], f["value"])
            for f in figures] == [
        ("cpu/thr.json", "pagedserve continuous", "AMD EPYC x2 (CPU)", "default (SmolLM2-135M)", "thr",
         "output throughput", 54.5),
        ("cpu/thr.json", "pagedserve continuous", "AMD EPYC x2 (CPU)", "default (SmolLM2-135M)", "thr",
         "peak KV blocks", 103.0),
        ("cpu/thr.json", "transformers", "AMD EPYC x2 (CPU)", "default (SmolLM2-135M)", "thr",
         "output throughput", 41.0),
        ("gpu/2026-11-24-h100-peers-run2.jsonl", "transformers", "nvidia-h100", "llama-1b", "thr512",
         "output throughput", 1082.3),
    ]


def test_a_missing_directory_has_no_figures(tmp_path: Path):
    assert read_results(tmp_path / "nothing") == []
