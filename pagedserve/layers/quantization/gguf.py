"""GGUF weights kept quantized: linear layers and the vocab embedding / LM head hold
llama.cpp's raw blocks (models/gguf_packed.py writes them, one uint8 `qweight` of
[rows, K / block_elems, block_bytes] per projection, rows already in HF order) and
process_weights_after_loading turns them into what the device multiplies fast:

    every type, on CPU              the blocks as they are: the C++ GEMV (gguf_cpu.cpp; Q4_0,
                                    Q4_1, Q8_0: activations quantized to Q8 blocks, integer
                                    dots; PAGEDSERVE_GGUF_Q8_ACT=0 or the other types: fp32
                                    activations and accumulation) for up to CPP_MAX_ROWS rows
                                    (Q8_MAX_ROWS with Q8 activations: an int8 GEMM), with the
                                    RMSNorm or SiLU-and-mul before it fused in; more rows: a
                                    GEMM on the weight dequantized for that call (bf16 where
                                    the CPU has native bf16, else fp32: gemm_dtype)
    Q4_0, Q4_1, Q4_K, Q8_0 on CPU   without a C++ compiler: torch's int4 kernel
                                    (gguf_kernels.to_int4; Q8_0 as two int4 halves)
    every type on CUDA,             dequantized once to a float `weight` (the model dtype), as is
    Q5_0, Q5_1, Q5_K, Q6_K on CPU   every type with dtype=float32 (the exact path)
    without the C++ kernels
    CUDA_PACKED_TYPES on CUDA with  layers of <= CUDA_PACKED_MAX_ELEMENTS weights keep their blocks
    PAGEDSERVE_GGUF_CUDA_PACKED=1   (less memory, slower): triton_gguf's GEMV for up to 16 rows (it
                                    takes every type), more rows dequantize the layer to the model
                                    dtype for that call (a Triton kernel) and run cuBLAS

The embedding looks rows up in the raw blocks and dequantizes only those (exact fp32).
QuantizationSpec("gguf", {"tensor_types": {checkpoint name: type}}, plus "dequantize": true
when dtype=float32 asks for exact fp32 arithmetic: detect.py, engine_args.py); a fused layer whose
projections do not share one type is stored dequantized by the converter and runs
unquantized here."""
from __future__ import annotations

import os
from functools import cache
from typing import Any, Callable

import torch
from torch import nn

from pagedserve.layers.quantization.base import (CheckpointTensor, LinearMethod, QuantizationConfig,
                                                 checkpoint_names, make_param)
from pagedserve.layers.quantization import gguf_cpu
from pagedserve.layers.quantization.gguf_kernels import FORMATS, dequantize, int4_matmul, to_int4

# Rows up to which the C++ kernels multiply the blocks; more rows dequantize the weight for
# that product and run a GEMM (gemm_dtype). fp32 activations (the GEMV reads the weight once
# per 4 rows): 16 (2026-12-01, 1 thread, 3072x576 Q4_1: 16 rows 0.96 ms against 1.63 ms, 32
# rows 3.5 ms against 2.0 ms). Q8 activations (Q4_0, Q4_1, Q8_0; the GEMM's tiles from 4
# rows, a row's values the same for any number of rows): Q8_MAX_ROWS, benchmarks/RESULTS.md.
CPP_MAX_ROWS = 16
Q8_MAX_ROWS = 64
# CUDA: keep the types triton_gguf multiplies packed (PAGEDSERVE_GGUF_CUDA_PACKED=1; benchmarks/
# gguf_gpu.py's A/B sets it) or dequantize every type once at load (the default since session 15:
# the whole default model on the H200, bf16, packed against dequantized: b1_decode 674 vs 1,071
# tok/s, 64 prompts 10.4k vs 28.6k out tok/s, one-at-a-time agreement with transformers 21/40 vs
# 30/40, for 125 vs 271 MB of weights; benchmarks/RESULTS.md); triton_gguf.GEMV_MAX_ROWS: its rows
CUDA_PACKED = os.environ.get("PAGEDSERVE_GGUF_CUDA_PACKED", "0") == "1"
# The types kept packed when asked: those whose one-row GEMV on the H200 was nearest cuBLAS on the
# dequantized weight (benchmarks/RESULTS.md, issue 19). triton_gguf takes every type (TYPE_IDS);
# benchmarks/gguf_gpu.py's packed variants set all of them.
CUDA_PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# ... and only layers of at most this many weights (rows x K; None: any). On the H200 the packed
# GEMV streams 0.4-0.8 TB/s: every 1B-class layer (2048 x 2048 and up) took 1.4-2.6x cuBLAS's time
# on its bf16 weight (session 10); larger layers (and a large vocab's embedding / LM head) are
# dequantized once even when packing is asked for.
CUDA_PACKED_MAX_ELEMENTS: int | None = 1 << 22


@cache
def gemm_dtype() -> torch.dtype:
    """The dtype of the GEMM for products of more rows: bf16 where the CPU multiplies it natively
    (AVX512-BF16 / AMX, oneDNN), else fp32: on an AVX2-only EPYC (2026-12-01, 1 thread, 3072x576
    Q4_1) 256 rows took 279 ms in bf16 against 32 ms dequantized to fp32 + sgemm."""
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() \
        else torch.float32


class GGUFConfig(QuantizationConfig):
    name = "gguf"

    def __init__(self, tensor_types: dict[str, str], int4: bool = True) -> None:
        self.tensor_types = tensor_types
        self.int4 = int4   # False: dequantize every type at load (fp32 arithmetic as the float model)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GGUFConfig":
        return cls(dict(config.get("tensor_types", {})), not config.get("dequantize", False))

    def _type_of(self, names: list[str]) -> str | None:
        types = {self.tensor_types.get(f"{name}.qweight") for name in names}
        if len(types) != 1:
            return None
        (fmt,) = types
        return fmt if fmt in FORMATS else None

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        fmt = self._type_of(checkpoint_names(prefix))
        return GGUFLinearMethod(fmt, self.int4) if fmt else None

    def get_embedding_method(self, prefix: str) -> "GGUFEmbeddingMethod | None":
        fmt = self._type_of([prefix])
        return GGUFEmbeddingMethod(fmt, self.int4) if fmt else None


def cpu_decode_stack(layers: list[nn.Module], positions: torch.Tensor, hidden: torch.Tensor,
                     residual: torch.Tensor | None, meta: Any, norm: nn.Module | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Llama decoder layers' all-decode step (fp32, up to the rows the layers' products take
    the C++ kernels for: _max_rows) in one C++ call (gguf_cpu.decode_stack: the calls their
    modules make, so the same values, with one team of threads through all layers) where every
    layer's attention backend has the C++ decode kernel and its projections run on the C++
    GEMV without biases, q/k norms or TP; else None (the modules run). With `norm` (the
    model's final RMSNorm), the output is normed in the same call, as cpu_final_norm's norm
    computes it."""
    if not layers or hidden.shape[0] > Q8_MAX_ROWS or hidden.dtype != torch.float32 \
            or meta.num_decodes != meta.num_seqs:
        return None
    first = layers[0]
    cached = first.__dict__.get("_gguf_decode_stack")
    caches = tuple(getattr(layer.self_attn.attn.k_cache, "data_ptr", int)() for layer in (first, layers[-1]))
    if cached is None or cached[0] != (len(layers), caches):   # built once per KV cache
        cached = ((len(layers), caches), _build_stack(layers))
        first.__dict__["_gguf_decode_stack"] = cached
    stack = cached[1]
    if stack is None or hidden.shape[0] > min(_max_rows(x) for x in _linears(first)):
        return None
    return stack.run(hidden, residual, meta.block_tables, meta.seq_lens, meta.slot_mapping, positions,
                     None if norm is None else norm.weight)


def cpu_final_norm(layers: list[nn.Module], norm: nn.Module) -> Callable:
    """The final norm for the steps the decode stack does not run: where the layers run on the
    C++ GEMV, the C++ norm the stack applies (the same values for a sequence whichever runs its
    step), else `norm` itself."""
    if layers and getattr(getattr(layers[-1].mlp, "down_proj", None), "gguf_cpp", False):
        return lambda x, residual: gguf_cpu.rms_norm(x, residual, norm.weight, norm.eps)
    return norm


def _build_stack(layers: list[nn.Module]):
    """The layers' DecodeStack, or None where one of them does not fit it."""
    tensors, types, q8 = [], [], set()
    if any(getattr(layer, "moe", False) for layer in layers):   # mixture-of-experts MLPs: the modules run
        return None
    for layer in layers:
        attn, linears = layer.self_attn, _linears(layer)
        if getattr(attn.attn.backend, "decode_kernel", None) is None or attn.qk_norm \
                or attn.attn.k_cache.dtype != torch.float32 or not all(
                getattr(x, "gguf_cpp", False) and x.bias is None and x.tp_size == 1 for x in linears):
            return None
        q8.update(x.gguf_q8 for x in linears)
        tensors.append([layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                        *(x.qweight for x in linears), attn.attn.k_cache, attn.attn.v_cache])
        types += [gguf_cpu.TYPE_IDS[x.quant_method.fmt] for x in linears]
    if len(q8) != 1:   # layers loaded under both settings
        return None
    attn, rope = layers[0].self_attn, layers[0].self_attn.rotary
    return gguf_cpu.decode_stack(tensors, types, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                 layers[0].input_layernorm.eps, rope.cos_cache, rope.sin_cache, attn.attn.scale,
                                 q8.pop())


def _linears(layer: nn.Module) -> tuple[nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _create_qweight(layer: nn.Module, fmt: str, rows: int, cols: int, **dims: Any) -> None:
    spec = FORMATS[fmt]
    if cols % spec.elems:
        raise ValueError(f"{getattr(layer, 'prefix', '')}: {cols} input features are not whole {fmt} blocks "
                         f"of {spec.elems}")
    make_param(layer, "qweight", (rows, cols // spec.elems, spec.nbytes), torch.uint8, **dims)


def _repack(layer: nn.Module, fmt: str, int4: bool, dtype: torch.dtype, keep_raw: bool = False) -> None:
    """qweight kept for the C++ kernels (CPU), or -> int4 parts (CPU without them: 4-bit types
    and Q8_0), or a dequantized `weight`."""
    raw = layer.qweight.data
    layer.int4_parts, layer.gguf_cpp, layer.gguf_q8 = None, False, False
    elements = raw.shape[0] * raw.shape[1] * FORMATS[fmt].elems
    layer.gguf_triton = _cuda_packed(raw.device, fmt, int4) and (CUDA_PACKED_MAX_ELEMENTS is None
                                                                   or elements <= CUDA_PACKED_MAX_ELEMENTS)
    if layer.gguf_triton:   # the blocks stay (the embedding looks rows up in them too)
        return
    if int4 and raw.device.type == "cpu" and gguf_cpu.extension() is not None:
        layer.gguf_cpp, layer.gguf_q8 = True, gguf_cpu.q8_activations()
        return
    if int4 and FORMATS[fmt].int4 and raw.device.type == "cpu":
        layer.int4_parts = to_int4(raw, fmt)
        for i, part in enumerate(layer.int4_parts):   # buffers: counted in the runner's weight_bytes
            layer.register_buffer(f"int4_packed_{i}", part.packed, persistent=False)
            layer.register_buffer(f"int4_scales_zeros_{i}", part.scales_zeros, persistent=False)
    else:
        layer.weight = nn.Parameter(dequantize(raw, fmt, dtype), requires_grad=False)
    if not keep_raw or layer.int4_parts is None:   # a float weight serves lookups too
        del layer.qweight


def _cuda_packed(device: torch.device, fmt: str, int4: bool) -> bool:
    """Whether a layer keeps its blocks for triton_gguf (CUDA, a type it takes, not dtype=float32's
    exact path, not turned off)."""
    return int4 and CUDA_PACKED and device.type == "cuda" and fmt in CUDA_PACKED_TYPES


def _max_rows(layer: nn.Module) -> int:
    """Rows up to which a product on this layer's blocks runs on the C++ kernels."""
    return Q8_MAX_ROWS if layer.gguf_q8 and layer.quant_method.fmt in gguf_cpu.Q8_TYPES else CPP_MAX_ROWS


def _cpp_rows(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether x takes the C++ kernels on this layer's blocks."""
    return layer.gguf_cpp and x.shape[0] <= _max_rows(layer)


def _matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if layer.gguf_triton:
        from pagedserve.layers.quantization import triton_gguf
        return triton_gguf.matmul(x, layer.qweight, layer.quant_method.fmt)
    if layer.gguf_cpp:
        fmt = layer.quant_method.fmt
        if _cpp_rows(layer, x):
            return gguf_cpu.gemv(x, layer.qweight, fmt, layer.gguf_q8)
        dtype = gemm_dtype()
        w = gguf_cpu.dequantize(layer.qweight, fmt, dtype)
        return torch.matmul(x.to(dtype), w.t()).to(x.dtype)
    parts = layer.int4_parts
    if parts is not None:
        return int4_matmul(x, parts)
    from pagedserve.layers.linear_ops import linear
    return linear(x, layer.weight)


class GGUFLinearMethod(LinearMethod):
    def __init__(self, fmt: str, int4: bool = True) -> None:
        self.fmt, self.int4 = fmt, int4

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        _create_qweight(layer, self.fmt, sum(output_partition_sizes), input_size_per_partition,
                        output_dim=0, input_dim=1, input_ratio=FORMATS[self.fmt].elems)
        layer.gguf_dtype = params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _repack(layer, self.fmt, self.int4, layer.gguf_dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = _matmul(layer, x)
        return out if bias is None else out + bias

    def independent_rows(self, layer) -> int:
        """The C++ kernels' rows (gguf_cpu.py: the GEMV, and from 4 rows the Q8 GEMM, do each row's
        arithmetic alike)."""
        return _max_rows(layer) if layer.gguf_cpp else 0

    def apply_normed(self, layer, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(norm(x + residual) @ w.T, x + residual) in one C++ call, or None (not fused here)."""
        if not _cpp_rows(layer, x):
            return None
        return gguf_cpu.gemv_normed(x, residual, norm.weight, norm.eps, layer.qweight, self.fmt, layer.gguf_q8)

    def apply_silu_and_mul(self, layer, gate_up: torch.Tensor) -> torch.Tensor | None:
        """(silu(gate) * up) @ w.T in one C++ call, or None (not fused here)."""
        if not _cpp_rows(layer, gate_up):
            return None
        return gguf_cpu.gemv_silu(gate_up, layer.qweight, self.fmt, layer.gguf_q8)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        spec = FORMATS[self.fmt]
        return {"qweight": CheckpointTensor((output_size, input_size // spec.elems, spec.nbytes), torch.uint8)}


class GGUFEmbeddingMethod:
    """Vocab embedding (and the LM head when tied or quantized): rows are vocab entries."""

    def __init__(self, fmt: str, int4: bool = True) -> None:
        self.fmt, self.int4 = fmt, int4

    def create_weights(self, layer: nn.Module, rows: int, hidden: int, params_dtype: torch.dtype) -> None:
        _create_qweight(layer, self.fmt, rows, hidden, output_dim=0)
        layer.gguf_dtype = params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _repack(layer, self.fmt, self.int4, layer.gguf_dtype, keep_raw=True)

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        if layer.gguf_triton:   # only these rows, exact in fp32 then rounded once, as below
            from pagedserve.layers.quantization import triton_gguf
            rows = triton_gguf.dequantize(layer.qweight[ids.reshape(-1)], self.fmt, layer.gguf_dtype)
            return rows.reshape(*ids.shape, rows.shape[-1])
        if layer.int4_parts is None and not layer.gguf_cpp:
            return torch.nn.functional.embedding(ids, layer.weight)
        rows = layer.qweight[ids]   # only these rows, exact; in one C++ call where it is built (the
        if layer.gguf_cpp:          # same values as the ~10 small torch ops: test_gguf_cpu, test_gguf_linear)
            return gguf_cpu.dequantize(rows, self.fmt, layer.gguf_dtype)
        return dequantize(rows, self.fmt, layer.gguf_dtype)

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return _matmul(layer, hidden)
