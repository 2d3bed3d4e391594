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


def set_norm_chain(on: bool) -> None:
    global NORM_CHAIN
    NORM_CHAIN = on


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): the Triton gemv for few rows of a large weight on CUDA, else F.linear."""
    if bias is None and x.shape[0] <= GEMV_MAX_ROWS and x.is_cuda:
        from pagedserve.layers.triton_gemv import gemv, use_gemv
        if use_gemv(x, weight, GEMV_MAX_ROWS):
            return gemv(x, weight)
    return F.linear(x, weight, bias)


def narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Slice a tensor or a safetensors slice along `dim` and return a tensor."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def as_tensor(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _copy(param: torch.Tensor, data: torch.Tensor) -> None:
    if param.shape != data.shape:
        raise ValueError(f"weight shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(data.shape)}")
    param.data.copy_(data.to(param.dtype))


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    _copy(param, as_tensor(loaded))
