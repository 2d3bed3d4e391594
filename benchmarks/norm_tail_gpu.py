"""The gemv's RMSNorm tail (issue 22, session 10: triton_gemv.gemv_add_norm) on the GPU, before
the end-to-end figures (benchmarks/b1norm_gpu.sh runs both):

  check  at llama-1b / llama-8b's o and down shapes (down through its SiLU-and-mul prologue at
         one row, the activation's launch then the plain gemv at 4 and 16), bf16, many seeds: the
         tail's normed rows and residual bit for bit the gemv then the norm kernel (4 warps, as
         the tail); how many elements the norm kernel's former 8 warps round otherwise; the
         counter zero after every launch; two tail launches captured in a CUDA graph, replayed
         three times, equal to the eager ones
  time   one row, us a call in CUDA graphs of 40, weights cycled past the L2: gemv + norm
         launch (4 and 8 warps) against the gemv with the tail

Usage: python3 benchmarks/norm_tail_gpu.py [--cpu-smoke]; writes norm_tail.json under $OUT."""
from __future__ import annotations

import json
import os
import sys
import time

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pagedserve.layers import triton_ops  # noqa: E402
from pagedserve.layers.triton_gemv import GemvConfig, gemv, gemv_add_norm, silu_and_mul_gemv  # noqa: E402
from pagedserve.layers.triton_ops import rms_norm, silu_and_mul, zeroed_counters  # noqa: E402

# model: (hidden, intermediate)
SHAPES = {"tiny": (1024, 256)} if SMOKE else {"llama-1b": (2048, 8192), "llama-8b": (4096, 14336)}
DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float16 if SMOKE else torch.bfloat16
CONFIG = GemvConfig(8, 128, 4, 2) if SMOKE else None   # None: the library's launch shapes
EPS = 1e-5
OUT: dict = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}


def log(msg: str) -> None:
    print(msg, flush=True)


def case(m: int, n: int, k: int, silu: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, generator=gen).to(DEV, DTYPE)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(DEV, DTYPE)
    residual = (torch.randn(m, n, generator=gen) * 2).to(DEV, DTYPE)
    norm_w = (1 + 0.2 * torch.randn(n, generator=gen)).to(DEV, DTYPE)
    return x, w, residual, norm_w


def plain(x, w, silu: bool):
    if silu and x.shape[0] == 1:
        return silu_and_mul_gemv(x, w, CONFIG)
    return gemv(silu_and_mul(x) if silu else x, w, CONFIG)


def tail(x, w, residual, norm_w, silu: bool):
    if silu and x.shape[0] > 1:   # as RowParallelLinear.forward_add_norm: the activation's launch first
        return gemv_add_norm(silu_and_mul(x), w, residual, norm_w, EPS, config=CONFIG)
    return gemv_add_norm(x, w, residual, norm_w, EPS, silu=silu, config=CONFIG)


def norm_after(y, residual, norm_w, warps: int):
    saved, triton_ops.RMS_NORM_WARPS = triton_ops.RMS_NORM_WARPS, warps
    try:
        res = residual.clone()
        return rms_norm(y, norm_w, EPS, res), res
    finally:
        triton_ops.RMS_NORM_WARPS = saved


def check() -> bool:
    res, ok = {}, True
    seeds = 2 if SMOKE else 12
    for model, (h, i) in SHAPES.items():
        for role, n, k, silu in (("o", h, h, False), ("down", h, i, True)):
            for m in (1, 4, 16):
                equal, rows, diff8 = 0, 0, 0
                for seed in range(seeds):
                    x, w, residual, norm_w = case(m, n, k, silu, seed)
                    y = plain(x, w, silu)
                    exp, exp_res = norm_after(y, residual, norm_w, 4)
                    old, _ = norm_after(y, residual, norm_w, 8)
                    got = tail(x, w, residual, norm_w, silu)
                    assert got is not None, f"{model} {role} m={m}: the tail declined"
                    normed, new_res = got
                    same = torch.equal(normed, exp) and torch.equal(new_res, exp_res)
                    clean = int(zeroed_counters(DEV, 1)[0]) == 0
                    equal += same and clean
                    rows += m
                    diff8 += int((old != exp).sum())
                key = f"{model}.{role}.m{m}"
                res[key] = dict(launches=seeds, bit_equal=equal, rows=rows, elements_8warps_differ=diff8)
                ok &= equal == seeds
                log(f"check {key}: {equal}/{seeds} launches bit for bit (normed, residual, counter 0); "
                    f"the 8-warp norm kernel differs in {diff8} of {rows * n} elements")
    ok &= graph_check(res)
    OUT["check"] = res
    log(f"CHECK {'PASSED' if ok else 'FAILED'}")
    return ok


def graph_check(res: dict) -> bool:
    """Two tail launches (o then down at one row, the second on the first's residual) in a CUDA
    graph: three replays equal to the eager launches, the counter zero after."""
    if SMOKE:
        return True
    h, i = SHAPES["llama-1b"]
    xo, wo, residual, nw1 = case(1, h, h, False, 100)
    xd, wd, _, nw2 = case(1, h, i, True, 101)
    base = residual.clone()

    def step():
        n1, r = tail(xo, wo, residual, nw1, False)
        n2, r = tail(xd, wd, r, nw2, True)
        return n1, n2
    exp1, exp2 = step()
    exp_res = residual.clone()
    residual.copy_(base)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    residual.copy_(base)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out1, out2 = step()
    good = 0
    for _ in range(3):
        residual.copy_(base)
        graph.replay()
        torch.cuda.synchronize()
        good += bool(torch.equal(out1, exp1) and torch.equal(out2, exp2) and torch.equal(residual, exp_res)
                     and int(zeroed_counters(DEV, 1)[0]) == 0)
    res["graph_replays_equal"] = good
    log(f"check graph: {good}/3 replays equal to the eager launches")
    return good == 3


def timing() -> None:
    if SMOKE:
        return
    from gemv_sweep import time_us
    res = {}
    for model, (h, i) in SHAPES.items():
        for role, n, k, silu in (("o", h, h, False), ("down", h, i, True)):
            copies = max(2, -(-96 * 2**20 // (n * k * 2)))   # > the L2 (50 MB) between two uses
            cases = [case(1, n, k, silu, 200 + c) for c in range(copies)]
            args = [(x, w, r, nw) for x, w, r, nw in cases]
            row = {}
            for label, fn in (
                    ("gemv+norm4", lambda a: norm_after_inplace(plain(a[0], a[1], silu), a[2], a[3], 4)),
                    ("gemv+norm8", lambda a: norm_after_inplace(plain(a[0], a[1], silu), a[2], a[3], 8)),
                    ("tail", lambda a: tail(a[0], a[1], a[2], a[3], silu)),
                    ("gemv", lambda a: plain(a[0], a[1], silu))):
                row[label] = round(time_us(fn, args), 2)
            res[f"{model}.{role}"] = row
            log(f"time {model}.{role} (us a call, one row): {json.dumps(row)}")
    OUT["time_us"] = res


def norm_after_inplace(y, residual, norm_w, warps: int):
    saved, triton_ops.RMS_NORM_WARPS = triton_ops.RMS_NORM_WARPS, warps
    try:
        return rms_norm(y, norm_w, EPS, residual)
    finally:
        triton_ops.RMS_NORM_WARPS = saved


def main() -> None:
    if not SMOKE:
        import triton
        OUT["machine"] = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
        log(OUT["machine"])
    t0 = time.time()
    ok = check()
    timing()
    OUT["wall_s"] = round(time.time() - t0, 1)
    out_dir = os.environ.get("OUT", "/tmp/norm_tail")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "norm_tail.json"), "w") as f:
        json.dump(OUT, f, indent=1)
    log(f"norm_tail: {'check passed' if ok else 'CHECK FAILED'}; {OUT['wall_s']} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
