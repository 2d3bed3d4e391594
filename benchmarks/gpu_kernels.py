"""GPU check of the Triton attention kernels: correctness against the torch reference at
realistic shapes (bf16, fp16), CUDA-graph capture, and timings with triton.testing.do_bench.

    python3 benchmarks/gpu_kernels.py            # ~1 minute on one H100
    python3 benchmarks/gpu_kernels.py --sweep    # also time a few tile shapes (tuning)

Shapes are llama-8b's attention: 32 query heads, 8 KV heads, head_dim 128, block_size 16.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pagedserve.attention.torch_ref import paged_attention_ref, store_kv_ref  # noqa: E402
from pagedserve.attention.split_plan import choose_splits  # noqa: E402
from pagedserve.attention.triton_paged_attention import (  # noqa: E402
    TileConfig, default_tile_config, paged_attention)
from pagedserve.attention.triton_store_kv import store_kv  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DEVICE = torch.device("cuda")
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # max abs error vs the reference


@dataclass
class Batch:
    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decodes: int

    def call(self, out: torch.Tensor | None = None, num_splits: int | None = None,
             tiles: TileConfig | None = None) -> torch.Tensor:
        return paged_attention(self.query, self.k_cache, self.v_cache, self.block_tables,
                               self.seq_lens, self.query_start_loc, HEAD_DIM ** -0.5,
                               self.max_query_len, self.max_seq_len, num_decodes=self.num_decodes,
                               out=out, num_splits=num_splits, tiles=tiles)

    def kv_bytes(self) -> int:
        """K and V bytes the kernel must read at least once."""
        return int(self.seq_lens.sum()) * NUM_KV_HEADS * HEAD_DIM * 2 * self.k_cache.element_size()


def make_batch(query_lens: list[int], context_lens: list[int], dtype: torch.dtype, seed: int) -> Batch:
    """Decode-first order is the caller's job. Block ids are a random permutation (non-contiguous)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_per_seq = [triton.cdiv(n, BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 8
    block_ids = torch.randperm(num_blocks, generator=generator, device=DEVICE).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=DEVICE)
    offsets = [0]
    for count in blocks_per_seq:
        offsets.append(offsets[-1] + count)
    for s, count in enumerate(blocks_per_seq):
        block_tables[s, :count] = block_ids[offsets[s]:offsets[s + 1]]
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Batch(
        query=torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=generator, device=DEVICE, dtype=dtype),
        k_cache=torch.randn(shape, generator=generator, device=DEVICE, dtype=dtype),
        v_cache=torch.randn(shape, generator=generator, device=DEVICE, dtype=dtype),
        block_tables=block_tables, seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=qsl.to(DEVICE), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        num_decodes=leading_decodes(query_lens))


def leading_decodes(query_lens: list[int]) -> int:
    count = 0
    while count < len(query_lens) and query_lens[count] == 1:
        count += 1
    return count


def random_lens(count: int, low: int, high: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=generator).tolist()


def check_correctness() -> bool:
    cases = {
        "decode b1 ctx2048": ([1], [2047]),
        "decode b8 ctx<=2048": ([1] * 8, random_lens(8, 1, 2047, 1)),
        "decode b64 ctx<=1024": ([1] * 64, random_lens(64, 1, 1023, 2)),
        "decode b256 ctx<=600": ([1] * 256, random_lens(256, 1, 599, 3)),
        "prefill 1024": ([1024], [0]),
        "mixed 32 dec + 300-chunk@1024 + 77": ([1] * 32 + [300, 77], random_lens(32, 1, 2000, 4) + [1024, 0]),
    }
    all_ok = True
    print("correctness: max |triton - torch_ref| (split: forced num_splits=8)")
    for dtype in (torch.bfloat16, torch.float16):
        for name, (query_lens, context_lens) in cases.items():
            batch = make_batch(query_lens, context_lens, dtype, seed=len(name))
            expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                           batch.seq_lens, batch.query_start_loc, HEAD_DIM ** -0.5,
                                           batch.num_decodes)
            errors = []
            for num_splits in (None, 8):
                out = torch.full_like(batch.query, float("nan"))
                batch.call(out=out, num_splits=num_splits)
                errors.append((out.float() - expected.float()).abs().max().item())
            ok = all(e <= TOLERANCE[dtype] for e in errors)  # NaN compares False
            all_ok &= ok
            print(f"  {str(dtype)[6:]:9s} {name:36s} auto {errors[0]:.2e}  split {errors[1]:.2e}  "
                  f"{'ok' if ok else 'FAIL'}")
    all_ok &= check_store_kv() & check_cuda_graph()
    return all_ok


def check_store_kv() -> bool:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    key, value = (torch.randn(4096, NUM_KV_HEADS, HEAD_DIM, generator=generator, device=DEVICE,
                              dtype=torch.bfloat16) for _ in range(2))
    k_cache = torch.randn(512, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=generator, device=DEVICE,
                          dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(512 * BLOCK_SIZE, generator=generator, device=DEVICE)[:4096]
    slots[::7] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_ref, v_ref, slots)
    store_kv(key, value, k_cache, v_cache, slots)
    ok = torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    print(f"  store_kv 4096 tokens (every 7th slot -1): {'exact' if ok else 'FAIL'}")
    return ok


def check_cuda_graph() -> bool:
    """Capture fails on any host sync; replay after changing the inputs must track them."""
    ok = True
    for num_splits in (1, 8):
        batch = make_batch([1] * 4, [100, 700, 1500, 30], torch.bfloat16, seed=9)
        batch.max_seq_len = 2048  # graph captured for the longest context it may see
        out = torch.empty_like(batch.query)
        batch.call(out=out, num_splits=num_splits)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            batch.call(out=out, num_splits=num_splits)
        batch.seq_lens.copy_(torch.tensor([20, 1100, 5, 64], dtype=torch.int32))
        batch.query.normal_()
        graph.replay()
        expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                       batch.seq_lens, batch.query_start_loc, HEAD_DIM ** -0.5, 4)
        error = (out.float() - expected.float()).abs().max().item()
        ok &= error <= TOLERANCE[torch.bfloat16]
        print(f"  cuda graph capture+replay, num_splits={num_splits}: max err {error:.2e}")
    return ok


def time_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=100) * 1000


def graph_time_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay)


def benchmark(sweep: bool) -> None:
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    print(f"\ntimings (bf16, llama-8b heads, {sms} SMs); GB/s = K+V bytes / time; graph = CUDA-graph replay")
    print(f"  {'case':34s} {'splits':>6s} {'us':>8s} {'graph us':>9s} {'GB/s':>7s} {'TFLOP/s':>8s}")
    decode_cases = [("decode b1 ctx256", 1, 256), ("decode b1 ctx2048", 1, 2048),
                    ("decode b16 ctx2048", 16, 2048), ("decode b256 ctx600", 256, 600)]
    for name, batch_size, context in decode_cases:
        batch = make_batch([1] * batch_size, [context - 1] * batch_size, torch.bfloat16, seed=batch_size)
        out = torch.empty_like(batch.query)
        auto = choose_splits(batch_size, NUM_KV_HEADS, 1, context, default_tile_config(
            NUM_HEADS // NUM_KV_HEADS, HEAD_DIM, 1, torch.bfloat16).tile_n, sms).num_segments
        for num_splits in sorted({1, auto, 16}):
            fn = lambda: batch.call(out=out, num_splits=num_splits)  # noqa: E731
            us, graph_us = time_us(fn), graph_time_us(fn)
            tag = f"{num_splits}{'*' if num_splits == auto else ''}"
            print(f"  {name:34s} {tag:>6s} {us:8.1f} {graph_us:9.1f} {batch.kv_bytes() / graph_us / 1e3:7.0f}")
    prefill = make_batch([1024], [0], torch.bfloat16, seed=1)
    out = torch.empty_like(prefill.query)
    flops = 4 * NUM_HEADS * HEAD_DIM * 1024 * 1025 / 2  # causal: QK^T and PV over the lower triangle
    us = time_us(lambda: prefill.call(out=out))
    print(f"  {'prefill 1024 (triton paged)':34s} {'1':>6s} {us:8.1f} {'':9s} {'':7s} {flops / us / 1e6:8.1f}")
    q = prefill.query.transpose(0, 1).unsqueeze(0).contiguous()
    k = torch.randn(1, NUM_KV_HEADS, 1024, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, k, is_causal=True, enable_gqa=True)
    us = time_us(sdpa)
    print(f"  {'prefill 1024 (torch sdpa, dense kv)':34s} {'-':>6s} {us:8.1f} {'':9s} {'':7s} {flops / us / 1e6:8.1f}")
    if sweep:
        tile_sweep(prefill, flops)


def tile_sweep(prefill: Batch, flops: float) -> None:
    """Tuning aid: a few tile shapes for the b256 decode and the 1024 prefill."""
    print("\ntile sweep (block_m, tile_n, warps, stages)")
    decode = make_batch([1] * 256, [599] * 256, torch.bfloat16, seed=256)
    out = torch.empty_like(decode.query)
    for tile_n in (16, 32, 64, 128):
        for warps, stages in ((4, 2), (4, 3), (8, 3)):
            tiles = TileConfig(16, tile_n, warps, stages)
            us = time_us(lambda: decode.call(out=out, num_splits=1, tiles=tiles))
            print(f"  decode b256 ctx600 {tiles}: {us:7.1f} us {decode.kv_bytes() / us / 1e3:6.0f} GB/s")
    out = torch.empty_like(prefill.query)
    for block_m, tile_n, warps, stages in ((64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                                          (128, 128, 8, 2), (64, 128, 4, 2)):
        tiles = TileConfig(block_m, tile_n, warps, stages)
        us = time_us(lambda: prefill.call(out=out, tiles=tiles))
        print(f"  prefill 1024 {tiles}: {us:7.1f} us {flops / us / 1e6:6.1f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time a few tile shapes")
    args = parser.parse_args()
    print(f"{datetime.date.today()} {torch.cuda.get_device_name(DEVICE)} torch {torch.__version__} "
          f"triton {triton.__version__}")
    ok = check_correctness()
    benchmark(args.sweep)
    print("\nALL CHECKS PASSED" if ok else "\nSOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
