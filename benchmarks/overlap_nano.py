"""Would two half-batches on two CUDA streams beat one batch at thr512's decode shapes (NanoFlow's
intra-device overlap)? At 256-448 decode rows a llama step is half decode attention (bound by the
KV cache's bytes) and half GEMMs (bound by the tensor cores: llama-8b ~700 TFLOP/s); one after
the other they add up (RESULTS.md, session 15's ceiling). The rows of a decode step are
independent, so the step could run as two half-batches, each its own forward on its own stream:
one half's attention beside the other half's GEMMs, if the GPU runs them side by side.

Per layer, for `rows` decode rows (contexts U[300, 1300], block 16, bf16): qkv GEMM, the paged
decode attention (pagedserve's launch), o GEMM, gate_up GEMM, SiLU-and-mul, down GEMM (no norms,
no rotary: the kernels that matter). Timed over `layers` layers (two weight copies alternating, so
the L2 holds none), each variant captured in one CUDA graph (the two streams forked and joined
inside it) and replayed (`_eager`: launched from Python, where the host can be the bound), CUDA
events, median of 7 after 2 warm-ups:
  one      all rows, one stream (today's step)
  halves   the two halves one after the other, one stream (what splitting costs alone)
  streams  half A on stream 1, half B on stream 2, each its own chain (the overlap)
  attn / gemm  the attention alone, the GEMMs alone (all rows)
Usage (device): python3 benchmarks/overlap_nano.py [model ...]   (llama-8b, llama-1b)
"""
from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagedserve.attention.triton_paged_attention import paged_attention  # noqa: E402

sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from cuda_events import median_ms  # noqa: E402

MODELS = {"llama-8b": dict(hidden=4096, inter=14336, hq=32, hkv=8, d=128, layers=32),
          "llama-1b": dict(hidden=2048, inter=8192, hq=32, hkv=8, d=64, layers=16)}
BS = 16
DEV = torch.device("cuda")


class Half:
    """One batch of decode rows: its query, block table, lengths and activations."""

    def __init__(self, cfg: dict, ctx: list[int], k: torch.Tensor, first_block: int) -> None:
        rows = len(ctx)
        per = [-(-(c + 1) // BS) for c in ctx]
        table = torch.zeros(rows, max(per), dtype=torch.int32)
        used = first_block
        for s, n in enumerate(per):
            table[s, :n] = torch.arange(used, used + n, dtype=torch.int32)
            used += n
        self.blocks_end = used
        self.table = table.to(DEV)
        self.seq_lens = torch.tensor([c + 1 for c in ctx], dtype=torch.int32, device=DEV)
        self.qsl = torch.arange(rows + 1, dtype=torch.int32, device=DEV)
        self.max_seq = max(ctx) + 1
        self.x = torch.randn(rows, cfg["hidden"], device=DEV, dtype=torch.bfloat16)
        self.attn_out = torch.empty(rows, cfg["hq"], cfg["d"], device=DEV, dtype=torch.bfloat16)
        self.rows = rows


def layer(cfg: dict, h: Half, w: dict, k: torch.Tensor, v: torch.Tensor, attn: bool = True, gemm: bool = True) -> None:
    hq, d = cfg["hq"], cfg["d"]
    if gemm:
        qkv = F.linear(h.x, w["qkv"])
        q = qkv[:, :hq * d].reshape(h.rows, hq, d)
    else:
        q = h.x[:, :hq * d].reshape(h.rows, hq, d) if h.x.shape[1] >= hq * d else \
            torch.zeros(h.rows, hq, d, device=DEV, dtype=torch.bfloat16)
    if attn:
        paged_attention(q, k, v, h.table, h.seq_lens, h.qsl, d ** -0.5, 1, h.max_seq, num_decodes=h.rows, out=h.attn_out)
    if gemm:
        o = F.linear(h.attn_out.reshape(h.rows, hq * d), w["o"])
        gu = F.linear(o, w["gate_up"])
        g, u = gu.chunk(2, dim=-1)
        F.linear(F.silu(g) * u, w["down"])


def main() -> None:
    rng = random.Random(0)
    for name in sys.argv[1:] or ["llama-8b", "llama-1b"]:
        cfg = MODELS[name]
        H, I, hq, hkv, d, L = cfg["hidden"], cfg["inter"], cfg["hq"], cfg["hkv"], cfg["d"], cfg["layers"]
        weights = [dict(qkv=torch.randn((hq + 2 * hkv) * d, H, device=DEV, dtype=torch.bfloat16) * 0.02,
                        o=torch.randn(H, hq * d, device=DEV, dtype=torch.bfloat16) * 0.02,
                        gate_up=torch.randn(2 * I, H, device=DEV, dtype=torch.bfloat16) * 0.02,
                        down=torch.randn(H, I, device=DEV, dtype=torch.bfloat16) * 0.02) for _ in range(2)]
        for rows in (256, 448):
            ctx = [rng.randint(300, 1300) for _ in range(rows)]
            blocks = sum(-(-(c + 1) // BS) for c in ctx) + 1
            k = torch.randn(blocks, BS, hkv, d, device=DEV, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            whole = Half(cfg, ctx, k, 0)
            a = Half(cfg, ctx[:rows // 2], k, 0)
            b = Half(cfg, ctx[rows // 2:], k, a.blocks_end)
            s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

            def one(attn=True, gemm=True):
                for i in range(L):
                    layer(cfg, whole, weights[i % 2], k, v, attn, gemm)

            def halves():
                for i in range(L):
                    layer(cfg, a, weights[i % 2], k, v)
                    layer(cfg, b, weights[i % 2], k, v)

            def streams():
                cur = torch.cuda.current_stream()
                s1.wait_stream(cur)
                s2.wait_stream(cur)
                for i in range(L):
                    with torch.cuda.stream(s1):
                        layer(cfg, a, weights[i % 2], k, v)
                    with torch.cuda.stream(s2):
                        layer(cfg, b, weights[i % 2], k, v)
                cur.wait_stream(s1)
                cur.wait_stream(s2)

            variants = dict(one=one, halves=halves, streams=streams, attn=lambda: one(gemm=False),
                            gemm=lambda: one(attn=False))
            carve = getattr(torch._C, "_set_sm_carveout_experimental", None)
            if carve is not None:   # cuBLAS left N SMs free for the other stream's attention
                for n in (16, 32, 64):
                    variants[f"streams_carve{n}"] = (n, streams)
                    variants[f"gemm_carve{n}"] = (n, lambda: one(attn=False))
            result = dict(model=name, rows=rows)
            for key, fn in variants.items():
                if isinstance(fn, tuple):
                    n, fn = fn
                    carve(n)
                elif carve is not None:
                    carve(None)
                fn()   # compiles, cuBLAS's handles
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                result[key] = median_ms(graph.replay, iters=7, warmup=2)
                result[key + "_eager"] = median_ms(fn, iters=7, warmup=2)
                del graph
            result = {key: round(value, 3) if isinstance(value, float) else value for key, value in result.items()}
            result["streams_vs_one"] = round(result["streams"] / result["one"], 3)
            print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
