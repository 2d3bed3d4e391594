"""The nucleus kernel's tile (triton_sampling.BLOCK, NUM_WARPS) swept on the GPU: ms a call of
sample_rows over bf16 logits of Llama-3's vocabulary (temperature 0.8, top_p 0.95; CUDA events,
median of 20 after 3 warm-ups), and the top-k threshold alone at several k: nucleus.kth_values
(torch.topk, sorted, then the k-th column) beside two other torch forms of the same value, torch.kthvalue
(the (vocab - k + 1)-th smallest) and topk(sorted=False).min, each checked equal to it.
Usage (device): [TREE=.devcarry/main] [TILES=4096x16,...] python3 benchmarks/sampler_sweep.py [rows ...]"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.environ.get("TREE", os.getcwd()))   # TREE: another tree's pagedserve
import torch  # noqa: E402

from pagedserve.layers import nucleus, triton_sampling  # noqa: E402

sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from cuda_events import median_ms  # noqa: E402

VOCAB = 128256


def main() -> None:
    dev = torch.device("cuda")
    for rows in [int(a) for a in sys.argv[1:]] or [128, 512]:
        logits = (torch.randn(rows, VOCAB, device=dev) * 3).bfloat16()
        temperature = torch.full((rows,), 0.8, device=dev)
        top_p = torch.full((rows,), 0.95, device=dev)
        uniforms = torch.rand(rows, nucleus.ROUNDS, device=dev)
        reference = None
        tiles = [tuple(int(v) for v in t.split("x")) for t in os.environ["TILES"].split(",")] if "TILES" in os.environ \
            else [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)]
        for block, warps in tiles:
            triton_sampling.BLOCK, triton_sampling.NUM_WARPS = block, warps
            ids = triton_sampling.sample_rows(logits, temperature, top_p, uniforms)
            reference = ids if reference is None else reference
            ms = median_ms(lambda: triton_sampling.sample_rows(logits, temperature, top_p, uniforms))
            print("RESULT " + json.dumps(dict(tree=os.environ.get("TREE", "."), rows=rows, block=block, warps=warps,
                                              ms=round(ms, 4),
                                              same_ids=bool(torch.equal(ids, reference)))), flush=True)
        for k in (1, 20, 50, 200, 500, 4096):
            top_k = torch.full((rows,), k, device=dev)
            forms = {"kth_values": lambda: nucleus.kth_values(logits, top_k, k),
                     "kthvalue": lambda: logits.kthvalue(VOCAB - k + 1, dim=-1).values,
                     "topk_unsorted_min": lambda: logits.topk(k, dim=-1, sorted=False).values.min(dim=-1).values}
            reference = forms["kth_values"]()
            for form, fn in forms.items():
                try:
                    same = bool(torch.equal(fn(), reference))
                    ms = round(median_ms(fn), 4)
                except RuntimeError as error:   # (a dtype a form's CUDA op does not take)
                    same, ms = False, str(error)[:80]
                print("RESULT " + json.dumps(dict(rows=rows, piece=f"{form} k={k} bf16", ms=ms, same=same)),
                      flush=True)


if __name__ == "__main__":
    main()
