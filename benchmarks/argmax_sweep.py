"""The greedy argmax launch (triton_ops.argmax_rows) at decode row counts: programs a row (splits)
against the time, to set triton_ops.ARGMAX_PROGRAMS (issue 22).

Until session 31 every row took up to 64 programs of 2,048 columns whatever the row count: a
410-row llama-1b step launched ~26k programs that each read 4 KB and then counted their arrival
with an atomic (session 28's profile: 73 us a step, ~1.4 TB/s). Each launch here follows a copy
into its logits, as the LM head's write leaves them (the copy's own time, timed alone, is
subtracted); both replayed in CUDA graphs (triton.testing.do_bench_cudagraph, its minimum; session
31's figures came from a hand-written loop of the same kind: 20 calls a graph, best of 5 replays);
every launch is checked against torch.argmax first. Prints us a launch for each (vocabulary, rows, splits), the default
rule's pick, and the best.
Usage: python3 benchmarks/argmax_sweep.py OUT.json [--vocab 128256,49152] [--rows 1,...,512]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from triton.testing import do_bench_cudagraph

from pagedserve.layers import triton_ops

SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 63]   # 63: the old rule's at 128,256 columns


def graph_us(fn) -> float:
    return do_bench_cudagraph(fn, return_mode="min") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--vocab", default="128256,49152")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,192,256,320,410,512")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "programs_rule": triton_ops.ARGMAX_PROGRAMS, "us": {}}
    for n in [int(v) for v in args.vocab.split(",")]:
        for rows in [int(r) for r in args.rows.split(",")]:
            src = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
            x = torch.empty_like(src)
            out = torch.empty(rows, dtype=torch.int64, device="cuda")
            x.copy_(src)
            triton_ops.argmax_rows(x, out=out)   # grows the arrival counters outside the graph
            copy = graph_us(lambda: x.copy_(src))
            row = {}
            for s in SPLITS:
                if s > triton_ops.argmax_splits(1, n):   # past what a row alone may take
                    continue
                x.copy_(src)
                assert torch.equal(triton_ops.argmax_rows(x, out=out, splits=s), src.argmax(-1)), (n, rows, s)
                row[s] = round(graph_us(lambda s=s: (x.copy_(src), triton_ops.argmax_rows(x, out=out, splits=s)))
                               - copy, 2)
            rule = triton_ops.argmax_splits(rows, n)
            best = min(row, key=row.get)
            res["us"][f"{n}x{rows}"] = {"copy": round(copy, 2), "splits": row, "rule": rule,
                                        "rule_us": row.get(rule), "best": best}
            print(f"vocab {n} rows {rows}: rule {rule} -> {row.get(rule)} us, best {best} -> {row[best]} us "
                  f"({' '.join(f'{k}:{v}' for k, v in row.items())})", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
