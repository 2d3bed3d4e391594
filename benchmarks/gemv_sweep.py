"""Decode-sized matmuls of 2-64 rows (llama-1b / llama-8b weight shapes): cuBLAS (F.linear) against
the Triton gemv's tl.dot launches (rows padded to 16 / 32 / 64; plain, or swapped: y.T = w @ x.T),
weights read from HBM (copies cycled past the L2), each call timed inside a CUDA graph of CALLS
calls (best of 5 replays). The whole launch grid is searched at 16, 32 and 64 rows; 2, 4 and 8 rows
time the 16-row sweep's six best, 48 rows the 64-row sweep's. Every launch is checked against the
fp32 product first. Writes OUT.json: every timing, and `table`, the best launch per (row bucket, N, K)
or None where cuBLAS was faster (triton_gemv.MCONFIGS's form; load it with `load_table`).
(The one-row FMA launches, triton_gemv.CONFIGS, come from benchmarks/decode_gpu.py --stages sweep.)

Usage: python3 benchmarks/gemv_sweep.py OUT.json [--models llama-8b,llama-1b] [--rows 2,4,8,16,32,48,64]
(models: llama-1b / 8b / 70b, qwen2.5-7b, or a rank's shards as e.g. llama-70b-tp4)
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import triton

from decode_common import weight_shapes
from pagedserve.layers.triton_gemv import DEFAULT_CONFIG, WIDE_DEFAULT, GemvConfig, _gemv_kernel, gemv, row_bucket
from pagedserve.layers.triton_ops import _LIBDEVICE

def shapes_of(name: str) -> dict[str, tuple[int, int]]:
    """A model of decode_common.SHAPES (llama-1b / 8b / 70b; qwen2.5-7b: a shape set no table names,
    for the fallbacks), or one rank's shards under tensor parallelism as MODEL-tpN."""
    model, _, tp = name.partition("-tp")
    return weight_shapes(model, int(tp or 1))


CALLS = 40
GRID = sorted({GemvConfig(bn, bk, 4, st) for bn, bk, st in itertools.product([16, 32, 64], [256, 512], [3, 4])}
              | {GemvConfig(32, 512, 8, 4), GemvConfig(16, 1024, 4, 3), DEFAULT_CONFIG}
              | {GemvConfig(bn, bk, 4, st, True) for bn, bk, st in itertools.product([64, 128], [128, 256], [3, 4, 5])},
              key=lambda c: (c.swap, c.block_n, c.block_k, c.num_warps, c.num_stages))
FULL_ROWS = (16, 32, 64)
FROM = {2: 16, 4: 16, 8: 16, 48: 64}   # rows timed over the top launches of another row count


def time_us(fn, weights) -> float:
    """Per-call microseconds of fn(w) cycling over `weights`, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / CALLS)
    del graph
    return best


def precompile(k: int, rows: list[int], device: torch.device) -> None:
    """Compile every launch of GRID for these row paddings on threads (Triton's compile mostly
    releases the GIL), so the sweep's first launches do not compile one after another."""
    w = torch.empty(64, k, device=device, dtype=torch.bfloat16)
    jobs = []
    for m, cfg in itertools.product(rows, GRID):
        x = torch.empty(m, k, device=device, dtype=torch.bfloat16)
        y = torch.empty(m, 64, device=device, dtype=torch.bfloat16)
        jobs.append((x, y, m, cfg))

    def one(job):
        x, y, m, cfg = job
        try:
            _gemv_kernel.warmup(x, w, y, m, 64, k, x.stride(0), w.stride(0), y.stride(0), PROLOGUE=0,
                                BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                EVEN_K=k % cfg.block_k == 0, NUM_STAGES=cfg.num_stages, LIBDEVICE=_LIBDEVICE,
                                SWAP=cfg.swap, num_warps=cfg.num_warps, grid=(1,))
        except Exception as exc:   # noqa: BLE001 - a launch that cannot compile is skipped in the sweep
            return f"{cfg} m={m}: {type(exc).__name__}"
        return None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        failed = [f for f in pool.map(one, jobs) if f]
    print(f"  precompiled {len(jobs)} launches for K={k} in {time.perf_counter() - t0:.1f} s"
          + (f"; {len(failed)} failed, e.g. {failed[0]}" if failed else ""), flush=True)


def sweep(models: list[str], rows: list[int], device: torch.device) -> dict:
    results, table = [], {}
    full = [m for m in rows if m in FULL_ROWS or m not in FROM]
    # one compile serves every shape: K, N and the strides are runtime ints (all multiples of 16),
    # and every K here is a multiple of every block_k (EVEN_K)
    precompile(4096, sorted({max(16, triton.next_power_of_2(m)) for m in rows}), device)
    for model in models:
        for role, (n, k) in shapes_of(model).items():
            nbytes = n * k * 2
            copies = max(3, -(-600 * 2**20 // nbytes))
            weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            tops: dict[int, list[GemvConfig]] = {}
            for m in sorted(rows, key=lambda r: (r not in full, r)):
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                ref = x.float() @ weights[0].float().T
                scale = ref.abs().max().item()
                cublas = time_us(lambda w: torch.nn.functional.linear(x, w), weights)
                candidates = GRID if m in full else sorted(set(tops.get(FROM[m], [])) | {DEFAULT_CONFIG, WIDE_DEFAULT},
                                                           key=GRID.index)
                timed = []
                for cfg in candidates:
                    try:
                        err = (gemv(x, weights[0], cfg).float() - ref).abs().max().item() / scale
                        if not err < 2e-2:
                            print(f"  {model}.{role} M={m} {cfg}: wrong (rel err {err:.1e})", file=sys.stderr)
                            continue
                        timed.append((time_us(lambda w, c=cfg: gemv(x, w, c), weights), cfg, err))
                    except Exception as exc:   # noqa: BLE001 - e.g. out of shared memory for a big tile
                        print(f"  {model}.{role} M={m} {cfg}: {type(exc).__name__}", file=sys.stderr)
                timed.sort(key=lambda item: item[0])
                tops[m] = [c for _, c, _ in timed[:6]]
                best_us, best, err = timed[0] if timed else (float("inf"), None, None)
                default_us = next((t for t, c, _ in timed if c == DEFAULT_CONFIG), None)
                wide_us = next((t for t, c, _ in timed if c == WIDE_DEFAULT), None)
                win = best is not None and best_us < cublas
                key = f"{row_bucket(m)}x{n}x{k}"
                if m == row_bucket(m):
                    table[key] = best.__dict__ if win else None
                row = dict(model=model, role=role, m=m, n=n, k=k, cublas_us=round(cublas, 2),
                           default_us=default_us and round(default_us, 2), wide_us=wide_us and round(wide_us, 2),
                           best_us=round(best_us, 2),
                           best=best and best.__dict__, rel_err=err, gemv_wins=win,
                           cublas_tb_s=round(nbytes / cublas / 1e6, 2), best_tb_s=round(nbytes / best_us / 1e6, 2),
                           top5=[(round(t, 2), c.__dict__) for t, c, _ in timed[:5]])
                results.append(row)
                print(f"{model}.{role:8s} M={m:2d}  cuBLAS {cublas:7.2f} us ({row['cublas_tb_s']} TB/s)  default "
                      f"{default_us or float('nan'):7.2f}  wide {wide_us or float('nan'):7.2f}  best {best_us:7.2f} ({row['best_tb_s']} TB/s) {best}"
                      f"{'' if win else '  -> cuBLAS'}", flush=True)
            del weights
            torch.cuda.empty_cache()
    return dict(results=results, table=table)


def load_table(path: str) -> dict:
    """OUT.json's table as triton_gemv.MCONFIGS entries."""
    table = json.load(open(path))["table"]
    return {tuple(int(v) for v in key.split("x")): (GemvConfig(**cfg) if cfg else None) for key, cfg in table.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--models", default="llama-8b,llama-1b")
    ap.add_argument("--rows", default="2,4,8,16,32,48,64")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = sweep(args.models.split(","), [int(r) for r in args.rows.split(",")], torch.device("cuda"))
    out.update(machine=f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
               date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), wall_s=round(time.perf_counter() - t0, 1))
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"table ({len(out['table'])} entries, {sum(v is not None for v in out['table'].values())} to the gemv): "
          f"{json.dumps(out['table'])}\nsweep {out['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
