"""The RMSNorm kernel alone (residual add included, as the decoder layers launch it), us a call in a
CUDA graph of 50 calls over 8 row buffers, at decode and prefill row counts, llama-1b / llama-8b
hidden sizes, bf16: for A/Bs of the norm kernel between trees (PYTHONPATH picks the package).
Usage: python3 benchmarks/norm_time.py [LABEL]"""
import json
import sys

import torch
from decode_common import replay_ms   # (beside this file)

from pagedserve.layers.triton_ops import rms_norm


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "now"
    for hidden in (2048, 4096):
        for rows in (1, 64, 256, 512, 4096, 16384):
            xs = [torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
            res = [torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
            w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
            for i in range(8):
                rms_norm(xs[i], w, 1e-5, res[i])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(50):
                    rms_norm(xs[i % 8], w, 1e-5, res[i % 8])
            graph.replay()
            us = replay_ms(graph, 20) * 1000 / 50
            print(json.dumps({"label": label, "hidden": hidden, "rows": rows, "us": round(us, 2),
                              "gb_s": round(rows * hidden * 2 * 4 / us / 1e3, 1)}), flush=True)


if __name__ == "__main__":
    main()
