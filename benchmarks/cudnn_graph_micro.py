"""Issue 22, long64: where the cuDNN graph path's attention loses against torch's fixed-shape
op (session 16: ttft16k's chunks ran 480-510 TFLOP/s through the graph, 565+ through torch's op,
with the same cuDNN kernel). Attention alone, llama-8b heads, bf16, a paged cache of 16-token
blocks in shuffled order, TFLOP/s of the causal-correct FLOP:

  torch_op        the path before: torch's cuDNN op on the new part (causal square) and on the
                  gathered context (no mask), merged by LSE (sdpa_prefill_sequence)
  graph_paged     cudnn_prefill's graph: padding mask + bottom-right causal, K/V paged
  graph_gathered  the same, K/V gathered into a packed copy
  fixed_nopad     a frontend graph of the one exact shape: no padding mask, no ragged rows,
                  bottom-right causal over the gathered K/V (the mask cost without padding)
  ctx_nomask      a frontend graph of the context part alone, exact shape, no mask at all
  triton          the Triton prefill kernel through the block table (the engine's other path)

on an 8k chunk after 8k (ttft16k's second chunk), a 3,000-token chunk after 9,000 and two
sequences (long64-like). Usage: PYTHONPATH=$PWD:<cudnn site> python3 benchmarks/cudnn_graph_micro.py
(CUDA with nvidia-cudnn-frontend; ~30 s on an H200)."""
from __future__ import annotations

import json

import torch
import triton

from pagedserve.attention.cudnn_prefill import CudnnPrefill
from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.attention.sdpa_prefill import gather_context, sdpa_prefill_sequence
from pagedserve.attention.triton_prefill_attention import prefill_attention

HQ, HKV, D, BS = 32, 8, 128, 16
SCALE = D ** -0.5


def make_step(query_lens: list[int], context_lens: list[int]):
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks = [-(-n // BS) for n in seq_lens]
    g = torch.Generator(device="cuda").manual_seed(sum(seq_lens))
    ids = torch.randperm(sum(blocks) + 8, device="cuda", generator=g).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for s, n in enumerate(blocks):
        table[s, :n] = ids[used:used + n]
        used += n
    k_cache = torch.randn(ids.numel(), BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v_cache = torch.randn(ids.numel(), BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    tokens = sum(query_lens)
    qkv = torch.randn(tokens, HQ + 2 * HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    query = qkv[:, :HQ]   # a strided view, as the engine's
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    meta = AttentionMetadata(slot_mapping=torch.zeros(tokens, dtype=torch.int64, device="cuda"),
                             query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                             block_tables=table, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                             query_start_loc_host=qsl, seq_lens_host=seq_lens)
    # this step's new K/V as stored in the cache (torch_op reads the new part from them)
    key = torch.empty(tokens, HKV, D, device="cuda", dtype=torch.bfloat16)
    value = torch.empty_like(key)
    for s, (q, c) in enumerate(zip(query_lens, context_lens)):
        k_all, v_all = gather_context(k_cache, v_cache, table[s], c + q)
        key[qsl[s]:qsl[s + 1]], value[qsl[s]:qsl[s + 1]] = k_all[c:], v_all[c:]
    flop = sum(4 * HQ * D * q * (c + (q + 1) / 2) for q, c in zip(query_lens, context_lens))
    return query, key, value, k_cache, v_cache, meta, flop


def fixed_graph(cudnn, handle, query, k_all, v_all, causal: bool):
    """A frontend graph of one exact shape: q [1, HQ, L, D] (strided rows), K/V [1, HKV, S, D]
    contiguous, bottom-right causal or no mask, no padding."""
    length, keys = query.shape[0], k_all.shape[0]
    io = cudnn.data_type.BFLOAT16
    graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    qs = query.stride(0)
    q = graph.tensor(name="q", dim=[1, HQ, length, D], stride=[length * qs, D, qs, 1], data_type=io)
    kv_dims, kv_strides = [1, HKV, keys, D], [keys * HKV * D, D, HKV * D, 1]
    k = graph.tensor(name="k", dim=kv_dims, stride=kv_strides, data_type=io)
    v = graph.tensor(name="v", dim=kv_dims, stride=kv_strides, data_type=io)
    mask = dict(diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0) \
        if causal else {}
    o, _ = graph.sdpa(name="fixed", q=q, k=k, v=v, generate_stats=False, attn_scale=SCALE, **mask)
    out = torch.empty(length, HQ, D, device="cuda", dtype=torch.bfloat16)
    o.set_output(True).set_dim([1, HQ, length, D]).set_stride([length * HQ * D, D, HQ * D, 1])
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
    pack = {q: query, k: k_all, v: v_all, o: out}
    return lambda: graph.execute(pack, workspace, handle=handle)


def main() -> None:
    import cudnn
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    for name, query_lens, context_lens in (("chunk8k_after8k", [8192], [8192]),
                                           ("chunk3000_after9000", [3000], [9000]),
                                           ("long64_like", [3000, 5192], [9000, 0])):
        query, key, value, k_cache, v_cache, meta, flop = make_step(query_lens, context_lens)
        out = torch.empty(query.shape, device="cuda", dtype=torch.bfloat16)
        runs = {}

        def torch_op():
            for s in range(len(query_lens)):
                sdpa_prefill_sequence(query, key, value, k_cache, v_cache, meta.block_tables[s],
                                      meta.query_start_loc_host[s], query_lens[s], context_lens[s], SCALE, out)
        runs["torch_op"] = torch_op
        for mode in ("paged", "gathered"):
            prefill = CudnnPrefill(mode)
            runs[f"graph_{mode}"] = (lambda p: lambda: p(query, k_cache, v_cache, meta, SCALE, out, 0))(prefill)
        runs["triton"] = lambda: prefill_attention(query, key, value, k_cache, v_cache, meta.block_tables,
                                                   meta.seq_lens, meta.query_start_loc, SCALE, out, 0,
                                                   len(query_lens), sum(query_lens))
        if len(query_lens) == 1:
            k_all, v_all = gather_context(k_cache, v_cache, meta.block_tables[0], context_lens[0] + query_lens[0])
            runs["fixed_nopad"] = fixed_graph(cudnn, handle, query, k_all, v_all, True)
            k_ctx, v_ctx = k_all[:context_lens[0]].contiguous(), v_all[:context_lens[0]].contiguous()
            ctx_run = fixed_graph(cudnn, handle, query, k_ctx, v_ctx, False)
            ctx_flop = 4 * HQ * D * query_lens[0] * context_lens[0]
        results = {}
        torch_op()
        expected = out.clone()
        for label in ("graph_paged", "graph_gathered", "triton"):
            out.fill_(float("nan"))
            runs[label]()
            results[f"{label}_max_abs_vs_torch_op"] = float((out.float() - expected.float()).abs().max())
        for label, fn in runs.items():
            try:
                ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                results[label] = dict(ms=round(ms, 3), tflops=round(flop / ms / 1e9, 1))
            except Exception as exc:   # one variant failing must not hide the others
                results[label] = dict(failed=repr(exc)[:200])
        if len(query_lens) == 1:
            ms = triton.testing.do_bench(ctx_run, warmup=10, rep=60, return_mode="median")
            results["ctx_nomask"] = dict(ms=round(ms, 3), tflops=round(ctx_flop / ms / 1e9, 1))
        print("RESULT " + json.dumps(dict(shape=name, query_lens=query_lens, context_lens=context_lens,
                                          **results)), flush=True)


if __name__ == "__main__":
    main()
