"""A GGUF file's tensors in HF names with the quantized ones kept as llama.cpp's raw blocks:
what materialize_gguf (loader.py) caches instead of dequantized fp32 (4-6x smaller, and the
layers multiply the blocks directly: layers/quantization/gguf.py).

Quantized projections become `<name>.qweight`, uint8 [rows, K / block_elems, block_bytes];
float tensors (norms, biases, F16/BF16/F32 weights) stay `<name>.weight` in fp32. llama.cpp
permutes the rows of attn_q / attn_k for its rotary layout; the permutation is undone on
whole rows of blocks, bit-exact. Types without a kernel here (Q2_K, Q3_K, IQ*), and fused
projections (q/k/v, gate/up) whose types differ, are dequantized to fp32 by gguf.quants.
The types of the packed tensors go to gguf_quant.json beside the weights (quantization/
detect.py reads it: the model runs with quantization "gguf").
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from pagedserve.layers.quantization.gguf_kernels import FORMATS

QUANT_FILE = "gguf_quant.json"
ARCHITECTURES = ("llama", "qwen2", "qwen3")   # GGUF general.architecture values of the Llama family

_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def hf_name(gguf_name: str) -> tuple[str, str] | None:
    """'blk.3.attn_q.weight' -> ('model.layers.3.self_attn.q_proj', 'weight'); None if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}", suffix
    if base in _GLOBAL:
        return _GLOBAL[base], suffix
    return None


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (as transformers' reverse_permute_weights)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def _mixed_fused(tensors: dict[str, Any]) -> set[str]:
    """GGUF base names of fused projections whose types differ (kept as floats)."""
    mixed: set[str] = set()
    blocks = {m.group(1) for name in tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    for block in blocks:
        for group in _FUSED:
            names = [f"blk.{block}.{part}.weight" for part in group]
            types = {tensors[n].tensor_type.name for n in names if n in tensors}
            if len(types) > 1:
                mixed.update(names)
    return mixed


def convert(gguf_path: str, num_heads: int, num_kv_heads: int, progress: Any = None
            ) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """(HF name -> array, HF name -> GGUF type of the packed ones), or None when the file's
    architecture is not one this converter maps (the caller dequantizes it as before)."""
    import gguf
    reader = gguf.GGUFReader(gguf_path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch not in ARCHITECTURES:
        return None
    by_name = {t.name: t for t in reader.tensors}
    mixed = _mixed_fused(by_name)
    if progress is not None:
        progress.total = progress.n + len(by_name)
        progress.refresh()
    arrays: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for name, tensor in by_name.items():
        if progress is not None:
            progress.update()
        mapped = hf_name(name)
        if mapped is None:   # rope_freqs and other tensors the model computes itself
            continue
        base, suffix = mapped
        fmt = tensor.tensor_type.name
        rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else None
        packed = fmt in FORMATS and rows is not None and name not in mixed and suffix == "weight"
        if packed:
            data = np.asarray(tensor.data).reshape(rows, -1, FORMATS[fmt].nbytes)
        elif fmt in ("F32", "F16"):
            data = np.asarray(tensor.data, dtype=np.float32)
        else:
            data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        if rows is not None and not packed:
            data = data.reshape(rows, -1)
        if arch == "llama" and ".attn_q." in name:
            data = _unpermute(data, num_heads)
        elif arch == "llama" and ".attn_k." in name:
            data = _unpermute(data, num_kv_heads)
        key = f"{base}.qweight" if packed else f"{base}.{suffix}"
        arrays[key] = np.array(data, order="C")   # a copy: the reader's arrays are a read-only map
        if packed:
            types[key] = fmt
    return arrays, types
