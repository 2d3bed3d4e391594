"""cudnn_prefill: the inputs a step's prefill chunks give the cuDNN graph (exact values), and
TritonBackend's "cudnn_graph" path against paged_attention_ref. Off CUDA (or without
cudnn-frontend) the cuDNN call is replaced by reference_execute, which reads the same inputs
the way the graph is specified to (padding mask, bottom-right causal, ragged rows, page table);
on a GPU with cudnn-frontend the real graph runs too."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention import cudnn_prefill  # noqa: E402
from pagedserve.attention.backend import TritonBackend  # noqa: E402
from pagedserve.attention.cudnn_prefill import CudnnPrefill, plan_inputs, reference_execute  # noqa: E402
from pagedserve.attention.torch_ref import paged_attention_ref  # noqa: E402
from tests.kernels.test_paged_attention import DEVICE, TOLERANCES, make_batch  # noqa: E402
from tests.kernels.test_prefill_attention import new_kv, step_meta  # noqa: E402

REAL_CUDNN = DEVICE.type == "cuda" and cudnn_prefill.available()


def test_plan_inputs_exact() -> None:
    """Two decodes, then chunks of 3 (after 5 cached), 20 (fresh) and 2 (after 30): B pads 3 -> 4
    (no queries, one key), S_q and W round up to powers of two (at least the floor), offsets
    count elements from the first prefill token; the page table / gathered slots are the
    sequences' own blocks."""
    tables = torch.tensor([[9, 0, 0], [8, 0, 0], [4, 0, 0], [7, 1, 0], [2, 3, 6]], dtype=torch.int32)
    qsl, seq_lens = [0, 1, 2, 5, 25, 27], [4, 9, 8, 20, 32]
    paged = plan_inputs(qsl, seq_lens, tables, 2, 5, q_token_stride=48, o_token_stride=32, kv_token_elems=16,
                        block_size=16, mode="paged", floor=(1, 16, 2))
    assert (paged.num_seqs, paged.batch, paged.max_query_len, paged.table_width) == (3, 4, 32, 2)
    assert (paged.token_begin, paged.num_tokens) == (2, 25)
    assert paged.seq_len_q.flatten().tolist() == [3, 20, 2, 0]
    assert paged.seq_len_kv.flatten().tolist() == [8, 20, 32, 1]
    assert paged.q_offsets.flatten().tolist() == [0, 3 * 48, 23 * 48, 25 * 48, 25 * 48]
    assert paged.o_offsets.flatten().tolist() == [0, 3 * 32, 23 * 32, 25 * 32, 25 * 32]
    assert paged.page_table.shape == (4, 1, 2, 1)
    assert paged.page_table[:, 0, :, 0].tolist() == [[4, 0], [7, 1], [2, 3], [0, 0]]
    assert paged.kv_slots is None and paged.kv_offsets is None
    gathered = plan_inputs(qsl, seq_lens, tables, 2, 5, 48, 32, 16, 16, "gathered", floor=(8, 1024, 64))
    assert (gathered.batch, gathered.max_query_len, gathered.table_width, gathered.kv_rows) == (8, 1024, 64, 65)
    slots = gathered.kv_slots.tolist()
    assert slots[:8] == [4 * 16 + j for j in range(8)]
    assert slots[8:28] == [7 * 16 + j for j in range(16)] + [16 + j for j in range(4)]
    assert slots[28:60] == [2 * 16 + j for j in range(16)] + [3 * 16 + j for j in range(16)]
    assert slots[60:] == [0] * 5   # five padding sequences, one key each
    assert gathered.kv_offsets.flatten().tolist() == [0, 128, 448, 960, 976, 992, 1008, 1024, 1040]
    with pytest.raises(ValueError, match="mode"):
        plan_inputs(qsl, seq_lens, tables, 2, 5, 48, 32, 16, 16, "ragged")


def _step(query_lens, context_lens, num_decodes, dtype, seed, strided_query):
    """One step's batch (the new tokens' K/V already in the cache), its metadata with the host
    lists and the reference output."""
    batch = make_batch(query_lens=query_lens, context_lens=context_lens, num_heads=4, num_kv_heads=2,
                       head_dim=64 if REAL_CUDNN else 32, block_size=16, dtype=dtype, seed=seed)
    query = batch.query
    if strided_query:   # a view into a wider [T, Hq + 2 Hkv, D] buffer, as the qkv projection gives
        wide = torch.randn(query.shape[0], query.shape[1] + 4, query.shape[2]).to(DEVICE, dtype)
        wide[:, :query.shape[1]] = query
        query = wide[:, :query.shape[1]]
        assert not query.is_contiguous()
    num_tokens = int(batch.query_start_loc[-1])
    meta = step_meta(batch, num_decodes, host_lists=True)
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                   batch.seq_lens, batch.query_start_loc, batch.scale, num_decodes)
    return batch, query, meta, expected, num_tokens


def attend_step(backend, query_lens, context_lens, num_decodes, dtype, seed) -> None:
    """One step (strided query) through backend.attend against the reference; rows past the step's
    tokens stay untouched."""
    batch, query, meta, expected, num_tokens = _step(query_lens, context_lens, num_decodes, dtype, seed, True)
    out = torch.full_like(batch.query, float("nan"))
    backend.attend(query, None, None, batch.k_cache, batch.v_cache, meta, batch.scale, out=out)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=atol, rtol=rtol)
    assert out[num_tokens:].isnan().all(), "rows past the step's tokens were written"


def _backend(mode: str, real: bool) -> TritonBackend:
    backend = TritonBackend()
    backend.prefill_min_query_len, backend.sdpa_min_query_len = 8, 20
    backend.long_chunk_path, backend.cudnn_graph_mode = "cudnn_graph", mode
    backend._cudnn_prefill = CudnnPrefill(mode, executor=None if real else reference_execute)
    return backend


@pytest.mark.parametrize("mode", cudnn_prefill.MODES)
@pytest.mark.parametrize("real", [False, True] if REAL_CUDNN else [False])
def test_backend_cudnn_graph_step(mode: str, real: bool) -> None:
    """Decodes -> the paged kernel; every chunk (short ones too) -> one graph call on a strided
    query; a second, smaller step reuses the first one's graph (B / S_q / W only grow)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    backend = _backend(mode, real)
    for query_lens, context_lens, num_decodes, seed in (([1, 1, 24, 9, 40], [30, 3, 17, 0, 50], 2, 5),
                                                         ([1, 33, 2], [7, 0, 40], 1, 6),
                                                         ([1, 1, 24, 9, 40], [30, 3, 17, 0, 50], 2, 8)):
        attend_step(backend, query_lens, context_lens, num_decodes, dtype, seed)
        assert backend.long_chunk_path == "cudnn_graph"
    assert backend._cudnn_prefill._floor == (4, 1024, 64)
    if real:   # one graph per cache (the first and third steps' caches have one shape)
        assert backend._cudnn_prefill.graphs_built == 2


def test_graph_only_for_uneven_long_chunks() -> None:
    """"cudnn_graph" sends a step to the graph only when one of its long chunks has a length or
    context off cudnn_shape_multiple; a step of round long chunks goes to torch's op (the math
    stand-in off CUDA) one sequence at a time, as "cudnn" does."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    backend = _backend("paged", False)
    backend.cudnn_shape_multiple = 16
    backend._sdpa_available = lambda device, dtype, head_dim: True
    graph_calls, op_calls = [], []
    backend._cudnn_prefill.executor = lambda *a: graph_calls.append(a[3].num_seqs) or reference_execute(*a)
    real_op = backend._sdpa_prefill_sequence
    backend._sdpa_prefill_sequence = lambda *a: op_calls.append(a[6:9]) or real_op(*a)
    for query_lens, context_lens, seed in (([1, 32, 8], [7, 16, 3], 9), ([1, 32, 20], [7, 16, 0], 10)):
        batch, query, meta, expected, num_tokens = _step(query_lens, context_lens, 1, dtype, seed, False)
        key, value = new_kv(batch)   # this step's K/V as stored (torch's op reads the new part from them)
        out = backend.attend(query, key, value, batch.k_cache, batch.v_cache, meta, batch.scale)
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=atol, rtol=rtol)
    assert op_calls == [(1, 32, 16)]   # step 1: its one long chunk is round (the 8-token one is short)
    assert graph_calls == [2]   # step 2: the 20-token chunk is not: both chunks in one graph call


def test_failing_graph_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A graph call that raises is logged once, the step is attended by the other path and the
    backend stays off the graph path."""
    monkeypatch.setattr(TritonBackend, "long_chunk_path", TritonBackend.long_chunk_path)

    def broken(*args):
        raise RuntimeError("no plan for this graph")

    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    backend = _backend("paged", False)
    backend._cudnn_prefill.executor = broken
    backend._sdpa_available = lambda device, dtype, head_dim: False   # then: the Triton kernel
    batch, query, meta, expected, num_tokens = _step([1, 24, 30], [3, 17, 5], 1, dtype, 7, False)
    with caplog.at_level(logging.WARNING, logger="pagedserve.attention.backend"):
        out = backend.attend(query, None, None, batch.k_cache, batch.v_cache, meta, batch.scale)
    assert "cuDNN's graph attention failed" in caplog.text
    assert TritonBackend.long_chunk_path == "cudnn"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=atol, rtol=rtol)
