"""Benchmark figures for the dashboard's framework comparison, read from ONE results
directory fixed at start-up (`--dashboard-results-dir`, default the repository's
`benchmarks/` beside the package), never from a path a request names: the JSON files
`pagedserve bench throughput | latency | serve` write, and JSON-lines files of peer runs
(`benchmarks/gpu/*.jsonl`: pagedserve, transformers and the recorded vLLM figures). Only
`*.json` / `*.jsonl` regular files in the directory and its subdirectories (two levels, no
links) of at most 4 MiB are read; a file that does not parse is skipped. Peer runs repeated
in several files (`...-peers.jsonl`, `...-peers-run2.jsonl`, ...) keep the latest run's
figure for each engine, model, workload and metric."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)
MAX_FILE_BYTES = 4 * 2**20
MAX_DEPTH = 2
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

# JSON-lines keys -> (metric, unit)
_LINE_METRICS = {"out_tok_s": ("output throughput", "tok/s"), "total_tok_s": ("total throughput", "tok/s"),
                 "req_s": ("requests", "req/s"), "tok_s": ("decode", "tok/s"), "ms": ("TTFT", "ms"),
                 "startup_s": ("startup", "s"), "peak_mem_gb": ("peak memory", "GB"),
                 "kv_tokens": ("KV cache capacity", "tokens")}


@dataclass(frozen=True)
class BenchFigure:
    source: str      # file, relative to the results directory
    machine: str
    date: str
    engine: str      # "pagedserve continuous", "transformers", "vllm 0.24.0", ...
    model: str
    workload: str
    metric: str      # "output throughput", "TTFT P50", "peak KV blocks", ...
    unit: str
    value: float


def read_results(directory: Path) -> list[dict[str, Any]]:
    """Every figure found under `directory`, as JSON-ready dicts (empty if it does not exist)."""
    figures: list[BenchFigure] = []
    latest_run: dict[tuple[str, ...], tuple[int, BenchFigure]] = {}
    for path in _result_files(directory):
        try:
            text = path.read_text(encoding="utf-8")
            relative = str(path.relative_to(directory))
            if path.suffix == ".jsonl":
                run = int(match.group(1)) if (match := re.search(r"run(\d+)", path.name)) else 1
                for f in _from_lines(relative, text):
                    machine_kind = path.name.split("-")[3] if path.name.count("-") > 3 else ""
                    key = (machine_kind, f.engine, f.model, f.workload, f.metric)
                    if key not in latest_run or latest_run[key][0] <= run:
                        latest_run[key] = (run, f)
            else:
                figures += _from_bench_json(relative, json.loads(text))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.debug("skipping result file %s: %s", path, exc)
    figures += [f for _, f in latest_run.values()]
    return [asdict(f) for f in figures]


def _result_files(directory: Path, depth: int = 0) -> Iterator[Path]:
    if not directory.is_dir() or directory.is_symlink():
        return
    for path in sorted(directory.iterdir()):
        if path.is_symlink():
            continue
        if path.is_dir() and depth < MAX_DEPTH:
            yield from _result_files(path, depth + 1)
        elif path.is_file() and path.suffix in (".json", ".jsonl") and path.stat().st_size <= MAX_FILE_BYTES:
            yield path


def _from_lines(source: str, text: str) -> Iterator[BenchFigure]:
    name = source.rsplit("/", 1)[-1]
    parts = name.split("-")
    # the machine kind from the file name (DATE-KIND-...), so runs of one kind compare
    machine = f"nvidia-{parts[3]}" if len(parts) > 3 else "?"
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "engine" not in row:
            continue
        workload = row.get("workload", "startup" if "startup_s" in row else "")
        for key, (metric, unit) in _LINE_METRICS.items():
            if isinstance(row.get(key), (int, float)):
                engine = "transformers" if row["engine"] == "hf" else str(row["engine"])
                yield BenchFigure(source, machine, str(row.get("date", name[:10])),
                                  engine, str(row.get("model", "")), str(workload), metric, unit,
                                  float(row[key]))


def _from_bench_json(source: str, data: Any) -> Iterator[BenchFigure]:
    if not isinstance(data, dict) or "benchmark" not in data:
        return
    machine = data.get("machine", {})
    machine_name = machine.get("gpu") or f"{machine.get('cpu_model', '?')} x{machine.get('nproc', '?')} (CPU)"
    date = str(data.get("date", ""))[:10]
    model = str(data.get("model") or data.get("args", {}).get("model") or "default (SmolLM2-135M)")
    workload = source.rsplit("/", 1)[-1].rsplit(".", 1)[0]

    def figure(engine: str, metric: str, unit: str, value: Any, work: str = workload) -> Iterator[BenchFigure]:
        if isinstance(value, (int, float)):
            yield BenchFigure(source, machine_name, date, engine, model, work, metric, unit, float(value))

    kind = data["benchmark"]
    if kind == "throughput":
        for result in data.get("results", []):
            engine = str(result.get("label", "pagedserve"))
            yield from figure(engine, "output throughput", "tok/s", result.get("output_tokens_per_s"))
            yield from figure(engine, "total throughput", "tok/s", result.get("total_tokens_per_s"))
            yield from figure(engine, "requests", "req/s", result.get("requests_per_s"))
            kv = result.get("kv_memory") or {}
            yield from figure(engine, "peak KV blocks", "blocks", kv.get("peak_blocks_in_use"))
            yield from figure(engine, "KV slots, paged", "tokens", kv.get("paged_tokens"))
            yield from figure(engine, "KV slots, contiguous at max_model_len", "tokens", kv.get("contiguous_tokens"))
    elif kind == "latency":
        result = data.get("result", {})
        for key, metric in (("prefill_ms", "prefill"), ("decode_ms_per_token", "decode per token"),
                            ("e2e_latency_ms", "end-to-end")):
            stats = result.get(key) or {}
            yield from figure("pagedserve", f"{metric} P50", "ms", stats.get("median"))
            yield from figure("pagedserve", f"{metric} P99", "ms", (stats.get("percentiles") or {}).get("p99"))
        yield from figure("pagedserve", "decode", "tok/s", result.get("decode_tokens_per_s"))
    elif kind == "serve":
        engine = f"pagedserve ({data.get('backend', 'openai')} API)"
        for run in data.get("runs", []):
            work = f"{workload} @ {run.get('request_rate')} req/s"
            metrics = run.get("metrics", {})
            yield from figure(engine, "output throughput", "tok/s", metrics.get("output_throughput"), work)
            yield from figure(engine, "requests", "req/s", metrics.get("request_throughput"), work)
            for key, metric in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2el_ms", "end-to-end")):
                stats = metrics.get(key) or {}
                yield from figure(engine, f"{metric} P50", "ms", stats.get("median"), work)
                yield from figure(engine, f"{metric} P99", "ms", (stats.get("percentiles") or {}).get("p99"), work)
