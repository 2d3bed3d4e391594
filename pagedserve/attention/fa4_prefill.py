"""Every prefill chunk of an eager step in ONE call a layer of FlashAttention-4's forward kernel
(Dao-AILab's flash-attn-4, CuTe DSL; optional: `pip install 'pagedserve[fa4]'`; NVIDIA Hopper and
Blackwell), the K/V of each chunk's sequence gathered out of the paged cache into packed rows first:

    q          the step's prefill rows [T, Hq, D] from the first prefill token (strided view, as given)
    k / v      [sum of seq_lens, Hkv, D]: sequence i's keys 0 .. seq_len_i - 1, one index_select
    cu_seqlens each chunk's first row in q / each sequence's first row in k / v (int32, device)
    mask       causal aligned bottom-right: query row j of a chunk of L after C cached tokens sees
               keys [0, C + j], as in every other backend

Why (benchmarks/RESULTS.md, session 35; benchmarks/fa4_probe.py on the H200, llama-8b heads, bf16):
FA4's Hopper kernel ran the long-prefill shapes 3-17% faster than torch's cuDNN op, the default
before (a fresh 16k chunk 657.6 against 618.2 TFLOP/s; 3,000 after 9,000 686 against 568), and its
paged-KV path, on this engine's 16-token pages (below its TMA page size), 11-27% slower than the
packed one: hence the gather (an index_select of each K and V, ~2-5% of the attention's time at those shapes).

FA4 compiles (CuTe DSL -> cubin) one kernel per configuration at its first call: ~4.7 s on the H200,
after ~7 s importing the DSL, both holding the GIL (compiled on a background thread while long64 ran,
it stalled the engine's host thread: long64 22.0 -> 25.9 s). So the model runner compiles it at the end of set-up
(`Fa4Prefill.prepare`), where max_model_len reaches MIN_MODEL_LEN, under torch's FakeTensorMode (nothing
is launched), with FA4's on-disk cache on (a later start loads it). Every call fixes what would
otherwise select another kernel (num_splits 1, the lengths given as host ints past one tile, no
LSE), so the kernel compiled is the one the steps use; a call that still spends seconds on the host
(a compile) is logged.

`reference_execute` computes what the call computes from the same inputs in torch math (fp32): the
CPU tests' stand-in for the kernel, checked against it on the GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pagedserve.attention.cudnn_prefill import _to_device, gather_kv, packed_kv_slots

logger = logging.getLogger(__name__)

# set-up imports FA4 and compiles its kernel (~12 s on the H200 the first time) only where prompts this
# long fit: an engine of max_model_len 2048 (peers.py's) has chunks of at most 2048 tokens, which the cuDNN
# op runs nearly as fast
MIN_MODEL_LEN = 4096
# a step whose sequences hold more keys than this many per token of the step takes the cuDNN paths: the
# packed K/V copy (4 KiB a key for llama-8b) then stays below the step's own MLP activations (57 KiB a
# token), which the start-up profile sized the KV cache around
MAX_KEYS_PER_TOKEN = 4
SLOW_CALL_S = 1.0   # host time of one call past which it compiled something (a call queues in ~0.1 ms)


@functools.cache
def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FA4 can take this layer's prefill: CUDA compute capability 9.x / 10.x, fp16 / bf16,
    a head dim it compiles for, flash-attn-4 installed and importable (finding its module imports the
    package: ~7 s on the H200, the CuTe DSL; a process asks once)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 128:
        return False
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return False
    # FA4's on-disk kernel cache (a later start loads what this one compiled): read when it is first
    # imported, which finding its module below does
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    try:
        return importlib.util.find_spec("flash_attn.cute.interface") is not None
    except ImportError:   # not installed (or FlashAttention-2's flash_attn without cute)
        return False
    except Exception:     # installed but does not import here (its CUDA DSL libraries, ...)
        logger.warning("flash-attn-4 is installed but does not import; long prefill chunks keep the cuDNN paths",
                       exc_info=True)
        return False


@dataclass
class Fa4Inputs:
    """One step's prefill sequences [seq_begin, seq_end) as the kernel takes them (every layer's)."""

    token_begin: int            # the first prefill token's row in the step
    num_tokens: int             # rows from token_begin
    max_query_len: int
    max_seq_len: int
    cu_seqlens_q: torch.Tensor  # [n + 1] int32
    cu_seqlens_k: torch.Tensor  # [n + 1] int32
    kv_slots: torch.Tensor      # [sum of seq_lens] int64: the packed keys' cache slots


def plan_inputs(query_start_loc: Sequence[int], seq_lens: Sequence[int], block_tables: torch.Tensor,
                seq_begin: int, seq_end: int, block_size: int) -> Fa4Inputs:
    """The inputs of sequences [seq_begin, seq_end) from the step's host query_start_loc / seq_lens
    and device block_tables."""
    token_begin = int(query_start_loc[seq_begin])
    q_lens = [int(query_start_loc[s + 1]) - int(query_start_loc[s]) for s in range(seq_begin, seq_end)]
    kv_lens = [int(seq_lens[s]) for s in range(seq_begin, seq_end)]
    cu_q, cu_k = [0], [0]
    for q_len, kv_len in zip(q_lens, kv_lens):
        cu_q.append(cu_q[-1] + q_len)
        cu_k.append(cu_k[-1] + kv_len)
    cu = _to_device(torch.tensor([cu_q, cu_k], dtype=torch.int32), block_tables.device)
    width = -(-max(kv_lens) // block_size)
    slots = packed_kv_slots(block_tables[seq_begin:seq_end, :width], kv_lens, block_size)
    return Fa4Inputs(token_begin, cu_q[-1], max(q_lens), max(kv_lens), cu[0], cu[1], slots)


def reference_execute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: Fa4Inputs, scale: float,
                      out: torch.Tensor) -> None:
    """What the kernel computes (fp32 math): q / out the step's rows from token_begin, k / v packed."""
    cu_q, cu_k = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    group = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        qi = q[cu_q[i]:cu_q[i + 1]].float()
        ki = k[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(group, dim=1)
        vi = v[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        visible = torch.arange(lk, device=q.device)[None, :] <= (torch.arange(lq, device=q.device) + lk - lq)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[cu_q[i]:cu_q[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi).to(out.dtype)


def _kernel_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float, out: torch.Tensor) -> None:
    """The one FA4 call, as torch's own FA4 binding makes it (torch.nn.attention._fa4), writing `out`."""
    from flash_attn.cute.interface import _flash_attn_fwd
    _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                    softmax_scale=scale, causal=True, num_splits=1, out=out)


def compile_kernel(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                   device: torch.device) -> None:
    """Compile (and cache in this process) the kernel every step's call uses, launching nothing:
    the call on fake tensors of the steps' layout (q a strided view of the qkv rows), lengths past
    one tile (as every step's: TritonBackend.sdpa_min_query_len, 1,024, is past it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        rows, keys = 640, 896
        qkv = torch.empty(rows, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
        k = torch.empty(keys, num_kv_heads, head_dim, dtype=dtype, device=device)
        cu_q = torch.empty(3, dtype=torch.int32, device=device)
        cu_k = torch.empty(3, dtype=torch.int32, device=device)
        out = torch.empty(rows, num_heads, head_dim, dtype=dtype, device=device)
        _kernel_call(qkv[:, :num_heads], k, torch.empty_like(k), cu_q, cu_k, 384, 640, head_dim ** -0.5, out)


class Fa4Prefill:
    """The prefill chunks of a step through one FA4 call a layer (see the module's docstring).
    `executor(q, k, v, inputs, scale, out)` replaces the kernel call and `compiler(dtype, heads,
    kv heads, head dim, device)` its compile (tests)."""

    def __init__(self, executor: Callable | None = None, compiler: Callable | None = None) -> None:
        self.executor = executor
        self.compiler = compiler or compile_kernel
        self.state = "cold"    # -> "ready" | "failed"
        self._meta = None
        self._step_key: tuple | None = None
        self._inputs: Fa4Inputs | None = None
        self._slow_logged = False

    def ready(self) -> bool:
        return self.state == "ready"

    def prepare(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                device: torch.device) -> bool:
        """Compile (or load from FA4's disk cache) the kernel the steps use; whether it is ready."""
        if self.state != "cold":
            return self.ready()
        t0 = time.perf_counter()
        try:
            self.compiler(dtype, num_heads, num_kv_heads, head_dim, device)
        except Exception:
            logger.warning("FlashAttention-4 did not compile; long prefill chunks keep the cuDNN paths", exc_info=True)
            self.state = "failed"
            return False
        logger.info("FlashAttention-4 prefill kernel ready in %.1f s (compiled, or loaded from its cache)",
                    time.perf_counter() - t0)
        self.state = "ready"
        return True

    def _step_inputs(self, meta, seq_begin: int, block_size: int) -> Fa4Inputs | None:
        """The step's inputs, planned once a step for every layer; None where its sequences' keys pass
        MAX_KEYS_PER_TOKEN a token of the step."""
        if meta is not self._meta or self._step_key != (seq_begin, block_size):
            fits = sum(int(n) for n in meta.seq_lens_host[seq_begin:meta.num_seqs]) <= \
                MAX_KEYS_PER_TOKEN * int(meta.query_start_loc_host[meta.num_seqs])
            self._inputs = plan_inputs(meta.query_start_loc_host, meta.seq_lens_host, meta.block_tables,
                                       seq_begin, meta.num_seqs, block_size) if fits else None
            self._meta, self._step_key = meta, (seq_begin, block_size)
        return self._inputs

    def __call__(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
                 out: torch.Tensor, seq_begin: int) -> torch.Tensor | None:
        """Attention of sequences [seq_begin, num_seqs) of the step (its prefill chunks, their
        K/V already stored) into out; needs the step's host lists (eager steps). None (nothing
        done) where their keys pass MAX_KEYS_PER_TOKEN a token of the step."""
        inputs = self._step_inputs(meta, seq_begin, k_cache.shape[1])
        if inputs is None:
            return None
        rows = slice(inputs.token_begin, inputs.token_begin + inputs.num_tokens)
        k, v = gather_kv(k_cache, inputs), gather_kv(v_cache, inputs)
        if self.executor is not None:
            self.executor(query[rows], k, v, inputs, scale, out[rows])
            return out
        t0 = time.perf_counter()
        _kernel_call(query[rows], k, v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.max_query_len,
                     inputs.max_seq_len, scale, out[rows])
        host_s = time.perf_counter() - t0
        if host_s > SLOW_CALL_S and not self._slow_logged:
            self._slow_logged = True
            logger.warning("a FlashAttention-4 prefill call took %.1f s on the host: it compiled a kernel the "
                           "set-up compile did not (step of %d rows, %d sequences)", host_s,
                           inputs.num_tokens, len(inputs.cu_seqlens_q) - 1)
        return out
