"""A prefill step's MLP half in row chunks that keep gate_up's output in the L2, and the residual
add in the down GEMM's epilogue (issue 22)

A thr512 prefill step of llama-1b (8,192 tokens) spends ~1.7 ms of ~28 ms in the SiLU-and-mul
launch and ~1.0 ms in the add + RMSNorm launches (session 28). The SiLU launch reads gate_up's
[T, 2I] output back from HBM (268 MB at llama-1b, more than the 50 MB L2) and the fused add + norm
reads the down GEMM's output and the residual and writes both. Two ways to move fewer bytes, both
with cuBLAS's own GEMMs (session 30/31: a Triton GEMM with the SiLU in its epilogue lost to them):
  chunkC   gate_up, SiLU and down over C rows at a time: gate_up's [C, 2I] output is still in the L2
           when the SiLU reads it, and the SiLU's [C, I] output when down reads it
  addmm    down computes residual + a @ Wd^T (cuBLAS's beta = 1 epilogue, in place), so the next
           norm reads one [T, H] tensor and writes one, instead of two and two
Each variant is one MLP half as the decoder layer runs it (norm, gate_up, SiLU, down; the norm
that adds the residual belongs to it), in us, median of CUDA-event timed repeats, and checked
against today's path (max abs difference of the residual stream and of the normed rows).
Usage: python3 benchmarks/prefill_mlp_probe.py [--tokens 8192] [--models llama-1b,llama-8b] [--chunks 1024,2048,4096]
Interleaved A/B: --variants today,addmm --rounds 9.  CPU check: TRITON_INTERPRET=1 python3 benchmarks/prefill_mlp_probe.py --tokens 256 --models llama-1b --chunks 64,100 --dtype float32
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from pagedserve.layers.triton_ops import rms_norm, silu_and_mul

SHAPES = {"llama-1b": (2048, 8192), "llama-8b": (4096, 14336)}   # hidden, intermediate
EPS = 1e-5


def median_us(fn, reps: int = 20) -> float:
    fn()
    if not torch.cuda.is_available():   # a CPU check of the variants (TRITON_INTERPRET=1): one timing
        t = time.perf_counter()
        fn()
        return round((time.perf_counter() - t) * 1e6, 1)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return round(sorted(times)[len(times) // 2], 1)


def probe(model: str, tokens: int, chunks: list[int], dt: torch.dtype, rounds: int = 1, only: list[str] | None = None
          ) -> dict:
    hidden, inter = SHAPES[model]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    w_gu = torch.randn(2 * inter, hidden, device=dev, dtype=dt, generator=g) * hidden ** -0.5
    w_d = torch.randn(hidden, inter, device=dev, dtype=dt, generator=g) * inter ** -0.5
    w_n = 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt, generator=g)
    y0 = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=g)   # the attention half's o output
    r0 = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=g)   # the residual stream before it
    y, r = y0.clone(), r0.clone()

    def reset():
        y.copy_(y0)
        r.copy_(r0)

    def today():   # add + norm, gate_up, SiLU, down -> (down's output, residual)
        h = rms_norm(y, w_n, EPS, r)
        return F.linear(silu_and_mul(F.linear(h, w_gu)), w_d), r

    def addmm():   # the residual already holds o's sum (o's own addmm): norm alone; down adds in place
        h = rms_norm(r, w_n, EPS)
        r.addmm_(silu_and_mul(F.linear(h, w_gu)), w_d.t())
        return None, r

    def chunked(c: int, add: bool):
        gu = torch.empty(c, 2 * inter, device=dev, dtype=dt)
        out = torch.empty(tokens, hidden, device=dev, dtype=dt)

        def run():
            h = rms_norm(r, w_n, EPS) if add else rms_norm(y, w_n, EPS, r)
            for s in range(0, tokens, c):
                e = min(s + c, tokens)
                torch.mm(h[s:e], w_gu.t(), out=gu[:e - s])
                a = silu_and_mul(gu[:e - s])
                if add:
                    r[s:e].addmm_(a, w_d.t())
                else:
                    torch.mm(a, w_d.t(), out=out[s:e])
            return (None, r) if add else (out, r)
        return run

    variants = {"today": (today, False), "addmm": (addmm, True)}
    for c in chunks:
        variants[f"chunk{c}"] = (chunked(c, False), False)
        variants[f"chunk{c}+addmm"] = (chunked(c, True), True)

    # reference: today's path once; an addmm variant starts from the residual with o's output in it
    reset()
    ref_out, ref_r = today()
    ref_next = (ref_out.float() + ref_r.float())   # what the next norm sees (today: its add)
    res = {"model": model, "tokens": tokens}
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    for name, (fn, add) in variants.items():
        reset()
        if add:
            r.add_(y)
        out, rr = fn()
        seen = rr.float() if add else out.float() + rr.float()
        res[name] = {"err_vs_today": round((seen - ref_next).abs().max().item(), 4), "us": []}
    # rounds: every variant once a round, the order rotated, so the power cap's clock drift falls on all alike
    names = list(variants)
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            res[name]["us"].append(median_us(variants[name][0]))   # repeats start where the last left: shapes set the time
    for name in names:
        us = sorted(res[name]["us"])
        res[name]["us"] = us[len(us) // 2] if rounds > 1 else us[0]
        res[name]["rounds"] = us
        print(model, name, res[name], flush=True)
    if only:
        return res
    # parts of today's path alone
    h = rms_norm(y, w_n, EPS, r.clone())
    gu = F.linear(h, w_gu)
    a = silu_and_mul(gu)
    res["parts"] = {"add_norm": median_us(lambda: rms_norm(y, w_n, EPS, r)), "norm": median_us(lambda: rms_norm(r, w_n, EPS)),
                    "gate_up": median_us(lambda: F.linear(h, w_gu)), "silu": median_us(lambda: silu_and_mul(gu)),
                    "down": median_us(lambda: F.linear(a, w_d)), "down_addmm": median_us(lambda: r.addmm_(a, w_d.t()))}
    for c in chunks:
        res["parts"][f"gate_up{c}"] = median_us(lambda c=c: F.linear(h[:c], w_gu)) * tokens / c
        res["parts"][f"silu{c}"] = median_us(lambda c=c: silu_and_mul(gu[:c])) * tokens / c
        res["parts"][f"down{c}"] = median_us(lambda c=c: F.linear(a[:c], w_d)) * tokens / c
    print(model, "parts (chunk parts scaled to all rows; alone, so not L2-warm)", res["parts"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--models", default="llama-1b,llama-8b")
    ap.add_argument("--chunks", default="1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=1, help="each variant timed once a round, the order rotated")
    ap.add_argument("--variants", default="", help="only these (comma-separated), parts not timed")
    ap.add_argument("--dtype", default="bfloat16", help="float32 for the CPU check (the interpreter has no bf16)")
    args = ap.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "tokens": args.tokens,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    chunks = [int(c) for c in args.chunks.split(",")]
    for model in args.models.split(","):
        print("RESULT " + json.dumps(probe(model, args.tokens, chunks, getattr(torch, args.dtype), args.rounds,
                                             [v for v in args.variants.split(",") if v])), flush=True)


if __name__ == "__main__":
    main()
