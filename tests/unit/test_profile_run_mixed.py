"""Start-up's dry run covers the decode launches of mixed steps (worker/profile_run.py,
mixed_step_metas): the decode graphs' launches rotate and store inside the kernel, a mixed step's
decode rows do not, so without these dry steps their specialisations compile at a run's first
mixed steps (session 29: a machine's first thr512 process stalled 1.0-1.6 s in one step). Checked on
the CPU through the Triton backend's own decisions: each dry step's decode rows take a distinct
launch variant (tiles, split, in-kernel merge, no rotary), and together every variant that any
mixed step of 1..max_num_seqs - 1 decode rows, at any context up to max_model_len, would take."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.attention import paged_launch, triton_paged_attention as tpa  # noqa: E402
from pagedserve.attention.backend import TritonBackend  # noqa: E402
from pagedserve.attention.metadata import AttentionMetadata  # noqa: E402
from pagedserve.attention.paged_launch import default_tile_config  # noqa: E402
from pagedserve.worker.profile_run import mixed_step_metas  # noqa: E402

H200_SMS = 132


def _runner(heads: tuple[int, int, int], max_num_seqs: int, max_model_len: int, cascade: bool = False
            ) -> SimpleNamespace:
    layer = SimpleNamespace(num_heads=heads[0], num_kv_heads=heads[1], head_dim=heads[2])
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_model_len=max_model_len),
                           model=SimpleNamespace(attention_layers=lambda: [layer]),
                           model_config=SimpleNamespace(dtype=torch.bfloat16), block_size=16, cascade=cascade)


def _decode_variants(backend: TritonBackend, meta: AttentionMetadata, heads, monkeypatch) -> list[tuple]:
    """The variant of each paged-attention launch attend() makes for `meta` (launches recorded, not run)."""
    launched = []

    def record(query, k_cache, v_cache, block_tables, seq_lens, qsl, scale, out, partials, seq_begin, seq_end,
               max_query_len, max_tokens, config, plan, rotary_store=None, arrivals=None, wait_inputs=False,
               prefix=None):
        launched.append((max_query_len, config, partials is not None, arrivals is not None, rotary_store is not None,
                         query.shape[0], out.shape[0], None if partials is None else partials[0].shape[0],
                         prefix is not None))

    monkeypatch.setattr(tpa, "_launch_attention", record)
    monkeypatch.setattr(tpa, "cascade_prefix", lambda *args: (None, None, None, 1))   # the prefix launch: not run
    monkeypatch.setattr(backend, "_triton_prefill", lambda *args, **kwargs: None)
    num_heads, num_kv_heads, head_dim = heads
    tokens = meta.slot_mapping.shape[0]
    cache = torch.zeros(1, 16, num_kv_heads, head_dim, dtype=torch.bfloat16)
    backend.attend(torch.zeros(tokens, num_heads, head_dim, dtype=torch.bfloat16), None, None, cache, cache, meta,
                   head_dim ** -0.5)
    return launched


def _probe() -> AttentionMetadata:
    """mixed_step_metas' profile metadata (only its device is read)."""
    return AttentionMetadata(torch.zeros(1, dtype=torch.int64), torch.zeros(2, dtype=torch.int32),
                             torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32), 1, 1)


def _every_variant(heads, min_rows: int, max_rows: int, chunk: int, max_model_len: int, cascade: bool = False) -> set:
    """(tiles, split) of every decode launch a mixed step's min_rows..max_rows decode rows can take,
    contexts from the chunk's length (the step's longest sequence is at least its chunk) up to
    max_model_len (cascade: the cascade's decode launch)."""
    num_heads, num_kv_heads, head_dim = heads
    variants = set()
    for rows in range(min_rows, max_rows + 1):
        for longest in range(chunk, max_model_len + 1, 64):
            tiles, plan, _ = paged_launch.launch_plan(rows, num_heads, num_kv_heads, head_dim, 1, longest,
                                                      torch.bfloat16, torch.device("cpu"), cascade=cascade)
            variants.add((tiles or default_tile_config(num_heads // num_kv_heads, head_dim, 1, torch.bfloat16),
                          plan.num_segments > 1))
    return variants


def launches_segments(meta: AttentionMetadata, heads) -> int:
    _, plan, _ = paged_launch.launch_plan(meta.num_decodes, heads[0], heads[1], heads[2], 1, meta.max_seq_len, torch.bfloat16,
                                 torch.device("cpu"))
    return plan.num_segments


@pytest.mark.parametrize("heads,max_num_seqs,max_model_len,num_tokens", [
    ((32, 8, 64), 512, 2048, 2048),      # llama-1b, thr512's engine
    ((32, 8, 128), 256, 32768, 8192),    # llama-8b at long context
    ((16, 2, 64), 1024, 4096, 16384),    # fewer KV heads: narrow launches up to 16 rows
])
def test_dry_steps_take_every_decode_launch_variant_of_mixed_steps(heads, max_num_seqs, max_model_len, num_tokens,
                                                                    monkeypatch):
    # the H200's count: the CPU's stand-in (8) would split differently
    monkeypatch.setattr(paged_launch, "sm_count", lambda device: H200_SMS)
    backend = TritonBackend()
    chunk = backend.prefill_min_query_len
    probe = _probe()
    metas = mixed_step_metas(_runner(heads, max_num_seqs, max_model_len), backend, probe, num_tokens)
    seen = []
    for meta in metas:
        assert meta.num_decodes < meta.num_seqs and meta.max_query_len == chunk == int(meta.seq_lens[-1])
        assert meta.slot_mapping.shape[0] == meta.num_decodes + chunk <= num_tokens
        assert torch.equal(meta.query_start_loc, torch.tensor(meta.query_start_loc_host, dtype=torch.int32))
        launches = _decode_variants(backend, meta, heads, monkeypatch)
        assert len(launches) == 1   # the decode rows' launch (the prompt chunk's is the prefill kernel's)
        max_query_len, config, split, merged, rotary, query_rows, out_rows, partial_rows, cascade = launches[0]
        assert max_query_len == 1 and not rotary and merged == split and not cascade
        # the decode rows' tokens only: partials sized by them, merged in the launch at any step size
        assert query_rows == out_rows == meta.num_decodes
        assert partial_rows is None or partial_rows == meta.num_decodes * heads[0] * launches_segments(meta, heads)
        seen.append((config, split))
    assert len(set(seen)) == len(seen) >= 2   # one dry step per variant
    # every variant a mixed step's decode rows can take: every row count, contexts from the
    # chunk's length (the step's longest sequence is at least its chunk) up to max_model_len
    assert set(seen) == _every_variant(heads, 1, min(max_num_seqs - 1, num_tokens - chunk), chunk, max_model_len)


def test_a_large_mixed_steps_decode_launch_is_sized_by_its_decode_rows(monkeypatch):
    """5 decodes beside 16 prompt chunks of 1,000 tokens (a thr512 step at max_num_batched_tokens
    16384): the decode launch's partials hold 5 tokens, not 16,005 (~1 GB at llama-1b's heads and
    8 segments), and it merges in the kernel (the arrival counters cover 5 x 8, not 16,005 x 8 >
    65,536), as the dry steps' launch does: the same specialisation."""
    monkeypatch.setattr(paged_launch, "sm_count", lambda device: H200_SMS)
    heads, rows, chunk, prompts = (32, 8, 64), 5, 1000, 16
    seq_lens = [16000] * rows + [chunk] * prompts
    starts = list(range(rows + 1)) + [rows + chunk * (i + 1) for i in range(prompts)]
    meta = AttentionMetadata(torch.full((starts[-1],), -1, dtype=torch.int64), torch.tensor(starts, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), torch.zeros(rows + prompts, 1000, dtype=torch.int32),
                             chunk, 16000, rows, rows, starts, seq_lens)
    (launch,) = _decode_variants(TritonBackend(), meta, heads, monkeypatch)
    max_query_len, config, split, merged, rotary, query_rows, out_rows, partial_rows, _ = launch
    assert split and merged and not rotary
    assert query_rows == out_rows == rows and partial_rows == rows * 32 * launches_segments(meta, heads)


@pytest.mark.parametrize("heads,max_num_seqs,max_model_len,num_tokens", [
    ((32, 8, 128), 256, 32768, 8192),    # llama-8b at long context (prefix256's engine has more rows)
    ((32, 8, 64), 512, 2048, 2048),      # llama-1b
])
def test_dry_steps_take_every_cascade_launch_variant_of_mixed_steps(heads, max_num_seqs, max_model_len, num_tokens,
                                                                    monkeypatch):
    """With the cascade on, the dry steps also hold decode rows that share a prefix (>= CASCADE_MIN_ROWS of
    them): their decode launch (the cascade's tiles and capped plan, no rotary) in every variant such rows can
    take; the plain dry steps are unchanged."""
    from pagedserve.attention import cascade_plan
    from pagedserve.attention.cascade_plan import CASCADE_MIN_ROWS
    monkeypatch.setattr(paged_launch, "sm_count", lambda device: H200_SMS)
    backend = TritonBackend()
    chunk = backend.prefill_min_query_len
    probe = _probe()
    plain = mixed_step_metas(_runner(heads, max_num_seqs, max_model_len), backend, probe, num_tokens)
    metas = mixed_step_metas(_runner(heads, max_num_seqs, max_model_len, cascade=True), backend, probe, num_tokens)
    assert [m.num_decodes for m in metas if m.cascade is None] == [m.num_decodes for m in plain]
    seen = []
    for meta in (m for m in metas if m.cascade is not None):
        lengths, members, bounds = meta.cascade
        assert meta.num_decodes >= CASCADE_MIN_ROWS and lengths.tolist() == [meta.max_seq_len - 1] * meta.num_decodes
        assert members.tolist() == list(range(meta.num_decodes))
        assert bounds.tolist() == [0] + [meta.num_decodes] * cascade_plan.CASCADE_MAX_GROUPS   # one group of them all
        (launch,) = _decode_variants(backend, meta, heads, monkeypatch)
        max_query_len, config, split, merged, rotary, query_rows, out_rows, _, cascade = launch
        assert max_query_len == 1 and not rotary and cascade and merged == split
        assert query_rows == out_rows == meta.num_decodes
        seen.append((config, split))
    assert len(set(seen)) == len(seen) >= 1
    assert set(seen) == _every_variant(heads, CASCADE_MIN_ROWS, min(max_num_seqs - 1, num_tokens - chunk), chunk,
                                       max_model_len, cascade=True)
