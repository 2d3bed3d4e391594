"""cuBLAS at every row count a decode or mixed step runs its matmuls on (65-1024 rows, llama-1b /
llama-8b weight shapes): F.linear at M rows, and M rows padded to a larger count M' that cuBLAS
serves faster (x copied into the first M rows of an [M', K] buffer, the first M rows of the
product kept: layers/linear_ops.py's PAD_ROWS). Weights read from HBM (copies cycled past the L2),
each call timed inside a CUDA graph of 40 calls (gemv_sweep.py's timer, best of 5 replays).
Writes OUT.json: every timing, and `table`: (M, N, K) -> M' where the padded call, timed as the
engine runs it, took at most WIN of F.linear's time at M (linear_ops.PAD_ROWS's form).

(Session 28 first timed a Triton tile matmul, layers/triton_matmul.py, over 14 launch shapes at
80-512 rows here: slower than cuBLAS on every shape but one; benchmarks/RESULTS.md.)

Usage: python3 benchmarks/decode_gemm_sweep.py OUT.json [--models llama-8b,llama-1b] [--rows 64:1024:32]
(models: llama-1b / 8b / 70b, qwen2.5-7b, or a rank's shards as e.g. llama-70b-tp4)
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from gemv_sweep import shapes_of, time_us
from pagedserve.layers.linear_ops import padded_linear

WIN = 0.93         # a padded call goes into the table where it takes at most this share of F.linear's time
MIN_SAVED_US = 2.0
PEAK_TFLOPS, PEAK_TBS = 790.0, 4.3


def sweep(models: list[str], rows: list[int], device: torch.device) -> dict:
    results, table = [], {}
    for model in models:
        for role, (n, k) in shapes_of(model).items():
            nbytes = n * k * 2
            copies = max(3, -(-600 * 2**20 // nbytes))
            weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            xs = {m: torch.randn(m, k, device=device, dtype=torch.bfloat16) for m in rows}
            plain = {m: time_us(lambda w, x=xs[m]: F.linear(x, w), weights) for m in rows}
            for m in rows:
                # the cheapest larger count by F.linear alone, then timed as the engine would run it
                target = min((r for r in rows if r > m), key=lambda r: plain[r], default=None)
                pad_us = None
                if target is not None and plain[target] < WIN * plain[m]:
                    ref = F.linear(xs[m], weights[0])
                    err = (padded_linear(xs[m], weights[0], target).float() - ref.float()).abs().max().item()
                    pad_us = time_us(lambda w, x=xs[m], t=target: padded_linear(x, w, t), weights)
                    if pad_us <= WIN * plain[m] and plain[m] - pad_us >= MIN_SAVED_US and err < 0.05:
                        table[f"{m}x{n}x{k}"] = target
                floor = max(2 * m * n * k / PEAK_TFLOPS / 1e6, nbytes / PEAK_TBS / 1e6)
                results.append(dict(model=model, role=role, m=m, n=n, k=k, cublas_us=round(plain[m], 2),
                                    floor_us=round(floor, 2), pad_to=target, pad_us=pad_us and round(pad_us, 2),
                                    tflops=round(2 * m * n * k / plain[m] / 1e6, 1)))
                mark = f"  pad -> {target}: {pad_us:6.1f}" if pad_us is not None else ""
                print(f"{model.removeprefix('llama-')}.{role:7s} M={m:4d} floor {floor:6.1f} cuBLAS {plain[m]:6.1f}{mark}"
                      f"{'  *' if f'{m}x{n}x{k}' in table else ''}", flush=True)
            del weights, xs
            torch.cuda.empty_cache()
    return dict(results=results, table=table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--models", default="llama-8b,llama-1b")
    ap.add_argument("--rows", default="64:1024:32", help="START:STOP:STEP (inclusive) and/or a comma list")
    args = ap.parse_args()
    rows = set()
    for part in args.rows.split(","):
        if ":" in part:
            a, b, s = (int(v) for v in part.split(":"))
            rows |= set(range(a, b + 1, s))
        else:
            rows.add(int(part))
    t0 = time.perf_counter()
    out = sweep(args.models.split(","), sorted(rows), torch.device("cuda"))
    out.update(machine=f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
               date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), wall_s=round(time.perf_counter() - t0, 1))
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"table ({len(out['table'])} entries): {json.dumps(out['table'])}\nsweep {out['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
