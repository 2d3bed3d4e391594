"""Issue 22: up to which decode batch does rotary + KV store inside the attention launch
(TritonBackend.fused_decode) beat rotary_store_kv then the plain launch? One layer's decode
attention of llama-1b (32 / 8 heads, head_dim 64) and llama-8b (32 / 8, 128) heads, bf16,
block 16, every row at context CONTEXT, the split plan of a decode graph bound at 2048 (the
engine's), MERGE_IN_KERNEL as the library sets it; each path captured REPS times in one CUDA
graph, replayed, the time per layer printed; outputs and caches compared bit for bit.
Usage: PYTHONPATH=$PWD python3 benchmarks/fused_decode_sweep.py [--cpu-smoke]"""
import json

from decode_common import SMOKE, replay_ms   # first: --cpu-smoke sets TRITON_INTERPRET before Triton loads
import torch

from pagedserve.attention.triton_paged_attention import paged_attention
from pagedserve.attention.triton_store_kv import RotaryStore, rotary_store_kv
from pagedserve.layers.rotary import RotaryEmbedding

HEADS = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}
BATCHES = [1, 2] if SMOKE else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
CONTEXT, BLOCK, BOUND, REPS = (40, 16, 64, 1) if SMOKE else (512, 16, 2048, 16)


def replay_us(graph) -> float:
    """Microseconds per captured repetition: one warm replay, then 20 timed."""
    graph.replay()
    return round(replay_ms(graph, 20) * 1e3 / REPS, 2)


def case(model: str, batch: int, dev: torch.device) -> dict:
    hq, hkv, d = HEADS[model]
    dtype = torch.float32 if SMOKE else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(batch)
    blocks_per_seq = -(-(CONTEXT + 1) // BLOCK)
    k_cache = torch.randn(batch * blocks_per_seq + 1, BLOCK, hkv, d, generator=g).to(dev, dtype)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dev, dtype)
    tables = torch.randperm(batch * blocks_per_seq, generator=g).view(batch, blocks_per_seq).to(dev, torch.int32)
    seq_lens = torch.full((batch,), CONTEXT + 1, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    positions = torch.full((batch,), CONTEXT, dtype=torch.int64, device=dev)
    slots = (tables[:, CONTEXT // BLOCK].long() * BLOCK + CONTEXT % BLOCK)
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, generator=g).to(dev, dtype)
    rope = RotaryEmbedding(d, 4096, 500000.0, dtype=dtype).to(dev)
    caches = {name: (k_cache.clone(), v_cache.clone()) for name in ("plain", "fused")}
    qkvs = {name: qkv.clone() for name in caches}
    outs = {}

    def views(name):
        q, k, v = qkvs[name].split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(batch, hq, d), k.view(batch, hkv, d), v.view(batch, hkv, d)

    def plain():
        q, k, v = views("plain")
        q = rotary_store_kv(positions, q, k, v, rope.cos_cache, rope.sin_cache, *caches["plain"], slots)
        outs["plain"] = paged_attention(q, *caches["plain"], tables, seq_lens, qsl, d ** -0.5, 1, BOUND,
                                        num_decodes=batch)

    def fused():
        q, k, v = views("fused")
        outs["fused"] = paged_attention(q, *caches["fused"], tables, seq_lens, qsl, d ** -0.5, 1, BOUND,
                                        num_decodes=batch,
                                        rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache))

    row = dict(model=model, batch=batch)
    fused()   # the fused launch leaves q as it was; the plain path rotates its copy in place
    plain()
    row["equal"] = bool(torch.equal(outs["plain"], outs["fused"]) and torch.equal(caches["plain"][0], caches["fused"][0])
                        and torch.equal(caches["plain"][1], caches["fused"][1]))
    if dev.type == "cuda":
        for name, fn in (("plain", plain), ("fused", fused)):
            qkv_copy = qkvs[name].clone()   # the plain path's in-place rotation: replay on the same input
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(REPS):
                    if name == "plain":
                        qkvs[name].copy_(qkv_copy)
                    fn()
            row[f"{name}_us"] = replay_us(graph)
        copy = torch.cuda.CUDAGraph()   # the plain path's input copy, timed alone to subtract
        with torch.cuda.graph(copy):
            for _ in range(REPS):
                qkvs["plain"].copy_(qkv)
        row["plain_us"] = round(row["plain_us"] - replay_us(copy), 2)
        row["fused_gain_us"] = round(row["plain_us"] - row["fused_us"], 2)
    return row


def main() -> None:
    dev = torch.device("cpu" if SMOKE else "cuda")
    rows = []
    for model in HEADS:
        for batch in BATCHES:
            rows.append(case(model, batch, dev))
            print(json.dumps(rows[-1]), flush=True)
    for model in HEADS:
        wins = [r["batch"] for r in rows if r["model"] == model and r.get("fused_gain_us", 0) > 0]
        print(f"RESULT {model}: fused faster at batches {wins}; all equal: "
              f"{all(r['equal'] for r in rows if r['model'] == model)}")


if __name__ == "__main__":
    main()
