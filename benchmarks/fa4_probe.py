"""Issue 22 probe: FlashAttention-4's Hopper forward (PyPI `flash-attn-4`, CuTe DSL, JIT-compiled) against the
engine's long-prefill attention (torch's cuDNN op: a causal call on the new part, a plain one on the context,
merged by log-sum-exp, as attention/sdpa_prefill.py does) on ttft16k's and long64's shapes, llama-8b heads
(32 / 8 / 128), bf16. Per case: ms (median of triton.testing.do_bench), TFLOP/s of the causal-correct FLOP,
the largest difference from the cuDNN path's output, and FA4's first call (its JIT compile) in seconds.

    PYTHONPATH=$PWD:/tmp/fa4_site python3 benchmarks/fa4_probe.py      (benchmarks/fa4_probe_gpu.sh stages it)
"""
from __future__ import annotations

import json
import time

import torch
import triton.testing

from pagedserve.attention.sdpa_prefill import merge_by_lse, sdpa_with_lse

H, KV, D, BLOCK = 32, 8, 128, 16
SCALE = D ** -0.5
CASES = [("fresh16k", 16384, 0), ("fresh8k", 8192, 0), ("8k_after_8k", 8192, 8192), ("3000_after_9000", 3000, 9000),
         ("2048_after_14336", 2048, 14336)]


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def tflops(new: int, ctx: int, ms: float) -> float:
    pairs = new * ctx + new * (new + 1) / 2
    return 4 * H * D * pairs / (ms * 1e-3) / 1e12


def cudnn_path(q, k, v, new: int, ctx: int):
    """The engine's way: q [L, H, D]; k / v [C + L, KV, D] contiguous (the context gathered)."""
    qh = q.transpose(0, 1).unsqueeze(0)
    kn, vn = k[ctx:].transpose(0, 1).unsqueeze(0), v[ctx:].transpose(0, 1).unsqueeze(0)
    o_new, lse_new = sdpa_with_lse(qh, kn, vn, True, SCALE)
    if ctx == 0:
        return o_new[0].transpose(0, 1)
    kc, vc = k[:ctx].transpose(0, 1).unsqueeze(0), v[:ctx].transpose(0, 1).unsqueeze(0)
    o_ctx, lse_ctx = sdpa_with_lse(qh, kc, vc, False, SCALE)
    out = torch.empty_like(q)
    merge_by_lse(out, o_new[0].transpose(0, 1), lse_new, o_ctx[0].transpose(0, 1), lse_ctx)
    return out


def main() -> None:
    from flash_attn.cute.interface import flash_attn_func, flash_attn_varlen_func
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, new, ctx in CASES:
        total = new + ctx
        q = torch.randn(new, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(total, KV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(total, KV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        # the same keys in a paged cache of 16-token blocks, shuffled, as the engine's
        pages = total // BLOCK + 1
        perm = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32)
        k_cache = torch.zeros(pages, BLOCK, KV, D, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        idx = torch.arange(total, device="cuda")
        k_cache[perm[idx // BLOCK].long(), idx % BLOCK] = k
        v_cache[perm[idx // BLOCK].long(), idx % BLOCK] = v
        page_table = perm.unsqueeze(0).contiguous()
        cu_q = torch.tensor([0, new], device="cuda", dtype=torch.int32)
        used_k = torch.tensor([total], device="cuda", dtype=torch.int32)
        ref = cudnn_path(q, k, v, new, ctx)
        variants = {
            "cudnn": lambda: cudnn_path(q, k, v, new, ctx),
            "fa4_dense": lambda: flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), softmax_scale=SCALE,
                                                 causal=True)[0][0],
            "fa4_paged": lambda: flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=cu_q, seqused_k=used_k,
                                                        max_seqlen_q=new, page_table=page_table, softmax_scale=SCALE,
                                                        causal=True)[0],
        }
        for label, fn in variants.items():
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                if isinstance(out, tuple):
                    out = out[0]
                diff = (out.float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                emit(case=name, variant=label, ms=round(ms, 3), tflops=round(tflops(new, ctx, ms), 1),
                     max_abs_diff=round(diff, 5), first_call_s=round(first_s, 2))
            except Exception as exc:   # a probe: report and go on
                emit(case=name, variant=label, failed=repr(exc)[:400])


if __name__ == "__main__":
    main()
