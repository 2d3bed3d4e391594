"""The C++ GEMV on GGUF blocks (gguf_cpu.cpp: the torch functions, DecodeStack, the bindings;
gguf_cpu_gemv.cpp: the kernels; Q8 activations: gguf_cpu_q8.cpp; gguf_cpu_attention.cpp: the
decode attention, which every generative model's fp32 decodes on the CPU take, GGUF or not:
attention/backend.select_backend; gguf_cpu.h between them, gguf_cpu_phases.h: DecodeStack's work sharing):
decode-sized products on the CPU read the blocks the loader keeps,
fp32 accumulate, no repack. Compiled on first use into torch's
extensions cache (torch.utils.cpp_extension; -O3 -march=native, since it runs where it is
built); if that fails (no compiler), a warning and None: the callers keep torch's int4 path.

PAGEDSERVE_GGUF_CPP=0 turns it off for the layers loaded while it is set (A/B measurements).

Q8 activations (Q4_0, Q4_1, Q8_0 weights): the GEMV quantizes x per 32 values to int8 and
multiplies integers (as llama.cpp's Q4_1 x Q8_1 dot; AVX2, with a scalar fallback of the same
arithmetic), 7-9x faster per GEMV at one thread than fp32 activations on an AVX2-only EPYC
(benchmarks/RESULTS.md, issue 19, session 8) but rounded differently from the fp32 reference.
From 4 rows an int8 GEMM (register tiles of 4 rows x 2 weight rows) does each row's
arithmetic exactly as the GEMV would: a row's result does not depend on the batch.
PAGEDSERVE_GGUF_Q8_ACT=0 (read when the layers load) keeps fp32 activations: one prompt at a
time, the fp32 reference's greedy ids."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time
from functools import cache
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

Q8_TYPES = ("Q4_0", "Q4_1", "Q8_0")   # the types with Q8 activations (gguf_cpu.h's q8_type)
TYPE_IDS = {name: i for i, name in enumerate(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"))}
_SOURCES = [os.path.join(os.path.dirname(__file__), name)
            for name in ("gguf_cpu.cpp", "gguf_cpu_gemv.cpp", "gguf_cpu_q8.cpp", "gguf_cpu_attention.cpp")]
_HEADERS = [os.path.join(os.path.dirname(__file__), name) for name in ("gguf_cpu.h", "gguf_cpu_phases.h")]


def extension() -> ModuleType | None:
    """The compiled module, or None (off, or it does not build): what a layer loaded now runs."""
    return None if os.environ.get("PAGEDSERVE_GGUF_CPP", "1") == "0" else _load()


@cache
def _load() -> ModuleType | None:
    """Built once per source and torch version (torch's extensions cache), or None. A build
    made before is imported straight from the path recorded then (_built_record): importing
    torch.utils.cpp_extension (setuptools, distutils) costs 4 MiB of RSS and ~0.2 s."""
    name = f"pagedserve_gguf_cpu_{_source_digest()}"
    module = _import_built(name)
    if module is not None:
        return module
    from torch.utils.cpp_extension import load
    start = time.perf_counter()
    logger.info("C++ CPU kernels (GGUF GEMV, decode attention): compiling or loading %s (torch extensions cache; "
                "the first build takes ~30 s)",
                ", ".join(os.path.basename(p) for p in _SOURCES))
    try:
        module = load(name=name, sources=_SOURCES, verbose=False,
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:   # noqa: BLE001  (no compiler, no headers: keep the torch path)
        logger.warning("C++ CPU kernels unavailable (%s: %s); GGUF layers use torch's int4 kernel, decodes torch's "
                       "SDPA", type(exc).__name__, str(exc).splitlines()[-1] if str(exc) else "")
        return None
    logger.info("C++ CPU kernels ready in %.1f s", time.perf_counter() - start)
    _record_built(name, module.__file__)
    return module


def _built_record(name: str) -> str:
    """The file naming the build of `name` (the sources' digest) for this torch and Python:
    beside the build in torch's extensions cache is unknown until cpp_extension is imported."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = f"{name}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}".replace("+", "_")
    return os.path.join(base, "pagedserve", "extensions", key + ".path")


def _record_built(name: str, path: str | None) -> None:
    if not path:
        return
    record = _built_record(name)
    try:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        tmp = f"{record}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(path)
        os.replace(tmp, record)
    except OSError as exc:   # a read-only cache: the next start goes through cpp_extension again
        logger.debug("cannot record the GGUF CPU kernels' build: %s", exc)


def _import_built(name: str) -> ModuleType | None:
    """The module built before from these sources for this torch, or None (never built, the
    record or the build gone, or it does not import: then cpp_extension builds it again)."""
    try:
        with open(_built_record(name)) as f:
            path = f.read().strip()
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:   # noqa: BLE001  (missing, stale or unreadable: rebuild through cpp_extension)
        return None
    logger.info("C++ CPU kernels loaded from %s", path)
    return module


def _source_digest() -> str:
    """The build's name carries the sources' hash (the headers' too): checkouts of different
    versions (git worktrees) share torch's extensions cache without rebuilding over each
    other's build."""
    digest = hashlib.sha256()
    for path in (*_SOURCES, *_HEADERS):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def q8_activations() -> bool:
    """Whether layers loaded now quantize their GEMV's activations to Q8 (PAGEDSERVE_GGUF_Q8_ACT,
    default on); the types without that path (Q5_*, K-quants) keep fp32 activations anyway."""
    return os.environ.get("PAGEDSERVE_GGUF_Q8_ACT", "1") != "0"


def gemv(x: torch.Tensor, raw: torch.Tensor, fmt: str, q8: bool = False) -> torch.Tensor:
    """x [M, K] @ dequantize(raw).T -> [M, N] in x's dtype (fp32 inside; q8: x as Q8 blocks)."""
    return _load().gemv(x, raw, TYPE_IDS[fmt], q8)


def row_matmul(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ wt [K, N] in x's dtype (fp32 inside), each row's values computed alike whatever
    M is (torch's CPU matmul rounds a row differently at M = 1 and M > 1)."""
    return _load().row_matmul(x, wt)


def gemv_normed(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                raw: torch.Tensor, fmt: str, q8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * norm_weight @ dequantize(raw).T, x + residual); x without a residual."""
    return _load().gemv_normed(x, residual, norm_weight, eps, raw, TYPE_IDS[fmt], q8)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), as the decode stack's final norm."""
    return _load().rms_norm(x, residual, weight, eps)


def gemv_silu(gate_up: torch.Tensor, raw: torch.Tensor, fmt: str, q8: bool = False) -> torch.Tensor:
    """(silu(gate) * up) @ dequantize(raw).T for gate_up = [gate | up]."""
    return _load().gemv_silu(gate_up, raw, TYPE_IDS[fmt], q8)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
                     positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """An all-decode step of one layer, fp32: q [S, Hq, D], k / v [S, Hkv, D] rotated (neox),
    k / v stored at slot_mapping, attention over each sequence's blocks -> [S, Hq * D]."""
    return _load().decode_attention(q, k, v, k_cache, v_cache, block_tables, seq_lens, slot_mapping, positions,
                                    cos_cache, sin_cache, scale)


def decode_stack(layers: list, types: list[int], num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 cos_cache: torch.Tensor, sin_cache: torch.Tensor, scale: float, q8: bool = False):
    """Llama decoder layers' all-decode steps in one C++ call each (DecodeStack.run(hidden,
    residual, block_tables, seq_lens, slot_mapping, positions, final_norm) -> (output, residual),
    the output through rms_norm(output + residual) * final_norm where that is not None): per layer
    [norm1, norm2, qkv, o, gate_up, down, k_cache, v_cache] (raw blocks; held, not copied) and
    the four projections' type ids; q8: Q8 activations, as the layers' gemv calls."""
    return _load().DecodeStack([t for layer in layers for t in layer], types, num_heads, num_kv_heads, head_dim, eps,
                               cos_cache, sin_cache, scale, q8)


def dequantize(raw: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw blocks [N, K / elems, nbytes] -> [N, K] in `dtype` (scale * q + offset, one fp32 FMA:
    within an fp32 rounding of gguf.quants.dequantize)."""
    return _load().dequantize(raw, TYPE_IDS[fmt], dtype == torch.bfloat16).to(dtype)
