"""Prefill attention of a thr512-shaped step: ~15 fresh prompts of 64-1024 tokens (no cached
context) in one launch, as peers.py's thr512 sends them 8,192 tokens a step. The Triton prefill
kernel (its default tiles and others) against torch's varlen_attn (FlashAttention-2 varlen)
on the same packed q / k / v, llama-1b heads (32 / 8 / 64) and llama-8b heads (32 / 8 / 128),
bf16; TFLOP/s of the causal FLOP (4 * sum L(L+1)/2 * D * H). Outputs are checked against each
other first.

Usage: python3 benchmarks/prefill_short.py [--cases 1x2048,2x4096,1x1024@3072] [--heads 32/8/64,32/8/128]
"""
from __future__ import annotations

import inspect

import torch
import triton

from pagedserve.attention.triton_prefill_attention import PrefillTiles, default_prefill_tiles, prefill_attention


def thr_step_lengths(budget: int = 8192) -> list[int]:
    """Input lengths of peers.py's thr512 requests (step_profile.thr_requests: its workload, seed 0)
    packed up to `budget` tokens (the last one cut), as the workload's first prefill step takes them."""
    from step_profile import thr_requests
    out, total = [], 0
    for prompt, _ in thr_requests(False):
        take = min(len(prompt), budget - total)
        out.append(take)
        total += take
        if total >= budget:
            break
    return out


def parse_case(spec: str) -> tuple[list[int], list[int]]:
    """"NxL" (N fresh prompts of L tokens) or "NxL@C" (each after C cached tokens)."""
    head, _, ctx = spec.partition("@")
    n, _, length = head.partition("x")
    return [int(length)] * int(n), [int(ctx or 0)] * int(n)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="", help="comma list of NxL[@C] (default: thr512's step and two fresh sets)")
    ap.add_argument("--heads", default="32/8/64,32/8/128")
    args = ap.parse_args()
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    dev = torch.device("cuda")
    cases = {c: parse_case(c) for c in args.cases.split(",") if c} or \
        {"thr_step": (thr_step_lengths(), None), "fresh8x1024": ([1024] * 8, None), "fresh32x256": ([256] * 32, None)}
    variants = {"default": None, "128x64w8s3": PrefillTiles(128, 64, 8, 3), "64x64w4s3": PrefillTiles(64, 64, 4, 3),
                "64x32w4s3": PrefillTiles(64, 32, 4, 3), "128x32w4s3": PrefillTiles(128, 32, 4, 3),
                "64x64w4s2": PrefillTiles(64, 64, 4, 2), "128x128w8s2": PrefillTiles(128, 128, 8, 2)}
    results = []
    for heads in args.heads.split(","):
        hq, hkv, d = (int(v) for v in heads.split("/"))
        for case, (lens, ctxs) in cases.items():
            ctxs = ctxs or [0] * len(lens)
            total = sum(lens)
            torch.manual_seed(0)
            q = torch.randn(total, hq, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(total, hkv, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(total, hkv, d, device=dev, dtype=torch.bfloat16)
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
            seq_lens = torch.tensor([c + n for c, n in zip(ctxs, lens)], dtype=torch.int32, device=dev)
            per_seq = max(-(-(c + n) // 16) for c, n in zip(ctxs, lens))
            k_cache = torch.randn(len(lens) * per_seq + 1, 16, hkv, d, device=dev, dtype=torch.bfloat16)
            v_cache = torch.randn_like(k_cache)
            block_tables = torch.randperm(len(lens) * per_seq, device=dev).to(torch.int32).reshape(len(lens), per_seq)
            scale = d ** -0.5
            flop = sum(4 * (n * c + n * (n + 1) / 2) * d * hq for c, n in zip(ctxs, lens))
            out = torch.empty_like(q)
            row = dict(heads=f"{hq}/{hkv}/{d}", case=case, seqs=len(lens), tokens=total,
                       default_tiles=str(default_prefill_tiles(torch.bfloat16, d, total)))
            kw = {}
            if "is_causal" in params:
                kw["is_causal"] = True
            elif "window_size" in params:
                kw["window_size"] = (-1, 0)
            kv = (k, v) if "enable_gqa" in params else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            ref = None
            if not any(ctxs):
                try:
                    ref = varlen_attn(q, kv[0], kv[1], cu, cu, max(lens), max(lens), scale=scale, **kw)
                    ms = triton.testing.do_bench(lambda: varlen_attn(q, kv[0], kv[1], cu, cu, max(lens), max(lens),
                                                                     scale=scale, **kw))
                    row["varlen_attn"] = (round(ms * 1e3, 1), round(flop / ms / 1e9, 1))
                except Exception as exc:   # noqa: BLE001 - the API differs between torch versions
                    row["varlen_attn"] = f"unavailable: {type(exc).__name__}: {str(exc)[:150]}"
            for name, tiles in variants.items():
                def run(t=tiles):
                    return prefill_attention(q, k, v, k_cache, v_cache, block_tables, seq_lens, cu, scale, out,
                                             0, len(lens), total, tiles=t)
                try:
                    got = run().clone()
                    if ref is None:
                        ref = got
                    err = float((got.float() - ref.float()).abs().max())
                    ms = triton.testing.do_bench(run)
                    row[name] = (round(ms * 1e3, 1), round(flop / ms / 1e9, 1), err)
                except Exception as exc:   # noqa: BLE001 - a shape this GPU refuses
                    row[name] = f"failed: {type(exc).__name__}: {str(exc)[:100]}"
            results.append(row)
            best = min((v[0], k) for k, v in row.items() if isinstance(v, tuple) and k != "varlen_attn")
            print(f"{row['heads']:9s} {case:14s} default {row['default'][0]:8.1f} us  best {best[1]} {best[0]:8.1f}  "
                  + " ".join(f"{k}={v[0]}" for k, v in row.items() if isinstance(v, tuple)), flush=True)


if __name__ == "__main__":
    main()
