"""Can a Triton GEMM with silu(gate) * up in its epilogue beat cuBLAS's gate_up plus the SiLU
launch on a prefill step? (issue 22)

A thr512 prefill step of llama-1b (8,192 tokens) spends ~1.7 ms of ~28 ms in the SiLU-and-mul
launch (session 28): it reads gate_up's [T, 2I] output back and writes [T, I]. A GEMM that holds a
tile of gate and the same tile of up in two accumulators writes only the [T, I] product.
This times, at prefill shapes (us, median; the operands are far larger than the L2):
  cublas        F.linear(x, W_gate_up)
  cublas+silu   the same plus pagedserve's silu_and_mul launch (today's path)
  triton_fused  the Triton kernel below for each config, writing [T, I]
  triton_plain  the same kernel without the epilogue's multiply (one accumulator, plain GEMM of
                the gate half: compare with cuBLAS on [T, I] to see Triton's own rate)
  tma*          the same through TMA tensor descriptors, one program a tile, or persistent (P: one
                program an SM walking the tiles), optionally warp-specialised (W)
and checks the fused output against today's path (max abs difference, bf16).
Usage: python3 benchmarks/prefill_gemm_probe.py [--tokens 8192] [--models llama-1b,llama-8b] [--pointer N]
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pagedserve.layers.triton_ops import silu_and_mul, silu_mul

SHAPES = {"llama-1b": (2048, 8192), "llama-8b": (4096, 14336)}   # hidden, intermediate
CONFIGS = [  # BM, BN (per half), BK, warps, stages, group
    (128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 64, 64, 4, 4, 8), (128, 128, 32, 8, 4, 8),
    (64, 128, 64, 4, 4, 8), (128, 64, 64, 8, 4, 8), (256, 64, 64, 8, 3, 8), (128, 128, 64, 4, 3, 8),
]
# the TMA kernel: config, then (persistent, warp-specialised); session 30's pointer kernel was best at the first
TMA_CONFIGS = [(cfg, mode) for cfg in [(128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 64, 64, 4, 4, 8),
                                      (128, 128, 64, 4, 3, 8), (128, 64, 64, 8, 4, 8)]
               for mode in [(False, False), (True, False), (True, True)]]


@triton.jit
def _grouped_tile(tile, num_m, num_n, GROUP: tl.constexpr):
    """(row block, column block) of tile number `tile`, GROUP row blocks walked together (the
    weight's column blocks stay in the L2 across them)."""
    per_group = GROUP * num_n
    first_m = (tile // per_group) * GROUP
    rows_in_group = min(num_m - first_m, GROUP)
    return first_m + (tile % per_group) % rows_in_group, (tile % per_group) // rows_in_group


@triton.jit
def _epilogue(acc_g, acc_u, dtype: tl.constexpr, FUSE: tl.constexpr):
    """silu(gate) * up rounded as today's path (each product to `dtype` first), or the gate alone."""
    if FUSE:
        return silu_mul(acc_g.to(dtype), acc_u.to(dtype), False)
    return acc_g.to(dtype)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                    FUSE: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    wg = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    wu = wg + N * stride_wn
    m_mask = offs_m[:, None] < M
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BK)):
        a = tl.load(x, mask=m_mask, other=0.0)
        acc_g = tl.dot(a, tl.load(wg), acc_g)
        if FUSE:
            acc_u = tl.dot(a, tl.load(wu), acc_u)
        x += BK
        wg += BK
        wu += BK
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             _epilogue(acc_g, acc_u, out_ptr.dtype.element_ty, FUSE), mask=m_mask)


@triton.jit
def _gate_up_tma_kernel(x_desc, w_desc, out_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GROUP: tl.constexpr, NUM_PROGRAMS: tl.constexpr, FUSE: tl.constexpr, WS: tl.constexpr):
    """The same product through TMA tensor descriptors; with NUM_PROGRAMS < the tile count each program
    walks tiles NUM_PROGRAMS apart (persistent: one program an SM)."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP)
        off_m, off_n = pid_m * BM, pid_n * BN
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BK)):
            a = x_desc.load([off_m, ki * BK])
            acc_g = tl.dot(a, w_desc.load([off_n, ki * BK]).T, acc_g)
            if FUSE:
                acc_u = tl.dot(a, w_desc.load([N + off_n, ki * BK]).T, acc_u)
        out_desc.store([off_m, off_n], _epilogue(acc_g, acc_u, out_desc.dtype, FUSE))


def gate_up_silu_tma(x: torch.Tensor, w: torch.Tensor, cfg, fuse: bool = True, persistent: bool = True,
                     ws: bool = False, programs: int | None = None) -> torch.Tensor:
    """persistent: one program an SM (or `programs`), each walking tiles; else one program a tile."""
    bm, bn, bk, warps, stages, group = cfg
    m, k = x.shape
    n = w.shape[0] // 2
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if programs is None:
        programs = min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count) \
            if persistent and x.is_cuda else tiles
    _gate_up_tma_kernel[(programs,)](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                                     TensorDescriptor.from_tensor(out, [bm, bn]), m, n, k, BM=bm, BN=bn, BK=bk,
                                     GROUP=group, NUM_PROGRAMS=programs, FUSE=fuse, WS=ws, num_warps=warps,
                                     num_stages=stages)
    return out


def gate_up_silu(x: torch.Tensor, w: torch.Tensor, cfg, fuse: bool = True) -> torch.Tensor:
    bm, bn, bk, warps, stages, group = cfg
    m, k = x.shape
    n = w.shape[0] // 2
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gate_up_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), BM=bm, BN=bn, BK=bk,
                          GROUP=group, FUSE=fuse, num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--models", default="llama-1b,llama-8b")
    ap.add_argument("--pointer", type=int, default=1, help="how many of the pointer kernel's configs (session 30: 8)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(json.dumps(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, tokens=args.tokens,
                          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))), flush=True)

    def bench(fn):
        return round(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3, 1)

    for model in args.models.split(","):
        h, inter = SHAPES[model]
        torch.manual_seed(0)
        x = torch.randn(args.tokens, h, device=dev, dtype=dt)
        w = torch.randn(2 * inter, h, device=dev, dtype=dt) * h ** -0.5
        flop = 2 * args.tokens * h * 2 * inter
        ref = silu_and_mul(F.linear(x, w))
        res = dict(model=model, cublas=bench(lambda: F.linear(x, w)),
                   cublas_silu=bench(lambda: silu_and_mul(F.linear(x, w))),
                   cublas_half=bench(lambda: F.linear(x, w[:inter])))
        res["cublas_tflops"] = round(flop / res["cublas"] / 1e6, 1)
        variants = [(f"ptr{cfg}", functools.partial(gate_up_silu, cfg=cfg)) for cfg in CONFIGS[:args.pointer]]
        variants += [(f"tma{cfg}{'P' if pers else ''}{'W' if ws else ''}",
                      functools.partial(gate_up_silu_tma, cfg=cfg, persistent=pers, ws=ws)) for cfg, (pers, ws) in TMA_CONFIGS]
        for label, fn in variants:
            try:
                out = fn(x, w)
                err = (out.float() - ref.float()).abs().max().item()
                fused, plain = bench(lambda: fn(x, w)), bench(lambda: fn(x, w, fuse=False))
                res[label] = dict(fused=fused, plain_half=plain, err=round(err, 4), tflops=round(flop / fused / 1e6, 1))
            except Exception as e:   # noqa: BLE001 - a config out of resources or not built: report and go on
                res[label] = repr(e)[:120]
            print(model, label, res[label], flush=True)
        best = min((v["fused"], k) for k, v in res.items() if isinstance(v, dict))
        res["best"] = dict(label=best[1], fused=best[0], vs_cublas_silu=round(best[0] / res["cublas_silu"], 3))
        print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
