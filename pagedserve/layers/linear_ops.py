"""What linear layers and their quantization methods share below them: the float matmul
(with the Triton gemv for decode-sized batches on CUDA) and the helpers that slice a
checkpoint tensor or lazy safetensors slice. layers/linear.py re-exports them."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# Decode-sized batches (at most this many rows) of bf16/fp16 on CUDA go through the Triton
# gemv (layers/triton_gemv.py) where it streams the weights faster than cuBLAS
# (benchmarks/gemv_sweep.py: its tables decide per row bucket and weight shape), and take the
# decode fusions below (rotary + KV store in one launch); 0 turns both off (A/B
# measurements). The runner sets it from DeviceConfig.gemv_max_rows when it loads the model.
GEMV_MAX_ROWS = 64


def set_gemv_max_rows(rows: int) -> None:
    global GEMV_MAX_ROWS
    GEMV_MAX_ROWS = rows


# Decode-sized batches on the gemv path also fuse SiLU-and-mul into the gemv that consumes it,
# and rotary into the KV store (layers/linear.py, layers/attention.py); all-decode steps take
# rotary and the KV store into the attention launch up to the backend's own row cap
# (TritonBackend.fused_decode_max_seqs, past GEMV_MAX_ROWS). Off for A/B measurements
# (benchmarks/decode_gpu.py), as is GEMV_MAX_ROWS = 0.
FUSE_DECODE = True


def set_decode_fusion(on: bool) -> None:
    global FUSE_DECODE
    FUSE_DECODE = on


def decode_fusion() -> bool:
    """Whether the decode fusions are on (FUSE_DECODE, and GEMV_MAX_ROWS not 0)."""
    return FUSE_DECODE and GEMV_MAX_ROWS > 0


# A one-row CUDA forward of float layers chains each residual add + RMSNorm through the gemvs
# around it (models/llama.py, triton_gemv's add_gemv / rms_norm_gemv) instead of a norm launch
# between them; with the decode fusions. Off for A/B measurements.
NORM_CHAIN = True
NORM_CHAIN_ON_CPU = False   # tests: the chain's launches under Triton's interpreter on CPU (fp16)


def norm_chain() -> bool:
    return NORM_CHAIN and decode_fusion()


# (A one-launch decode attention, rotary + KV store + attention + split-K merge, was measured at
# +0.8% / +0.2% of b1_decode on llama-1b / 8b, 30/40 bf16 agreement, 1.2e-7 from the generic path
# in one of 8 shapes: deleted in session 8 as a second, inexact path; benchmarks/RESULTS.md.)


def fuses(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether x (and a float weight) takes the fused decode path: few rows on CUDA."""
    if not (FUSE_DECODE and x.is_cuda and 0 < x.shape[0] <= GEMV_MAX_ROWS):
        return False
    from pagedserve.layers.triton_gemv import fusable
    return weight is None or fusable(x, weight, GEMV_MAX_ROWS)


# (rows M, N, K) -> M': row counts at which cuBLAS's own choice of kernel for a weight of this shape
# is slow and the product of the rows padded to M' is faster, copy included (benchmarks/
# decode_gemm_sweep.py on an H200, torch 2.11 + CUDA 13, 2026-12-04: llama-8b's gate_up at the 448-row
# decode bucket took 269 us, 163 padded to 512; RESULTS.md session 28). Decode buckets and mixed-step
# token counts of llama-1b / 8b shapes; bf16 / fp16 on CUDA only.
PAD_ROWS: dict[tuple[int, int, int], int] = {
    (448, 28672, 4096): 512, (320, 6144, 4096): 384, (832, 6144, 4096): 896, (832, 128256, 4096): 864,
    (416, 3072, 2048): 512, (704, 2048, 2048): 768, (832, 2048, 2048): 864, (576, 2048, 8192): 640,
    (832, 128256, 2048): 864,
}
_PAD_DTYPES = (torch.bfloat16, torch.float16)


def padded_linear(x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """x @ weight.T computed on x's rows copied into the first rows of a [rows, K] buffer: each
    output row depends on its own input row only, so the padding rows (left uninitialised) change
    nothing; returns the first x.shape[0] rows (a contiguous view)."""
    xp = x.new_empty(rows, x.shape[1])
    xp[:x.shape[0]].copy_(x)
    return F.linear(xp, weight)[:x.shape[0]]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): the Triton gemv for few rows of a large weight on CUDA; cuBLAS on
    padded rows where PAD_ROWS names the shape; else F.linear."""
    if bias is None and x.is_cuda:
        if x.shape[0] <= GEMV_MAX_ROWS:
            from pagedserve.layers.triton_gemv import gemv, use_gemv
            if use_gemv(x, weight, GEMV_MAX_ROWS):
                return gemv(x, weight)
        elif x.dim() == 2 and weight.dtype in _PAD_DTYPES and (rows := PAD_ROWS.get((x.shape[0], *weight.shape))):
            return padded_linear(x, weight, rows)
    return F.linear(x, weight, bias)


def narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Slice a tensor or a safetensors slice along `dim` and return a tensor."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def as_tensor(loaded: Any) -> torch.Tensor:
    if isinstance(loaded, torch.Tensor):
        return loaded
    try:
        return loaded[:]
    except IndexError:   # a 0-dim safetensors slice (an FP8 checkpoint's k_scale) takes no slice
        return loaded[()]


def _copy(param: torch.Tensor, data: torch.Tensor) -> None:
    if param.shape != data.shape:
        raise ValueError(f"weight shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(data.shape)}")
    param.data.copy_(data.to(param.dtype))


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    _copy(param, as_tensor(loaded))
