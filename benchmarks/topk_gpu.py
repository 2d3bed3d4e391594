"""The k-th largest logit a row (nucleus.kth_values, what top_k costs the nucleus sampler) on
the GPU: torch.topk over each row against a two-stage select (each of C chunks of a row gives
its k largest, then the k-th largest of those C * k: the same value, as the row's k largest lie
among them), at Llama-3's vocabulary in bf16, k 50 and 400. ms (CUDA events, median of 20), and whether the
values equal torch.topk's.
Usage (device): python3 benchmarks/topk_gpu.py [rows ...]   (default 128 512)"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from cuda_events import median_ms  # noqa: E402

VOCAB, KS = 128256, (50, 400)
CHUNKS = (32, 64, 96, 128, 192, 256, 384)   # divisors of 128,256


def one_stage(x: torch.Tensor, k: int, sort: bool = True) -> torch.Tensor:
    return x.topk(k, dim=-1, sorted=sort).values.min(dim=-1).values


def two_stage(x: torch.Tensor, k: int, chunks: int) -> torch.Tensor:
    rows, vocab = x.shape
    first = x.view(rows * chunks, vocab // chunks).topk(k, dim=-1, sorted=False).values
    return first.view(rows, chunks * k).topk(k, dim=-1, sorted=False).values.min(dim=-1).values


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    for rows in [int(a) for a in sys.argv[1:]] or [128, 512]:
        g = torch.Generator(device=dev).manual_seed(rows)
        x = (torch.randn(rows, VOCAB, device=dev, generator=g) * 3).to(torch.bfloat16)
        for k in KS:
            want = x.topk(k, dim=-1).values[:, -1]
            result = {"rows": rows, "k": k, "topk_sorted": round(median_ms(lambda: x.topk(k, dim=-1)), 4),
                      "topk_unsorted_min": round(median_ms(lambda: one_stage(x, k, False)), 4)}
            for c in CHUNKS:
                if VOCAB // c >= k:
                    same = bool(torch.equal(two_stage(x, k, c), want))
                    result[f"two_stage_{c}"] = (round(median_ms(lambda: two_stage(x, k, c)), 4), same)
            print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
