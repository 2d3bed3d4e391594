"""Every core step of a served run (serve_gpu.py's steps_<engine>_<rate>.json: rows of begin, end,
tokens, running, deliver_s; frontend/step_timing.py), broken down (issue 22): decode-only steps
by batch size and by what came before them (a mixed step, under async scheduling, leaves the
rest of its device time to the next call), the share of decode-only steps in a slow band
(default 14-17 ms: the 25-30% at ~15.5 ms of the 2026-12-01 serve run), and mixed steps by
token count. Prints one `BREAKDOWN {json}` line per file and a readable table.

    python3 benchmarks/steps_breakdown.py FILE [FILE ...] [--band 14,17]
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def breakdown(rows: list[list[float]], band: tuple[float, float]) -> dict:
    steps = [dict(ms=(end - begin) * 1e3, tokens=tokens, running=running, gap_ms=0.0)
             for begin, end, tokens, running, _ in rows]
    for prev, step, row_prev, row in zip(steps, steps[1:], rows, rows[1:]):
        step["gap_ms"] = (row[0] - row_prev[1]) * 1e3
        step["after_mixed"] = prev["tokens"] > prev["running"]
    decode = [s for s in steps if s["tokens"] <= s["running"]]
    mixed = [s for s in steps if s["tokens"] > s["running"]]
    in_band = [s for s in decode if band[0] <= s["ms"] <= band[1]]
    by_size: dict[str, list[float]] = defaultdict(list)
    for s in decode:
        by_size[f"{(s['running'] - 1) // 8 * 8 + 1}-{(s['running'] - 1) // 8 * 8 + 8}"].append(s["ms"])
    by_tokens: dict[str, list[float]] = defaultdict(list)
    for s in mixed:
        by_tokens[f"{(s['tokens'] - 1) // 256 * 256 + 1}-{(s['tokens'] - 1) // 256 * 256 + 256}"].append(s["ms"])
    return dict(
        steps=len(steps), decode_steps=len(decode), mixed_steps=len(mixed),
        decode_p50_ms=p50([s["ms"] for s in decode]), mixed_p50_ms=p50([s["ms"] for s in mixed]),
        band_ms=list(band), decode_in_band=len(in_band),
        decode_in_band_share=round(len(in_band) / len(decode), 3) if decode else None,
        in_band_after_mixed=sum(bool(s.get("after_mixed")) for s in in_band),
        decode_after_mixed_p50_ms=p50([s["ms"] for s in decode if s.get("after_mixed")]),
        decode_not_after_mixed_p50_ms=p50([s["ms"] for s in decode if not s.get("after_mixed")]),
        in_band_running_p50=p50([s["running"] for s in in_band]),
        decode_by_running={k: dict(n=len(v), p50_ms=p50(v)) for k, v in
                           sorted(by_size.items(), key=lambda kv: int(kv[0].rsplit("-", 1)[0]))},
        mixed_by_tokens={k: dict(n=len(v), p50_ms=p50(v)) for k, v in
                         sorted(by_tokens.items(), key=lambda kv: int(kv[0].rsplit("-", 1)[0]))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--band", default="14,17")
    args = ap.parse_args()
    band = tuple(float(x) for x in args.band.split(","))
    for path in args.files:
        with open(path) as f:
            result = breakdown(json.load(f), band)
        print("BREAKDOWN " + json.dumps(dict(file=path, **result)))
        print(f"\n{path}: {result['steps']} steps, decode {result['decode_steps']} (P50 {result['decode_p50_ms']} ms; "
              f"{result['decode_in_band']} in {band[0]}-{band[1]} ms, {result['in_band_after_mixed']} of them right "
              f"after a mixed step), mixed {result['mixed_steps']} (P50 {result['mixed_p50_ms']} ms)")
        print("| decode batch | steps | P50 ms |\n|---|---|---|")
        for k, v in result["decode_by_running"].items():
            print(f"| {k} | {v['n']} | {v['p50_ms']} |")
        print("| mixed tokens | steps | P50 ms |\n|---|---|---|")
        for k, v in result["mixed_by_tokens"].items():
            print(f"| {k} | {v['n']} | {v['p50_ms']} |")


if __name__ == "__main__":
    main()
