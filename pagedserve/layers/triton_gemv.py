"""Triton matmul for decode-sized batches: y = x @ w.T for x [M, K] with few rows (M <= 64)
and an nn.Linear weight w [N, K], bf16 / fp16, on CUDA; optionally with the op that makes x
fused in front of it (its prologue), so a decode layer launches fewer kernels:

- `gemv(x, w)`: plain;
- `silu_and_mul_gemv(gate_up, w)`: silu(gate) * up computed per K slice of [gate | up], as
  the standalone kernel rounds it (the same jit helper, layers/triton_ops.py): bit for bit;
- the norm chain, one row (models/llama.py's forward_chained): `add_gemv(x, w, residual, sum_sq)`
  adds its output into the residual row in place and each program's share of the new row's
  sum of squares into an fp64 scalar (atomics: the squares of 16-bit values and their sum are
  exact in fp64, so their order cannot change the bits); `rms_norm_gemv(residual, norm_w, eps,
  sum_sq, w)` normalises each K slice of the row from that sum as it streams: bit for bit the
  norm kernel (layers/triton_ops.py, whose sum is fp64 too) then the gemv, and no norm launch
  between (sessions 7 and 10 had each program reread the row, or the last one norm it, and lost
  the launch's saving to that serial step; benchmarks/RESULTS.md, session 25). gate_up's takes
  `silu_out=True`: each program's lane pairs hold matching gate and up rows and its epilogue
  stores silu(gate) * up of the rounded outputs (bit for bit the SiLU-and-mul kernel after it),
  so down is a plain add_gemv (session 26: llama-1b down 174 -> 156 us a replay, gate_up +6).

At batch 1-64 a decode step's matmuls are bound by reading the weights: every byte of w is
read once and the arithmetic is small. Each program streams a [BLOCK_N, BLOCK_K] slab of w
over the whole of K through a software pipeline (NUM_STAGES loads in flight), fp32
accumulation, one rounding of the output. One row (M = 1) is multiplied with FMAs, each lane
accumulating its products across the slices and one reduction at the end; 2-64 rows go
through tl.dot on the rows padded to 16 / 32 / 64, either x @ w.T or swapped, (w @ x.T).T: the
weight slab is then the MMA's tall operand (sm_90's wgmma wants >= 64 rows there) and the few
rows its narrow one, which won most large-N shapes on the H200.

Launch shapes: M = 1 by weight shape (CONFIGS, from the sweep in `benchmarks/decode_gpu.py` on
an H200: the FMA variant beat both cuBLAS and tl.dot on padded rows on every llama-1b/8b shape,
reaching 3.3-4.6 TB/s on >= 32 MiB weights); M = 2-64 by row bucket and weight shape (MCONFIGS,
`benchmarks/gemv_sweep.py` on an H200: the launch, or cuBLAS where it was faster); other shapes
of 2-16 rows WIDE_DEFAULT (swapped) for N > K, else DEFAULT_CONFIG (32 x 512, 4 warps, 4 stages).
Plain matmuls go to cuBLAS below MIN_WEIGHT_BYTES unless a table names their shape; fused ones
take the gemv at any size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from pagedserve.layers.triton_launch import gdc_launch_dependents, gdc_wait, pdl_launches
from pagedserve.layers.triton_ops import _LIBDEVICE, rms_apply, rms_inv, rms_norm, silu_and_mul, silu_mul

logger = logging.getLogger(__name__)

MAX_ROWS = 64
# (Programmatic dependent launch, each gemv placed while the kernel before runs and prefetching its
# first weight slices into the L2, was measured slower twice on the H200: 831 vs 951 and 933.7 vs
# 1,025.6 tok/s on llama-1b, benchmarks/RESULTS.md; deleted. Nor did o_proj's and gate_up's weights
# bulk-prefetched into the L2 (cp.async.bulk.prefetch) while the decode attention runs: the gemvs
# read them from the L2 only 0.5 us a layer faster, the prefetch launch cost 3-4 us; replay +5% /
# +3%, session 18, branch l2pf. What did pay: only the one-row decode attention as a PDL launch,
# reading its own dependent chain's first links while the chained qkv gemv, which triggers it as it
# starts (LAUNCH_DEPENDENTS), runs: llama-1b replay -20 us; and o's add_gemv placed as that
# attention's wait ends, holding its first weight slice before its own (WAIT_INPUTS): llama-1b
# b1_decode +0.7%, llama-8b level; with the rest of o's rows prefetched into the L2 as well, the
# attention it overlapped ran 2.4 / 10.5 us a layer slower: llama-8b -5.5%; session 27.)
# (Split K at one row, each tile's fp32 partials summed in a fixed order by its last program in
# the same launch, was checked exact and deterministic on the H200 but slower on all ten llama
# shapes, by 0.8-6.1 us a call, and level end to end: benchmarks/RESULTS.md, session 9; deleted.)
# (The residual add + RMSNorm after the o and down gemvs done in their launch's tail, by the last
# program to finish its tile, was bit for bit the norm kernel and cut 32 / 64 launches a llama-1b /
# 8b replay, but the tail cost what the norm launch had (1.9-2.4 us a gemv in the replay: the last
# program's atomic, row reload, reduction and stores are as serial as the norm kernel), so only the
# ~0.4 us graph gap a launch was saved: replay -0.9% / -0.2%; benchmarks/RESULTS.md, session 10;
# deleted; the code: branch b1norm, commit 33702fb.)
MIN_WEIGHT_BYTES = 32 * 2**20
# Up to this many rows the gemv takes a weight of any shape (>= MIN_WEIGHT_BYTES) and any row
# count as it comes; past it only the row buckets and shapes MCONFIGS names, so an LM head of more
# rows outside the graphs is padded to its decode bucket (worker/cuda_graph.py's logits_rows).
GEMV_ANY_SHAPE_ROWS = 16
_DTYPES = (torch.bfloat16, torch.float16)

_PLAIN, _SILU, _NORM = 0, 1, 2


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, LIBDEVICE: tl.constexpr,
                 SWAP: tl.constexpr = False, norm_w_ptr=None, sum_in_ptr=None, sum_out_ptr=None, inv_k=1.0,
                 eps=0.0, ADD_OUT: tl.constexpr = False, SILU_OUT: tl.constexpr = False,
                 LAUNCH_DEPENDENTS: tl.constexpr = False, WAIT_INPUTS: tl.constexpr = False):
    if LAUNCH_DEPENDENTS:   # the kernel after this one (a programmatic dependent launch) may be placed now
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    # SILU_OUT: w = [gate | up] (N = 2 I), lane pairs (2j, 2j + 1) take gate row and up row
    # i = pid * BLOCK_N / 2 + j (out_i), whose silu(gate) * up the epilogue stores
    lane = tl.arange(0, BLOCK_N)
    half = N // 2 if SILU_OUT else N
    out_i = pid * (BLOCK_N // 2) + lane // 2 if SILU_OUT else pid * BLOCK_N + lane
    offs_n = out_i + (lane % 2) * half if SILU_OUT else out_i
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    m_valid = offs_m[:, None] < M
    n_valid = out_i[:, None] < half
    if PROLOGUE == 2:   # RMSNorm of the one row x (the residual stream), its sum of squares gathered before
        inv = rms_inv(tl.load(sum_in_ptr), inv_k, eps)
    if ADD_OUT:   # the residual row this launch adds its output into (one row), loaded before the stream
        res_ptrs = y_ptr + offs_n[None, :]
        residual = tl.load(res_ptrs, mask=offs_n[None, :] < N, other=0.0)
    if BLOCK_M == 1:   # one row: per-lane FMAs over the slices, one reduction at the end
        acc_k = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    elif SWAP:   # y.T = w @ x.T: the weight slab is the MMA's tall operand, the rows its narrow one
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = 0
    if WAIT_INPUTS:   # one row, plain (a programmatic dependent launch placed while the kernel that
        # writes x runs): the first weight slice into registers, then wait for x; the first slice's
        # products, then the loop from the second (the rest of the rows prefetched into the L2 here
        # too slowed the decode attention they overlapped: llama-8b replay +6%, session 27)
        w_first = tl.load(w_rows + offs_k[None, :], mask=n_valid if EVEN_K else n_valid & (offs_k[None, :] < K),
                          other=0.0)
        gdc_wait()
        x_first = tl.load(x_rows + offs_k[None, :], mask=m_valid if EVEN_K else m_valid & (offs_k[None, :] < K),
                          other=0.0)
        acc_k += x_first.to(tl.float32) * w_first.to(tl.float32)
        k_start = BLOCK_K
    for k in tl.range(k_start, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k + offs_k
        x_mask = m_valid if EVEN_K else m_valid & (cols[None, :] < K)
        w_mask = n_valid if EVEN_K else n_valid & (cols[None, :] < K)
        if PROLOGUE == 1:   # SiLU-and-mul
            gate = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)
            x = silu_mul(gate, tl.load(x_rows + K + cols[None, :], mask=x_mask, other=0.0), LIBDEVICE)
        elif PROLOGUE == 2:   # RMSNorm, rounded as the norm kernel rounds
            x = rms_apply(tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0), inv,
                          tl.load(norm_w_ptr + cols[None, :], mask=cols[None, :] < K, other=0.0))
        else:
            x = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)
        w = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0)
        if BLOCK_M == 1:
            acc_k += x.to(tl.float32) * w.to(tl.float32)
        elif SWAP:
            acc_t = tl.dot(w, tl.trans(x), acc_t)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if SWAP:
        out_t = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        tl.store(out_t, acc_t.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & n_valid)
    else:
        if BLOCK_M == 1:
            acc = tl.sum(acc_k, axis=1)[None, :]
        if SILU_OUT:   # one row: silu(gate) * up of the rounded outputs, as the standalone kernel rounds it
            pair = tl.reshape(acc.to(y_ptr.dtype.element_ty), [BLOCK_N // 2, 2])
            gate, up = tl.split(pair)
            outs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(y_ptr + outs, silu_mul(gate, up, LIBDEVICE), mask=outs < half)
        elif ADD_OUT:   # residual += y as the norm kernel adds it, and the sum's share of this tile
            h = acc.to(y_ptr.dtype.element_ty) + residual
            tl.store(res_ptrs, h, mask=offs_n[None, :] < N)
            hd = h.to(tl.float64)
            tl.atomic_add(sum_out_ptr, tl.sum(tl.sum(hd * hd, axis=1), axis=0), sem="relaxed")
        else:
            out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid & (offs_n[None, :] < N))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 4
    swap: bool = False   # M > 1: y.T = w @ x.T (the weight slab as the MMA's tall operand; block_n >= 64)


DEFAULT_CONFIG = GemvConfig()   # M > 1: tl.dot on the rows padded to 16 / 32 / 64 (block_n >= 16)
# M = 1 (the FMA variant): per weight shape (N, K), the best of the sweep in
# benchmarks/decode_gpu.py on an H200 (2026-12-01 session 9, cold weights in CUDA graphs, 24-30
# launch shapes a weight; benchmarks/gpu/2026-12-01-h200-s9-gemv22/): against session 8's table
# the llama-1b decode replay 0.977 vs 0.986 / 0.986 ms, llama-8b 4.267 vs 4.273 / 4.292 ms in one
# process; on each of these shapes the gemv beat cuBLAS (1.0-1.4x), so plain matmuls of these
# shapes take the gemv at one row whatever the weight's size. "norm chain": re-swept with the RMSNorm
# prologue they run with at TP=1 (session 25, `decode_gpu.py --stages sweep,models --roles qkv,gate_up
# --variants default,swept,default2`, benchmarks/gpu/2026-12-03-h200-s25/sweep/): wider slabs, fewer
# programs normalising the row; replay llama-8b 3.973 / 3.976 -> 3.955 ms, llama-1b 0.863 / 0.865 ->
# 0.854 ms in one process (llama-1b qkv kept: the quick grid's best lost to it). Session 26 re-swept
# gate_up (with its SiLU-and-mul epilogue) and down (plain) (`--roles gate_up,down`,
# benchmarks/gpu/2026-12-03-h200-s26/silu/): only llama-1b's down changed, down in the replay 161.2 ->
# 156.2 us (llama-8b's sweep pick was slower in the replay: kept)
CONFIGS: dict[tuple[int, int], GemvConfig] = {
    (3072, 2048): GemvConfig(4, 512, 4, 3),      # llama-1b qkv
    (2048, 2048): GemvConfig(4, 512, 4, 3),      # llama-1b o
    (16384, 2048): GemvConfig(32, 256, 4, 3),    # llama-1b gate_up (norm chain)
    (2048, 8192): GemvConfig(4, 512, 4, 4),      # llama-1b down (plain since session 26: SiLU in gate_up's epilogue)
    (128256, 2048): GemvConfig(8, 512, 4, 3),    # llama-1b lm_head
    (6144, 4096): GemvConfig(16, 256, 4, 4),     # llama-8b qkv (norm chain)
    (4096, 4096): GemvConfig(4, 512, 4, 3),      # llama-8b o
    (28672, 4096): GemvConfig(16, 256, 4, 3),    # llama-8b gate_up (norm chain)
    (4096, 14336): GemvConfig(16, 512, 4, 4),    # llama-8b down
    (128256, 4096): GemvConfig(8, 1024, 4, 4),   # llama-8b lm_head
    # one rank's shards under tensor parallelism (columns of qkv, gate_up and the vocabulary split,
    # rows of o and down; the same sweep, 2026-12-03 session 22, benchmarks/gpu/2026-12-03-h200-s22/):
    # us a call against cuBLAS / the M1_DEFAULT gemv: llama-8b TP=2 qkv 8.11 vs 10.84 / 8.42, o 6.01
    # vs 7.05 / 6.35 (both under MIN_WEIGHT_BYTES: cuBLAS ran them); llama-70b TP=4 o 9.79 vs 10.65 /
    # 10.82 and down 30.09 vs 30.38 / 31.22 (the default gemv lost to cuBLAS there); every shard's
    # best beat cuBLAS (1.01-1.33x) and the default launch (1.00-1.10x)
    (3072, 4096): GemvConfig(4, 512, 4, 4),      # llama-8b TP=2 qkv
    (4096, 2048): GemvConfig(16, 256, 4, 4),     # llama-8b TP=2 o
    (14336, 4096): GemvConfig(16, 256, 4, 3),    # llama-8b TP=2 gate_up
    (4096, 7168): GemvConfig(16, 512, 4, 4),     # llama-8b TP=2 down
    (64128, 4096): GemvConfig(8, 1024, 4, 4),    # llama-8b TP=2 lm_head
    (5120, 8192): GemvConfig(8, 256, 4, 4),      # llama-70b TP=2 qkv
    (8192, 4096): GemvConfig(16, 256, 4, 3),     # llama-70b TP=2 o
    (28672, 8192): GemvConfig(8, 1024, 8, 4),    # llama-70b TP=2 gate_up
    (8192, 14336): GemvConfig(32, 256, 4, 4),    # llama-70b TP=2 down
    (64128, 8192): GemvConfig(4, 512, 4, 4),     # llama-70b TP=2 lm_head
    (2560, 8192): GemvConfig(4, 512, 4, 4),      # llama-70b TP=4 qkv
    (8192, 2048): GemvConfig(8, 256, 4, 3),      # llama-70b TP=4 o
    (14336, 8192): GemvConfig(4, 512, 4, 3),     # llama-70b TP=4 gate_up
    (8192, 7168): GemvConfig(32, 256, 4, 4),     # llama-70b TP=4 down
    (32064, 8192): GemvConfig(4, 512, 4, 3),     # llama-70b TP=4 lm_head
}
M1_DEFAULT = GemvConfig(16, 512, 4, 4)
# M = 2..MAX_ROWS, by row bucket (the smallest of ROW_BUCKETS >= M: the decode graphs' sizes) and
# weight shape: the best launch of benchmarks/gemv_sweep.py on an H200 (2026-12-03, session 20, cold
# weights in CUDA graphs, 26 launch shapes at 16 / 32 / 64 rows, each row count against cuBLAS;
# benchmarks/gpu/2026-12-03-h200-s20/gemv_rows/), or None where cuBLAS was faster. S: swapped
# (y.T = w @ x.T), P: plain. Against main's 16-row default launch and cuBLAS above, the decode
# graphs of 2-64 rows replayed 1.5-6.5% (llama-8b) and 3.8-10% (llama-1b) faster. A bucket past
# GEMV_ANY_SHAPE_ROWS with no entry goes to cuBLAS; one within it with no entry takes the
# gemv for weights >= MIN_WEIGHT_BYTES, launched as config_for says.
ROW_BUCKETS = (2, 4, 8, 16, 32, 48, 64)


def S(block_n: int, block_k: int, num_warps: int, num_stages: int) -> GemvConfig:
    return GemvConfig(block_n, block_k, num_warps, num_stages, True)


def P(block_n: int, block_k: int, num_warps: int, num_stages: int) -> GemvConfig:
    return GemvConfig(block_n, block_k, num_warps, num_stages, False)


_BY_SHAPE: dict[tuple[int, int], dict[int, GemvConfig | None]] = {
    (6144, 4096): {2: S(64, 256, 4, 4), 4: S(64, 256, 4, 4), 8: S(64, 256, 4, 4), 16: S(64, 128, 4, 5),
                   32: S(64, 256, 4, 4), 48: S(64, 128, 4, 5), 64: S(64, 128, 4, 5)},   # llama-8b qkv
    (4096, 4096): {2: S(64, 256, 4, 5), 4: S(64, 256, 4, 5), 8: P(32, 512, 4, 4), 16: P(32, 512, 4, 4),
                   32: S(64, 256, 4, 4), 48: P(32, 256, 4, 4), 64: None},   # llama-8b o
    (28672, 4096): {2: S(64, 128, 4, 4), 4: S(128, 128, 4, 3), 8: S(64, 128, 4, 4), 16: None,
                    32: S(64, 128, 4, 4), 48: S(64, 128, 4, 3), 64: S(64, 128, 4, 3)},   # llama-8b gate_up
    (4096, 14336): {2: P(32, 512, 4, 4), 4: P(32, 512, 4, 4), 8: P(32, 512, 4, 4), 16: P(32, 512, 4, 4),
                    32: P(32, 512, 4, 4), 48: P(32, 256, 4, 4), 64: P(32, 256, 4, 4)},   # llama-8b down
    (128256, 4096): {2: S(128, 128, 4, 3), 4: S(128, 128, 4, 3), 8: S(128, 128, 4, 3), 16: S(128, 128, 4, 3),
                     32: S(128, 128, 4, 4), 48: S(128, 128, 4, 4), 64: S(128, 128, 4, 4)},   # llama-8b lm_head
    (3072, 2048): {2: S(64, 256, 4, 4), 4: S(64, 256, 4, 4), 8: S(64, 256, 4, 4), 16: S(64, 256, 4, 4),
                   32: None, 48: None, 64: None},   # llama-1b qkv
    (2048, 2048): {2: P(16, 512, 4, 4), 4: P(16, 512, 4, 4), 8: P(16, 512, 4, 3), 16: P(16, 512, 4, 3),
                   32: P(16, 256, 4, 4), 48: P(16, 256, 4, 4), 64: P(16, 256, 4, 4)},   # llama-1b o
    (16384, 2048): {2: S(64, 128, 4, 4), 4: S(64, 128, 4, 4), 8: S(64, 128, 4, 4), 16: S(64, 128, 4, 3),
                    32: S(64, 128, 4, 3), 48: S(64, 128, 4, 3), 64: None},   # llama-1b gate_up
    (2048, 8192): {2: P(16, 512, 4, 4), 4: P(16, 512, 4, 4), 8: P(16, 1024, 4, 3), 16: P(16, 512, 4, 4),
                   32: None, 48: None, 64: None},   # llama-1b down
    (128256, 2048): {2: S(128, 128, 4, 3), 4: S(128, 128, 4, 3), 8: S(128, 128, 4, 3), 16: S(128, 128, 4, 3),
                     32: S(64, 128, 4, 4), 48: S(64, 128, 4, 3), 64: S(128, 128, 4, 4)},   # llama-1b lm_head
}
MCONFIGS: dict[tuple[int, int, int], GemvConfig | None] = {
    (bucket, n, k): cfg for (n, k), row in _BY_SHAPE.items() for bucket, cfg in row.items()}


def row_bucket(m: int) -> int:
    return next(b for b in ROW_BUCKETS if b >= m)


# M = 2-16 into a shape MCONFIGS does not name: swapped for N > K (on the sweep's five such shapes
# within 2% of each shape's best and 5-20% faster than DEFAULT_CONFIG, which lost to cuBLAS on all
# five), DEFAULT_CONFIG otherwise (within 0.1-0.6 us of the best on o / down)
WIDE_DEFAULT = S(64, 128, 4, 5)


def config_for(m: int, n: int, k: int) -> GemvConfig:
    if m == 1:
        return CONFIGS.get((n, k), M1_DEFAULT)
    return MCONFIGS.get((row_bucket(m), n, k)) or (WIDE_DEFAULT if n > k else DEFAULT_CONFIG)


def fusable(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether the gemv can take x here (any weight size): CUDA, bf16/fp16, 1 to
    min(max_rows, MAX_ROWS) rows, unit column strides."""
    return (x.dim() == 2 and 0 < x.shape[0] <= min(max_rows, MAX_ROWS) and x.is_cuda and x.dtype in _DTYPES
            and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1)


def use_gemv(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether the plain gemv beats cuBLAS here, given `fusable`: one row into a weight shape of
    CONFIGS; 2-64 rows as MCONFIGS's row bucket says for its shapes; else a weight of at least
    MIN_WEIGHT_BYTES and at most GEMV_ANY_SHAPE_ROWS rows (a step that samples no row computes
    logits of 0 rows: F.linear)."""
    if not fusable(x, weight, max_rows):
        return False
    m, shape = x.shape[0], tuple(weight.shape)
    if m == 1 and shape in CONFIGS:
        return True
    if m > 1 and (key := (row_bucket(m), *shape)) in MCONFIGS:
        return MCONFIGS[key] is not None
    return m <= GEMV_ANY_SHAPE_ROWS and weight.numel() * weight.element_size() >= MIN_WEIGHT_BYTES


def _check(x: torch.Tensor, k: int, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or k != weight.shape[1]:
        raise ValueError(f"gemv: x must be [M, K] (gate_up: [M, 2K]) and weight [N, K]; "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not 0 < x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv: x has {x.shape[0]} rows; this kernel takes 1..{MAX_ROWS}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"gemv: x and weight must share one dtype in {_DTYPES}; got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.device != weight.device:
        raise ValueError(f"gemv: x and weight need unit column strides on one device; got strides "
                         f"{x.stride()} and {weight.stride()}")


# Launches this device cannot run (the tables were tuned on an H200's 228 KiB of shared memory per
# SM; a GPU with less refuses the big tiles): each goes to torch once it has failed.
_UNFIT: set[tuple] = set()   # (config, block_m, prologue, add, silu_out, launch_dependents, wait_inputs)


@dataclass(frozen=True)
class NormIn:
    """x is the residual stream's one row, normalised in the prologue: RMSNorm(x) with `weight`
    and `eps`, x's fp64 sum of squares in `sum_sq` ([1], added up by the launch that wrote x)."""
    weight: torch.Tensor
    eps: float
    sum_sq: torch.Tensor


@dataclass(frozen=True)
class AddOut:
    """The output added into `residual` ([1, N], in place, rounded as the norm kernel adds) and
    its fp64 sum of squares into `sum_sq` ([1], zero before the launch) instead of returned."""
    residual: torch.Tensor
    sum_sq: torch.Tensor


def _launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None, k: int,
            norm: NormIn | None = None, add: AddOut | None = None, silu_out: bool = False,
            launch_dependents: bool = False, wait_inputs: bool = False) -> torch.Tensor:
    _check(x, k, weight)
    m, n = x.shape[0], weight.shape[0]
    config = config or config_for(m, n, k)
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    launch_dependents = launch_dependents and pdl_launches(x.device)
    wait_inputs = wait_inputs and m == 1 and prologue == _PLAIN and pdl_launches(x.device)
    key = (config, block_m, prologue, add is not None, silu_out, launch_dependents, wait_inputs)
    if key not in _UNFIT:
        if add is not None:
            y = add.residual
        else:
            y = torch.empty((m, n // 2 if silu_out else n), dtype=x.dtype, device=x.device)
        extra = {} if norm is None and add is None and not silu_out else dict(
            norm_w_ptr=norm.weight if norm else None, sum_in_ptr=norm.sum_sq if norm else None,
            sum_out_ptr=add.sum_sq if add else None, inv_k=1.0 / k, eps=norm.eps if norm else 0.0,
            ADD_OUT=add is not None, SILU_OUT=silu_out)
        if launch_dependents:
            extra["LAUNCH_DEPENDENTS"] = True
        if wait_inputs:
            extra.update(WAIT_INPUTS=True, launch_pdl=True)
        try:   # (the resource check comes before the launch: nothing is enqueued when it fails)
            _gemv_kernel[(triton.cdiv(n, config.block_n),)](
                x, weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                PROLOGUE=prologue, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                EVEN_K=k % config.block_k == 0, NUM_STAGES=config.num_stages, LIBDEVICE=_LIBDEVICE,
                SWAP=config.swap and m > 1, num_warps=config.num_warps, **extra)
            return y
        except OutOfResources as exc:
            _UNFIT.add(key)
            logger.warning("gemv launch %s for %d rows does not fit this GPU (%s): torch's matmul instead",
                           config, m, exc)
    if prologue == _NORM:
        x = rms_norm(x, norm.weight, norm.eps)
    elif prologue == _SILU:
        x = silu_and_mul(x)
    y = F.linear(x, weight)
    if silu_out:
        return silu_and_mul(y)
    if add is None:
        return y
    add.residual.add_(y)
    add.sum_sq.add_(add.residual.double().square().sum())
    return add.residual


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit column stride) @ weight.T ([N, K], unit column stride)
    -> [M, N] in x's dtype. Mutates nothing."""
    return _launch(_PLAIN, x, weight, config, x.shape[-1])


def silu_and_mul_gemv(gate_up: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None
                      ) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T for gate_up = [gate | up] ([M, 2K]) -> [M, N]. At M > 1 the
    prologue computes 16 padded rows of IEEE exp and division per slice: decode layers fuse
    it at M = 1 only (layers/linear.py)."""
    if gate_up.dim() != 2 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul_gemv: gate_up must be [M, 2K]; got {tuple(gate_up.shape)}")
    return _launch(_SILU, gate_up, weight, config, gate_up.shape[-1] // 2)


def _check_chain(x: torch.Tensor, sum_sq: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    if x.shape[0] != 1 or not (sum_sq.dtype == torch.float64 and sum_sq.numel() == 1 and sum_sq.device == x.device):
        raise ValueError(f"norm chain: one row and an fp64 sum of squares [1] on its device; got x "
                         f"{tuple(x.shape)}, sum_sq {tuple(sum_sq.shape)} {sum_sq.dtype}")
    if rows is not None and not (rows.dim() == 2 and rows.shape[0] == 1 and rows.dtype == x.dtype
                                 and rows.stride(1) == 1 and rows.device == x.device):
        raise ValueError(f"norm chain: residual must be one contiguous row in x's dtype; got {tuple(rows.shape)} "
                         f"{rows.dtype}")


def rms_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, sum_sq: torch.Tensor,
                  weight: torch.Tensor, config: GemvConfig | None = None, silu_out: bool = False,
                  launch_dependents: bool = False) -> torch.Tensor:
    """RMSNorm(x) @ weight.T for one row x, whose fp64 sum of squares `sum_sq` ([1]) the launch that
    wrote x added up (add_gemv): bit for bit the norm kernel then the gemv. `silu_out` (weight =
    [gate | up], 2 I rows): silu(gate) * up of that output ([1, I]), bit for bit the SiLU-and-mul
    kernel after it (each program takes matching gate and up rows). `launch_dependents`: the next
    kernel, when made a programmatic dependent launch (the decode attention after qkv), may be
    placed on the SMs as this one starts (it waits for this one's output itself). Mutates nothing."""
    _check_chain(x, sum_sq)
    if norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype or not norm_weight.is_contiguous():
        raise ValueError(f"rms_norm_gemv: norm_weight must be [{x.shape[1]}] in x's dtype; got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    if silu_out and weight.shape[0] % 2:
        raise ValueError(f"rms_norm_gemv: silu_out needs a [gate | up] weight of 2 I rows; got {tuple(weight.shape)}")
    return _launch(_NORM, x, weight, config, x.shape[-1], norm=NormIn(norm_weight, eps, sum_sq), silu_out=silu_out,
                   launch_dependents=launch_dependents)


def add_gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, sum_sq: torch.Tensor,
             config: GemvConfig | None = None, wait_inputs: bool = False) -> torch.Tensor:
    """residual += x @ weight.T for one row, in place, rounded as the norm kernel's residual add;
    adds the new row's fp64 sum of squares into `sum_sq` (zero before, [1]) for the next launch's
    rms_norm_gemv. `wait_inputs`: a programmatic dependent launch (sm_90+) that loads its first weight
    slice before it waits for x (o_proj after the decode attention, which lets it be placed once its
    own wait is over). Returns residual."""
    _check_chain(x, sum_sq, residual)
    if residual.shape[1] != weight.shape[0]:
        raise ValueError(f"add_gemv: residual has {residual.shape[1]} columns, the weight {weight.shape[0]} rows")
    return _launch(_PLAIN, x, weight, config, x.shape[-1], add=AddOut(residual, sum_sq), wait_inputs=wait_inputs)
