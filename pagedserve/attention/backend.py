"""Attention backends: the torch reference (any device) and the Triton kernels (CUDA).
A backend stores K/V by slot mapping and attends over the paged cache."""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.attention.torch_ref import StepPlan, as_cached, store_kv_ref

logger = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    name: str

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, meta: AttentionMetadata | None = None
                 ) -> None: ...

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, Hq, D]; key/value [T, Hkv, D] are this step's (already stored in the cache).
        Returns `out` (like query; allocated when None), written for the metadata's tokens."""

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, rotary: tuple) -> torch.Tensor | None:
        """Rotary (rotary = (embedding, positions)), KV store and attention of an all-decode
        step in one call -> [T, Hq * D], or None where the backend has no such call."""


class TorchBackend:
    """The torch reference; what the layers share of a step (valid slots, gather indices,
    masks) is planned once per step (StepPlan, keyed by the step's metadata object) and
    reused by every layer."""

    name = "torch"

    def __init__(self, decode_kernel: Callable | None = None) -> None:
        self._meta: AttentionMetadata | None = None
        self._plan: StepPlan | None = None
        self.decode_kernel = decode_kernel   # on CPU: gguf_cpu.decode_attention (select_backend)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, rotary: tuple) -> torch.Tensor | None:
        """Rotary, KV store and attention of an fp32 step's decodes in one call of the decode
        kernel -> [T, Hq * D]: an all-decode step whole; in a mixed step the decodes (its first
        rows) so, and its chunks rotated, stored and attended by the plan. None where there is no
        kernel or no decode (the caller runs the three). The kernel reads each decode's own
        blocks; the plan's decode group gathers every decode's padded to the longest (32 decodes
        of 200-1,000 tokens, 2 cores: 4.4 ms a layer against 12.9; benchmarks/RESULTS.md, session 58)."""
        if self.decode_kernel is None or not meta.num_decodes or q.dtype != torch.float32 \
                or k_cache.dtype != torch.float32:
            return None
        rope, positions = rotary
        decodes = meta.num_decodes
        if decodes == meta.num_seqs:
            return self.decode_kernel(q, k, v, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.slot_mapping,
                                      positions, rope.cos_cache, rope.sin_cache, scale)
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        out[:decodes] = self.decode_kernel(q[:decodes], k[:decodes], v[:decodes], k_cache, v_cache,
                                           meta.block_tables[:decodes], meta.seq_lens[:decodes],
                                           meta.slot_mapping[:decodes], positions[:decodes], rope.cos_cache,
                                           rope.sin_cache, scale)
        chunk_q, chunk_k = rope(positions[decodes:], q[decodes:], k[decodes:])
        store_kv_ref(chunk_k, v[decodes:], k_cache, v_cache, meta.slot_mapping[decodes:])
        chunks = self._plan_for(meta, k_cache.shape[1]).attend(chunk_q, k_cache, v_cache, scale, skip_decodes=True)
        out[decodes:] = chunks.flatten(1)
        return out

    def _plan_for(self, meta: AttentionMetadata, block_size: int) -> StepPlan:
        if meta is not self._meta:
            self._plan = StepPlan(meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.slot_mapping,
                                  meta.num_decodes, block_size)
            self._meta = meta
        return self._plan

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, meta: AttentionMetadata | None = None) -> None:
        if meta is None or slot_mapping is not meta.slot_mapping:
            store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
            return
        self._plan_for(meta, k_cache.shape[1]).store(key, value, k_cache, v_cache)

    def attend(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
        result = self._plan_for(meta, k_cache.shape[1]).attend(query, k_cache, v_cache, scale)
        return result if out is None else out.copy_(result)


class TritonBackend:
    """Decodes and short prefill chunks: the paged kernel (triton_paged_attention). A step whose
    longest chunk has at least `prefill_min_query_len` tokens sends only its decodes there; its
    chunks go to the FlashAttention-style Triton kernel (triton_prefill_attention: new K/V read
    contiguous, context through the block table), except in eager steps with a chunk of at
    least `sdpa_min_query_len` tokens:
    - long_chunk_path "cudnn_graph" (the default; needs nvidia-cudnn-frontend, else as "cudnn"):
      a step with such a chunk whose length or context is not a multiple of
      cudnn_shape_multiple sends ALL its chunks to one cuDNN graph call a layer that takes the
      lengths at run time (cudnn_prefill; K/V through the page table); other steps as "cudnn";
    - "cudnn": those chunks one sequence at a time through torch's cuDNN op (sdpa_prefill: new
      part causal + gathered context, merged by LSE) when their length and context are
      multiples of cudnn_shape_multiple, the rest through the Triton kernel;
    - "triton": those chunks one at a time through the Triton kernel on a contiguous copy of
      their context.
    With an FP8 cache (kv_cache_dtype) the kernels read K/V back into the query's dtype; the
    cuDNN graph and FA4 paths are skipped (torch's op takes the gathered context, converted).
    Before those, with `use_fa4` (flash-attn-4 installed, Hopper / Blackwell): such a step sends
    ALL its chunks to one FlashAttention-4 call a layer (fa4_prefill, K/V gathered into packed
    rows) once `prepare_fa4` has compiled its kernel (the model runner's set-up, where
    max_model_len reaches fa4_prefill.MIN_MODEL_LEN); without it, the paths above.
    The choices read host values only, so a CUDA-graph bucket always takes the same path."""

    name = "triton"
    prefill_min_query_len = 256
    sdpa_min_query_len = 1024
    use_sdpa = True  # the per-sequence / graph paths for long chunks (off: every chunk in one Triton launch)
    long_chunk_path = "cudnn_graph"  # a cuDNN path that ever fails is left (with a warning)
    # torch builds (and caches) one cuDNN graph per (s_q, s_kv): on the H200 long64's varied chunk
    # shapes made the cuDNN path 30.9 s vs 25.6 s Triton, while ttft16k's round chunks gained
    # (477 vs 537 ms). So torch's op takes only chunks whose length and context are multiples of this.
    cudnn_shape_multiple = 1024
    # The "cudnn_graph" steps' K/V: read through the page table ("paged") or gathered into a packed
    # copy first ("gathered"): level on long64 (H200: 24.07 / 23.96 s vs 24.03 / 23.98 s), so the
    # one without the copy's memory. On the same runs the graph path took long64 from 24.26 / 24.56 s
    # (default before) to ~24.0 s, and lost ttft16k's round chunks (505-512 vs 487-502 ms), which
    # therefore stay on torch's op (benchmarks/RESULTS.md, session 16).
    cudnn_graph_mode = "paged"
    # FlashAttention-4 for the steps above, where installed: on the H200 its kernel ran the long
    # chunks' shapes 3-17% faster than torch's cuDNN op (benchmarks/RESULTS.md, session 35). A
    # call that fails leaves it (with a warning) for the cuDNN paths.
    use_fa4 = True
    # All-decode steps of at most fused_decode_max_seqs sequences: rotary and the KV store inside
    # the decode attention launch (decode()), one launch a layer instead of two, bit for bit the
    # same; b1_decode llama-8b +2.8% (session 13). H200, one layer at context 512
    # (benchmarks/fused_decode_sweep.py; benchmarks/RESULTS.md, session 24): since the new key is
    # loaded with the query and stored before the loop, -2.0..-3.1 us a layer up to 64 rows and
    # -4.1..-5.6 us at 256 / 512 rows for llama-8b (before: +4.5 / +49 us, so the cap was 128;
    # and the layer took this path only up to the gemv's 64 rows until session 24). Unmeasured
    # above 512.
    fused_decode = True
    fused_decode_max_seqs = 512
    # The decode rows of a step (all-decode, or beside prompt chunks) when at least
    # cascade_plan.CASCADE_MIN_ROWS of them share a cached prefix of at least CASCADE_MIN_KEYS keys:
    # it is read once for all of them (triton_cascade; in the fused decode launch or the plain one).
    cascade = True

    def __init__(self) -> None:
        from pagedserve.attention.sdpa_prefill import gather_context, sdpa_available, sdpa_prefill_sequence
        from pagedserve.attention.triton_paged_attention import paged_attention
        from pagedserve.attention.triton_prefill_attention import prefill_attention
        from pagedserve.attention.triton_store_kv import RotaryStore, store_kv
        self._store_kv = store_kv
        self._paged_attention = paged_attention
        self._rotary_store = RotaryStore
        self._prefill_attention = prefill_attention
        self._sdpa_available = sdpa_available
        self._sdpa_prefill_sequence = sdpa_prefill_sequence
        self._gather_context = gather_context
        self._cudnn_prefill = None   # cudnn_prefill.CudnnPrefill, made at the first step that uses it
        self._fa4 = None   # fa4_prefill.Fa4Prefill, compiled by prepare_fa4

    def prepare_fa4(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                    device: torch.device) -> bool:
        """Compile FA4's prefill kernel for this model's layers where it is available (the model
        runner's set-up); whether long chunks will take it."""
        from pagedserve.attention import fa4_prefill
        if not self.use_fa4 or not fa4_prefill.available(device, dtype, head_dim):
            return False
        self._fa4 = self._fa4 or fa4_prefill.Fa4Prefill()
        return self._fa4.prepare(dtype, num_heads, num_kv_heads, head_dim, device)

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, meta: AttentionMetadata | None = None) -> None:
        self._store_kv(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, rotary: tuple) -> torch.Tensor | None:
        """Rotary (q and k unrotated), KV store and attention of an all-decode step in one launch
        (fused_decode, up to fused_decode_max_seqs sequences) -> [T, Hq * D]; None where it does
        not apply (the caller runs the three).
        The caller checks that the Triton kernels rotate this query (RotaryEmbedding.uses_triton)."""
        if not self.fused_decode or meta.max_query_len != 1 or meta.num_decodes != meta.num_seqs \
                or meta.num_seqs > self.fused_decode_max_seqs:
            return None
        rope, _ = rotary   # the launch takes each token's position as its seq_len - 1 (RotaryStore)
        out = self._paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                    scale, 1, meta.max_seq_len, num_decodes=meta.num_decodes,
                                    rotary_store=self._rotary_store(k, v, meta.slot_mapping, rope.cos_cache,
                                                                    rope.sin_cache),
                                    cascade=meta.cascade if self.cascade else None)
        return out.reshape(q.shape[0], -1)

    def attend(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
        num_decodes, num_seqs = meta.num_decodes, meta.num_seqs
        # the decode rows' shared prefix (mixed steps, all-decode steps past the fused launch's rows)
        cascade = meta.cascade if self.cascade and num_decodes else None
        if meta.max_query_len < self.prefill_min_query_len or num_decodes >= num_seqs:
            return self._paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc, scale, meta.max_query_len, meta.max_seq_len,
                                         num_decodes=num_decodes, out=out, cascade=cascade)
        out = torch.empty_like(query) if out is None else out
        if k_cache.dtype != query.dtype:   # an FP8 cache: the chunks' own keys as the cache holds them
            key, value = as_cached(key, k_cache.dtype), as_cached(value, v_cache.dtype)
        if num_decodes:  # the leading decodes alone: one token each, tokens [0, num_decodes)
            # (their rows only: a split launch sizes its fp32 partials and in-kernel merge by its tokens)
            self._paged_attention(query[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes],
                                  meta.seq_lens[:num_decodes], meta.query_start_loc[:num_decodes + 1],
                                  scale, 1, meta.max_seq_len, num_decodes=num_decodes, out=out[:num_decodes],
                                  cascade=cascade)
        qsl = meta.query_start_loc_host
        if self.use_sdpa and qsl is not None and meta.seq_lens_host is not None \
                and meta.max_query_len >= self.sdpa_min_query_len:
            # an FP8 cache (kv_cache_dtype): FA4 and the cuDNN graph read K/V as the query's dtype
            same_dtype = k_cache.dtype == query.dtype
            if self.use_fa4 and same_dtype and self._fa4 is not None and self._fa4.ready():
                try:
                    if self._fa4(query, k_cache, v_cache, meta, scale, out, num_decodes) is not None:
                        return out
                except Exception:   # the CuTe DSL's errors are its own types
                    logger.warning("FlashAttention-4 failed on a prefill step; long chunks use the cuDNN paths "
                                   "from now on", exc_info=True)
                    type(self).use_fa4 = False
            if self.long_chunk_path == "cudnn_graph" and same_dtype and self._has_uneven_long_chunk(meta) \
                    and self._cudnn_graph_usable(query):
                try:
                    return self._cudnn_prefill(query, k_cache, v_cache, meta, scale, out, num_decodes)
                except Exception:   # cudnn-frontend's errors are its own types
                    logger.warning("cuDNN's graph attention failed on a prefill step; long chunks use torch's "
                                   "cuDNN op / the Triton kernel from now on", exc_info=True)
                    type(self).long_chunk_path = "cudnn"
            cudnn = self.long_chunk_path in ("cudnn", "cudnn_graph") and self._sdpa_available(
                query.device, query.dtype, query.shape[2])
            try:
                return self._prefill_by_sequence(query, key, value, k_cache, v_cache, meta, scale, out, cudnn)
            except RuntimeError:
                if not cudnn:
                    raise
                logger.warning("torch's cuDNN attention failed on a prefill chunk; long chunks use the "
                               "Triton kernel from now on", exc_info=True)
                type(self).long_chunk_path = "triton"
        return self._triton_prefill(query, key, value, k_cache, v_cache, meta, scale, out, num_decodes,
                                    num_seqs, query.shape[0] - num_decodes, meta.max_seq_len)

    def _has_uneven_long_chunk(self, meta: AttentionMetadata) -> bool:
        """Whether a chunk of >= sdpa_min_query_len tokens has a length or context that is not a
        multiple of cudnn_shape_multiple (one torch's cuDNN op would not take)."""
        qsl, seq_lens, multiple = meta.query_start_loc_host, meta.seq_lens_host, self.cudnn_shape_multiple
        for s in range(meta.num_decodes, meta.num_seqs):
            query_len = int(qsl[s + 1] - qsl[s])
            if query_len >= self.sdpa_min_query_len and (query_len % multiple or (int(seq_lens[s]) - query_len)
                                                          % multiple):
                return True
        return False

    def _cudnn_graph_usable(self, query: torch.Tensor) -> bool:
        if self._cudnn_prefill is None or self._cudnn_prefill.mode != self.cudnn_graph_mode:
            from pagedserve.attention import cudnn_prefill
            if not (self._sdpa_available(query.device, query.dtype, query.shape[2]) and cudnn_prefill.available()):
                return False
            self._cudnn_prefill = cudnn_prefill.CudnnPrefill(self.cudnn_graph_mode)
        return True

    def _triton_prefill(self, query, key, value, k_cache, v_cache, meta, scale, out, seq_begin, seq_end,
                        max_tokens, max_keys) -> torch.Tensor:
        return self._prefill_attention(query, key, value, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, scale, out, seq_begin, seq_end, max_tokens,
                                       max_keys=max_keys)

    def _prefill_by_sequence(self, query, key, value, k_cache, v_cache, meta, scale, out,
                             cudnn: bool) -> torch.Tensor:
        """Chunks of >= sdpa_min_query_len tokens one at a time (cuDNN, or the Triton kernel on a
        contiguous copy of the context), each run of shorter ones in one Triton launch."""
        qsl, seq_lens = meta.query_start_loc_host, meta.seq_lens_host
        run_begin = None  # first sequence of the current run of short chunks
        multiple = self.cudnn_shape_multiple if cudnn else 1
        for s in range(meta.num_decodes, meta.num_seqs + 1):
            query_len = int(qsl[s + 1] - qsl[s]) if s < meta.num_seqs else 0
            context_len = int(seq_lens[s]) - query_len if s < meta.num_seqs else 0
            if s < meta.num_seqs and (query_len < self.sdpa_min_query_len or query_len % multiple
                                      or context_len % multiple):
                run_begin = s if run_begin is None else run_begin
                continue
            if run_begin is not None:
                self._triton_prefill(query, key, value, k_cache, v_cache, meta, scale, out, run_begin, s,
                                     int(qsl[s] - qsl[run_begin]), max(int(n) for n in seq_lens[run_begin:s]))
                run_begin = None
            if s == meta.num_seqs:
                break
            if cudnn:
                self._sdpa_prefill_sequence(query, key, value, k_cache, v_cache, meta.block_tables[s], int(qsl[s]),
                                            query_len, context_len, scale, out)
            else:
                context = self._gather_context(k_cache, v_cache, meta.block_tables[s], context_len) \
                    if context_len else None
                self._prefill_attention(query, key, value, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                        meta.query_start_loc, scale, out, s, s + 1, query_len, context=context,
                                        max_keys=int(seq_lens[s]))
        return out


def select_backend(device: torch.device, decodes: bool = True) -> AttentionBackend:
    """Triton on CUDA, the torch reference elsewhere; for a model that decodes (not an encoder's
    pooling), fp32 decodes on CPU take the C++ decode kernel (gguf_cpu.decode_attention: each
    sequence's own blocks, not the plan's padded group; fp32 in another order than SDPA's)."""
    if device.type == "cuda":
        return TritonBackend()
    from pagedserve.layers.quantization import gguf_cpu
    cpu_kernel = decodes and device.type == "cpu" and gguf_cpu.extension() is not None
    return TorchBackend(gguf_cpu.decode_attention if cpu_kernel else None)
