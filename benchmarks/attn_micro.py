"""attn_gpu.py's micro and cudnn_shapes stages: prefill attention alone (the paged kernel, the
prefill kernel and its tiles, torch SDPA's backends, varlen_attn) in TFLOP/s of causal FLOP, and
what a chunk shape cuDNN has not seen costs."""
from __future__ import annotations

import time

from attn_common import DEV, HKV, HQ, SMOKE, D, Paged, bench_ms, causal_flop, emit
import torch
import triton

from pagedserve.attention.triton_prefill_attention import PrefillTiles, default_prefill_tiles


# ---------------------------------------------------------------------------------------- micro
def sdpa_refs(b: Paged) -> dict[str, float]:
    """torch SDPA backends on a fresh causal prompt (q/k/v [1, H, T, D]); ms per call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    q = b.query.transpose(0, 1).unsqueeze(0)
    k = b.key.transpose(0, 1).unsqueeze(0)
    v = b.value.transpose(0, 1).unsqueeze(0)
    k_full = k.repeat_interleave(HQ // HKV, dim=1)
    v_full = v.repeat_interleave(HQ // HKV, dim=1)
    results = {}
    backends = [("sdpa_math", SDPBackend.MATH)] if SMOKE else \
        [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
         ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)]
    for name, kind in backends:
        for gqa in (True, False):
            try:
                with sdpa_kernel([kind]):
                    if gqa:
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                    else:
                        fn = lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)  # noqa: E731
                    fn()
                    results[name + ("_gqa" if gqa else "_expanded")] = bench_ms(fn)
            except Exception as exc:  # a backend that does not take these shapes
                results[name + ("_gqa" if gqa else "_expanded")] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
    return results


def varlen_ref(b: Paged) -> float | str:
    """torch.nn.attention.varlen.varlen_attn over contiguous context + new K/V (bottom-right causal)."""
    try:
        import inspect
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
        ctx, qlen = b.context_lens[0], b.query_lens[0]
        k_ctx = b.k_cache[b.block_tables[0].long()].reshape(-1, HKV, D)[:ctx]
        v_ctx = b.v_cache[b.block_tables[0].long()].reshape(-1, HKV, D)[:ctx]
        k = torch.cat([k_ctx, b.key]).contiguous()
        v = torch.cat([v_ctx, b.value]).contiguous()
        cu_q = torch.tensor([0, qlen], dtype=torch.int32, device=DEV)
        cu_k = torch.tensor([0, ctx + qlen], dtype=torch.int32, device=DEV)
        kw = {}
        if "window_size" in params:
            kw["window_size"] = (-1, 0)
        elif "is_causal" in params:
            if ctx:
                return "unavailable: no window_size (is_causal is top-left aligned)"
            kw["is_causal"] = True
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
        fn = lambda: varlen_attn(b.query, k, v, cu_q, cu_k, qlen, ctx + qlen, scale=b.scale, **kw)  # noqa: E731
        got = fn()
        out = torch.empty_like(b.query)
        err = float((got.float() - b.prefill(out).float()).abs().max())
        ms = bench_ms(fn)
        emit(stage="micro", case=f"varlen_vs_prefill_kernel_ctx{ctx}", max_abs=err)
        return ms
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {str(exc)[:160]}"


# the two best of a first sweep on the H200 (fresh16k / chunk8k_after8k) beside the default
SWEEP = [PrefillTiles(128, 128, 8, 3), PrefillTiles(128, 64, 8, 4)]


def stage_micro() -> None:
    cases = [("fresh", [300], [0]), ("chunk", [150], [150])] if SMOKE else \
        [("fresh16k", [16384], [0]), ("chunk8k_after8k", [8192], [8192]),
         ("fresh2k", [2048], [0]), ("chunk512_after4k", [512], [4096]), ("fresh1k", [1024], [0]),
         ("fresh256", [256], [0]), ("chunks4x256_after1k", [256] * 4, [1024] * 4)]
    rows = []
    for label, qls, cls in cases:
        b = Paged(qls, cls, torch.float32 if SMOKE else torch.bfloat16, seed=3)
        flop = causal_flop(qls, cls)
        out = torch.empty_like(b.query)
        timings: dict[str, float | str] = {"paged_kernel": bench_ms(lambda: b.paged(out=out))}
        default = default_prefill_tiles(b.query.dtype, triton.next_power_of_2(D))
        timings["prefill_kernel"] = bench_ms(lambda: b.prefill(out))
        timings["prefill_kernel_kv_from_cache"] = bench_ms(lambda: b.prefill(out, from_cache=True))
        if len(qls) == 1 and (SMOKE or b.query.is_cuda):
            try:
                sdpa_out = torch.empty_like(b.query)
                err = float((b.sdpa_by_sequence(sdpa_out).float() - b.prefill(out).float()).abs().max()) \
                    if not SMOKE else 0.0
                emit(stage="micro", case=label, check="sdpa_by_sequence_vs_prefill_kernel", max_abs=err)
                timings["sdpa_by_sequence"] = bench_ms(lambda: b.sdpa_by_sequence(sdpa_out))
            except Exception as exc:
                timings["sdpa_by_sequence"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        if len(qls) == 1:
            err = float((b.triton_by_sequence(torch.empty_like(b.query)).float() - b.prefill(out).float()).abs().max())
            emit(stage="micro", case=label, check="triton_by_sequence_vs_prefill_kernel", max_abs=err)
            timings["triton_by_sequence"] = bench_ms(lambda: b.triton_by_sequence(out))
        if not SMOKE:
            for t in SWEEP:
                if t == default:
                    continue
                name = f"prefill_{t.block_m}x{t.block_n}_w{t.num_warps}_s{t.num_stages}"
                try:
                    timings[name] = bench_ms(lambda: b.prefill(out, tiles=t))
                except Exception as exc:  # e.g. out of shared memory
                    timings[name] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        if cls[0] == 0:
            timings.update(sdpa_refs(b))
        elif len(qls) == 1:  # what copying the context to contiguous K/V would cost (per layer)
            index = b.block_tables[0].long()
            timings["gather_context_kv_only"] = bench_ms(
                lambda: (b.k_cache[index].reshape(-1, HKV, D)[:cls[0]].contiguous(),
                         b.v_cache[index].reshape(-1, HKV, D)[:cls[0]].contiguous()))
        if len(qls) == 1:
            timings["varlen_attn"] = varlen_ref(b)
        for name, ms in timings.items():
            tflops = round(flop / (ms * 1e-3) / 1e12, 1) if isinstance(ms, float) else None
            emit(stage="micro", case=label, kernel=name, ms=round(ms, 3) if isinstance(ms, float) else ms,
                 tflops=tflops)
            rows.append((label, name, ms, tflops))
    print(f"\n{'case':<18} {'kernel':<28} {'ms':>9} {'TFLOP/s':>8}")
    for label, name, ms, tflops in rows:
        print(f"{label:<18} {name:<28} {ms if isinstance(ms, str) else f'{ms:9.3f}'} {tflops or '':>8}")


def stage_cudnn_shapes() -> None:
    """What a chunk shape cuDNN has not seen costs: torch caches one cuDNN graph per (s_q, s_kv,
    strides), so the first call of each new shape builds one. First call vs the cached call."""
    from pagedserve.attention.sdpa_prefill import sdpa_with_lse
    shapes = [(300, 0), (301, 150)] if SMOKE else [(3001, 0), (3001, 2000), (5003, 0), (5003, 7001), (7777, 333)]
    for query_len, context_len in shapes:
        b = Paged([query_len], [context_len] if context_len else [0], torch.float32 if SMOKE else torch.bfloat16,
                  seed=5)
        q = b.query.transpose(0, 1).unsqueeze(0)
        k = b.key.transpose(0, 1).unsqueeze(0)
        v = b.value.transpose(0, 1).unsqueeze(0)
        if not SMOKE:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sdpa_with_lse(q, k, v, True, b.scale)
        if not SMOKE:
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        cached_ms = bench_ms(lambda: sdpa_with_lse(q, k, v, True, b.scale))
        out = torch.empty_like(b.query)
        if not SMOKE:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.sdpa_by_sequence(out)  # a new (L, C) pair: two graphs when C > 0
        if not SMOKE:
            torch.cuda.synchronize()
        seq_first_ms = (time.perf_counter() - t0) * 1e3
        emit(stage="cudnn_shapes", query_len=query_len, context_len=context_len,
             new_part_first_call_ms=round(first_ms, 2), new_part_cached_ms=round(cached_ms, 3),
             by_sequence_first_call_ms=round(seq_first_ms, 2),
             by_sequence_cached_ms=round(bench_ms(lambda: b.sdpa_by_sequence(out)), 3),
             triton_prefill_ms=round(bench_ms(lambda: b.prefill(out)), 3),
             triton_by_sequence_ms=round(bench_ms(lambda: b.triton_by_sequence(out)), 3))
