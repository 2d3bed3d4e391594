"""GGUF (llama.cpp) block formats in torch: dequantize raw blocks, and repack the 4-bit
ones into torch's CPU int4 matmul layout (aten._weight_int4pack_mm_for_cpu).

A quantized GGUF row of K values is K / block_elems blocks of block_bytes bytes; here a
weight is a uint8 tensor [N, K / block_elems, block_bytes] (rows are output features, so
row permutations and TP splits along either dim stay on whole blocks). The layouts follow
ggml-quants.c (dequantize_row_*); tests compare every type with gguf.quants.dequantize.

torch's int4 kernel computes w = (q - 8) * scale + zero per group of 32 input features,
q in [0, 16), with bf16 activations, scales and output. Q4_0, Q4_1 and Q4_K map onto it
exactly up to the bf16 rounding of scale and zero; Q8_0 is two int4 halves
(q + 128 = 16 h + l), also exact up to that rounding. Q5_0, Q5_1, Q5_K and Q6_K have no
torch kernel: they are dequantized once at load (gguf.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

GROUP = 32   # int4 group size: every type here has 32-element (sub-)blocks


@dataclass(frozen=True)
class BlockFormat:
    name: str
    elems: int    # values per block
    nbytes: int   # bytes per block
    int4: bool    # runs on torch's int4 kernel after repacking


FORMATS = {f.name: f for f in (
    BlockFormat("Q4_0", 32, 18, True), BlockFormat("Q4_1", 32, 20, True),
    BlockFormat("Q5_0", 32, 22, False), BlockFormat("Q5_1", 32, 24, False),
    BlockFormat("Q8_0", 32, 34, True), BlockFormat("Q4_K", 256, 144, True),
    BlockFormat("Q5_K", 256, 176, False), BlockFormat("Q6_K", 256, 210, False))}


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte offset `at` of each block, as fp32 [..., 1]."""
    return raw[..., at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] values: the n low nibbles, then the n high nibbles."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bytes [..., count / 8] -> bits [..., count] (bit j of the word first)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(*qh.shape[:-1], count)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 12 scale bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    s = scales.to(torch.int32)
    low_sc, low_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    high_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    high_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat((low_sc, high_sc), -1).float(), torch.cat((low_m, high_m), -1).float()


def _k_quants4(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K low bits: 4 chunks of 32 bytes, each the low nibbles (sub-block 2i) then
    the high nibbles (sub-block 2i + 1) -> [..., 256]."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return _nibbles(chunks).reshape(*qs.shape[:-1], 256)


def _unpack(raw: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """raw [..., block_bytes] -> (q [..., nsub, 32] integer values, scale [..., nsub, 1],
    offset [..., nsub, 1] or None) with value = q * scale + offset, per 32-value sub-block."""
    lead = raw.shape[:-1]
    if fmt in ("Q4_0", "Q4_1"):
        body = 2 if fmt == "Q4_0" else 4
        q = _nibbles(raw[..., body:]).to(torch.int32)
        d = _f16(raw, 0)
        if fmt == "Q4_0":
            return (q - 8).unsqueeze(-2), d.unsqueeze(-1), None
        return q.unsqueeze(-2), d.unsqueeze(-1), _f16(raw, 2).unsqueeze(-1)
    if fmt in ("Q5_0", "Q5_1"):
        body = 2 if fmt == "Q5_0" else 4
        high = _bits(raw[..., body:body + 4], 32).to(torch.int32)
        q = _nibbles(raw[..., body + 4:]).to(torch.int32) | (high << 4)
        d = _f16(raw, 0)
        if fmt == "Q5_0":
            return (q - 16).unsqueeze(-2), d.unsqueeze(-1), None
        return q.unsqueeze(-2), d.unsqueeze(-1), _f16(raw, 2).unsqueeze(-1)
    if fmt == "Q8_0":
        q = raw[..., 2:].contiguous().view(torch.int8).to(torch.int32)
        return q.unsqueeze(-2), _f16(raw, 0).unsqueeze(-1), None
    if fmt in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw, 0), _f16(raw, 2)
        sc, m = _k_scales(raw[..., 4:16])
        if fmt == "Q4_K":
            q = _k_quants4(raw[..., 16:144]).to(torch.int32)
        else:
            # bit (2i) of qh[l] tops sub-block 2i's element l, bit (2i + 1) sub-block 2i + 1's
            qh = raw[..., 16:48]
            shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)
            high = ((qh.unsqueeze(-2) >> shifts.view(8, 1)) & 1).reshape(*lead, 256).to(torch.int32)
            q = _k_quants4(raw[..., 48:176]).to(torch.int32) | (high << 4)
        return (q.reshape(*lead, 8, 32), (d * sc).unsqueeze(-1), (-dmin * m).unsqueeze(-1))
    if fmt == "Q6_K":
        ql, qh = raw[..., 0:128].to(torch.int32), raw[..., 128:192].to(torch.int32)
        sc = raw[..., 192:208].contiguous().view(torch.int8).float()
        d = _f16(raw, 208)
        halves = []
        for h in range(2):
            lo, hi = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
            halves += [(lo[..., :32] & 0xF) | ((hi & 3) << 4), (lo[..., 32:] & 0xF) | (((hi >> 2) & 3) << 4),
                       (lo[..., :32] >> 4) | (((hi >> 4) & 3) << 4), (lo[..., 32:] >> 4) | (((hi >> 6) & 3) << 4)]
        q = torch.stack(halves, -2) - 32                      # [..., 8, 32]: 8 runs of 32 values
        q = q.reshape(*lead, 16, 16)                          # Q6_K scales cover 16 values each
        return q, (d * sc).unsqueeze(-1), None
    raise ValueError(f"GGUF type {fmt} is not supported")


def dequantize(raw: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, K / block_elems, block_bytes] -> [N, K] in `dtype` (computed in fp32 as
    ggml does: d * q (+ m), so fp32 results equal gguf.quants.dequantize bit for bit)."""
    q, scale, offset = _unpack(raw, fmt)
    values = q.float() * scale
    if offset is not None:
        values = values + offset
    return values.reshape(raw.shape[0], -1).to(dtype)


@dataclass
class Int4Weight:
    """One int4 matmul operand: packed weight and [K / 32, N, 2] bf16 (scale, zero)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor


def _int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Weight:
    """q [N, K/32, 32] in [0, 16), scale / zero [N, K/32, 1] -> torch's CPU int4 layout."""
    n = q.shape[0]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, -1).to(torch.int32).contiguous(), 1)
    scales_zeros = torch.cat((scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4Weight(packed, scales_zeros)


def to_int4(raw: torch.Tensor, fmt: str) -> list[Int4Weight]:
    """Raw blocks of a 4-bit type (or Q8_0) -> int4 operands whose products sum to x @ w.T."""
    q, scale, offset = _unpack(raw, fmt)
    n = raw.shape[0]
    q, scale = q.reshape(n, -1, GROUP), scale.reshape(n, -1, 1)
    offset = torch.zeros_like(scale) if offset is None else offset.reshape(n, -1, 1)
    if fmt == "Q8_0":   # q = 16 (h - 8) + l with h, l in [0, 16)
        u = q + 128
        return [_int4(u >> 4, 16 * scale, torch.zeros_like(scale)), _int4(u & 0xF, scale, 8 * scale)]
    if fmt == "Q4_0":   # _unpack gave q - 8
        return [_int4(q + 8, scale, offset)]
    return [_int4(q, scale, offset + 8 * scale)]


# Rows up to which the int4 kernel multiplies; more rows (prefill, large batches) dequantize
# the weight to bf16 for that one product and run a bf16 GEMM (oneDNN, AMX where the CPU has
# it): the int4 kernel's cost grows with the rows, the dequantize's does not (2026-11-30, 2
# cores, 4 layers of the default model: 64 rows 36 vs 48 ms, 256 rows 111 vs 63 ms; a
# 256-token TTFT 2-5x faster; benchmarks/RESULTS.md, issue 19). Neither path makes a row's
# result independent of what it is batched with (the int4 kernel's neither: a server test
# comparing concurrent streams with one offline batch passes and fails by timing), so
# greedy ids on this path may depend on the batch; dtype=float32 is the exact path.
# PAGEDSERVE_GGUF_INT4_MAX_ROWS=0: the int4 kernel for every product.
INT4_MAX_ROWS = int(os.environ.get("PAGEDSERVE_GGUF_INT4_MAX_ROWS", "64")) or None


@functools.cache
def _block_n() -> int:
    """torch's CPU int4 layout is [N / B, K, B / 2] bytes, byte j of a row holding output rows j
    (low nibble) and B / 2 + j (high); B depends on the CPU kernel torch picked (64 with AVX-512,
    32 with AVX2 only): read it off a probe's packing once."""
    q = torch.arange(128 * 64, dtype=torch.int32).view(128, 64) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for b in (64, 32, 16):
        p = packed.view(128 // b, 64, b // 2)
        if torch.equal(torch.cat((p & 0xF, p >> 4), -1).permute(0, 2, 1).reshape(128, 64).to(torch.int32), q):
            return b
    raise RuntimeError("torch's CPU int4 weight layout is not one this code can read")


def int4_dequantize(part: Int4Weight) -> torch.Tensor:
    """An int4 operand -> its weight as fp32 [N / B, K, B] (row B b + j is [b, :, j], B the layout's
    block: _block_n()): (q - 8) * scale + zero per group of 32 input features, as the kernel
    computes it."""
    block = _block_n()
    nb, k = part.scales_zeros.shape[1] // block, part.scales_zeros.shape[0] * GROUP
    p = part.packed.view(nb, k, block // 2)
    q = torch.cat((p & 0xF, p >> 4), -1).view(nb, k // GROUP, GROUP, block)
    sz = part.scales_zeros.view(k // GROUP, nb, block, 2).transpose(0, 1).unsqueeze(2).float()
    scale, zero = sz[..., 0], sz[..., 1]
    out = torch.empty(q.shape)
    return torch.addcmul(zero - 8 * scale, q, scale, out=out).view(nb, k, block)


def int4_matmul(x: torch.Tensor, parts: list[Int4Weight], max_rows: int | None = INT4_MAX_ROWS) -> torch.Tensor:
    """x [T, K] -> x @ w.T [T, N] in x's dtype (bf16 inside the kernel, fp32 sum of parts);
    for more than `max_rows` rows a bf16 GEMM on the weight dequantized for this call."""
    xb = x.to(torch.bfloat16)
    n = parts[0].scales_zeros.shape[1]
    if max_rows is not None and x.shape[0] > max_rows and n % _block_n() == 0:
        w = int4_dequantize(parts[0])
        for part in parts[1:]:
            w += int4_dequantize(part)
        out = torch.matmul(xb, w.to(torch.bfloat16))             # [N / B, T, B]
        return out.transpose(0, 1).reshape(x.shape[0], n).to(x.dtype)
    out = None
    for part in parts:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, part.packed, GROUP, part.scales_zeros)
        out = y.to(x.dtype) if out is None else out.add_(y)
    return out
