"""paged_attention (Triton) against paged_attention_ref over ragged mixed batches.

Every case: seeded random cache (unused slots hold junk that must be ignored), random
non-contiguous block tables, output poisoned with NaN before the call, padding tokens past
query_start_loc[-1] that must stay untouched. Tolerances are per dtype (TOLERANCES).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention.torch_ref import paged_attention_ref  # noqa: E402
from pagedserve.attention import split_plan, triton_paged_attention as tpa  # noqa: E402
from pagedserve.attention.split_plan import SplitPlan, choose_splits  # noqa: E402
from pagedserve.attention.triton_paged_attention import paged_attention  # noqa: E402
from tests.paged_batch import DEVICE, NUM_PAD_TOKENS, Batch, make_batch  # noqa: E402,F401  (the other kernel tests' too)

# The interpreter (CPU) runs numpy, which has no bfloat16: half types are tested on CUDA only.
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [torch.float32]
# (atol, rtol) against the reference computed in the same dtype.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def check_against_reference(batch: Batch, num_decodes: int | None, num_splits: int | None = None) -> None:
    num_tokens = int(batch.query_start_loc[-1])
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                   batch.seq_lens, batch.query_start_loc, batch.scale, num_decodes)
    out = torch.full_like(batch.query, float("nan"))
    returned = paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                               batch.seq_lens, batch.query_start_loc, batch.scale,
                               batch.max_query_len, batch.max_seq_len, num_decodes=num_decodes,
                               out=out, num_splits=num_splits)
    assert returned is out
    atol, rtol = TOLERANCES[batch.query.dtype]
    torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=atol, rtol=rtol)
    assert out[num_tokens:].isnan().all(), "padding tokens past query_start_loc[-1] were written"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("queries_per_kv", [1, 2, 4, 8])
def test_mixed_batch(queries_per_kv: int, head_dim: int, block_size: int, dtype: torch.dtype) -> None:
    # two decodes, a chunk continuing after 21 cached tokens, a fresh prompt spanning blocks
    batch = make_batch(query_lens=[1, 1, 9, 37], context_lens=[40, 6, 21, 0],
                       num_heads=2 * queries_per_kv, num_kv_heads=2, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=queries_per_kv * 1000 + head_dim + block_size)
    check_against_reference(batch, num_decodes=2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [None, 1, 4, 20])
def test_decode_only(num_splits: int | None, block_size: int, dtype: torch.dtype) -> None:
    """20 splits: more segments than key tiles (empty ones) and than one reduce chunk (16)."""
    batch = make_batch(query_lens=[1, 1, 1], context_lens=[0, 70, 130], num_heads=8, num_kv_heads=2,
                       head_dim=64, block_size=block_size, dtype=dtype, seed=block_size)
    check_against_reference(batch, num_decodes=3, num_splits=num_splits)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_decodes", [None, 0])
def test_prefill_only(num_decodes: int | None, dtype: torch.dtype) -> None:
    batch = make_batch(query_lens=[33, 1, 17], context_lens=[0, 0, 0], num_heads=4, num_kv_heads=1,
                       head_dim=64, block_size=16, dtype=dtype, seed=5)
    check_against_reference(batch, num_decodes=num_decodes)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_any_order_and_empty_query(num_splits: int | None, dtype: torch.dtype) -> None:
    """Decodes interleaved with chunks, and a sequence with no new tokens, num_decodes unknown."""
    batch = make_batch(query_lens=[5, 1, 0, 12, 1], context_lens=[3, 50, 9, 0, 16], num_heads=4,
                       num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, seed=11)
    check_against_reference(batch, num_decodes=None, num_splits=num_splits)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block_size,head_dim,num_splits", [(8, 96, None), (64, 96, 3), (64, 32, 2)])
def test_long_context_odd_shapes(block_size: int, head_dim: int, num_splits: int | None,
                                 dtype: torch.dtype) -> None:
    """A chunk after a long cached context (many blocks), head_dim padded to a power of two."""
    batch = make_batch(query_lens=[1, 24], context_lens=[150, 100], num_heads=6, num_kv_heads=2,
                       head_dim=head_dim, block_size=block_size, dtype=dtype, seed=block_size + head_dim)
    check_against_reference(batch, num_decodes=1, num_splits=num_splits)


def test_strided_query_and_allocated_output() -> None:
    """query as a view into a fused qkv projection (token stride > heads * head_dim), out=None."""
    batch = make_batch(query_lens=[1, 6], context_lens=[20, 3], num_heads=4, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32, seed=3)
    fused = torch.randn(batch.query.shape[0], 8 * 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    query = fused[:, :4 * 64].view(-1, 4, 64)
    assert not query.is_contiguous()
    expected = paged_attention_ref(query, batch.k_cache, batch.v_cache, batch.block_tables,
                                   batch.seq_lens, batch.query_start_loc, batch.scale, 1)
    out = paged_attention(query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                          batch.query_start_loc, batch.scale, None, None, num_decodes=1)
    torch.testing.assert_close(out[:7], expected[:7], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", ["kv_heads", "dtype", "qsl_len", "table_dtype", "out_shape"])
def test_bad_inputs_raise_clear_errors(bad: str) -> None:
    batch = make_batch(query_lens=[1, 4], context_lens=[5, 0], num_heads=4, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32, seed=0)
    args = dict(query=batch.query, k_cache=batch.k_cache, v_cache=batch.v_cache,
                block_tables=batch.block_tables, seq_lens=batch.seq_lens,
                query_start_loc=batch.query_start_loc, scale=batch.scale,
                max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len)
    if bad == "kv_heads":
        args["query"] = batch.query[:, :3]
    elif bad == "dtype":
        args["query"] = batch.query.double()
    elif bad == "qsl_len":
        args["query_start_loc"] = batch.query_start_loc[:-1]
    elif bad == "table_dtype":
        args["block_tables"] = batch.block_tables.long()
    else:
        args["out"] = torch.empty_like(batch.query[:, :2])
    with pytest.raises(ValueError):
        paged_attention(**args)


def test_split_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    def splits(*args) -> int:
        return choose_splits(*args).num_segments
    # llama-8b shapes on a 132-SM H100 / H200: fewer programs than SMs
    assert splits(1, 8, 1, 2048, 64, 132) == 32
    assert splits(1, 8, 1, 256, 64, 132) == 4
    assert choose_splits(1, 8, 1, 256, 64, 132) == SplitPlan(4, 2, 8, 2)   # the short-context rule
    assert splits(1, 8, 1024, 1024, 64, 132) == 1  # prefill never splits
    assert splits(1, 8, 1, 128, 64, 132) == 1  # too short to be worth a reduce
    # chunked (default): the count rule unless its segments could exceed CHUNK_TILES (32) tiles at
    # the bound; then segments of CHUNK_TILES tiles, as many as the longest context may need
    assert choose_splits(35, 8, 1, 32768, 64, 132) == SplitPlan(16, 32, 0, 0)
    assert choose_splits(66, 8, 1, 32768, 64, 132) == SplitPlan(16, 32, 0, 0)
    assert choose_splits(16, 8, 1, 32768, 64, 132) == SplitPlan(16, 32, 0, 0)
    assert choose_splits(64, 8, 1, 2048, 64, 132) == SplitPlan(2)       # 16 tiles a segment at most
    assert choose_splits(16, 8, 1, 2048, 64, 132) == SplitPlan(2)
    assert choose_splits(1, 8, 1, 32768, 64, 132) == SplitPlan(32)
    assert splits(512, 8, 1, 2048, 64, 132) == 1     # 32 tiles: one chunk (thr512's bound)
    # the partials stay under MAX_PARTIAL_BYTES: 512 rows x 32 heads x 130 floats = 8.5 MB a segment
    assert choose_splits(512, 8, 1, 32768, 64, 132, 32, 128) == SplitPlan(7, 74, 0, 0)
    monkeypatch.setattr(split_plan, "SPLIT_RULE", "legacy")   # below 4 programs per SM: >= 8 tiles a segment
    assert splits(16, 8, 1, 32768, 64, 132) == 2
    assert splits(35, 8, 1, 32768, 64, 132) == 4
    assert splits(64, 8, 1, 2048, 64, 132) == 2
    assert splits(20, 8, 1, 256, 64, 132) == 1    # 4 tiles: not 8 a segment
    assert splits(66, 8, 1, 32768, 64, 132) == 1  # 528 programs: 4 per SM already


@pytest.mark.parametrize("rule", ["chunked", "legacy"])
def test_decode_rules_match_the_reference(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Enough sequences to fill the interpreter's 8 "SMs": contexts of one chunk, a few, and
    one past the graph-like max_seq_len bound's first segments; each rule's plan (chunks of 2
    tiles here) against the reference."""
    monkeypatch.setattr(split_plan, "SPLIT_RULE", rule)
    monkeypatch.setattr(split_plan, "CHUNK_TILES", 2)   # the count rule's 2 segments of up to 32 tiles exceed it
    batch = make_batch(query_lens=[1] * 6, context_lens=[0, 20, 64, 150, 300, 33], num_heads=8, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32, seed=21)
    batch.max_seq_len = 1024   # an upper bound, as the decode graphs pass max_model_len
    check_against_reference(batch, num_decodes=6)


def test_narrow_plan_against_the_reference() -> None:
    """The narrow launch's plan (SplitPlan(n, 2, 16, 4) over 32-key tiles: lone, one tile a
    segment, two a segment) against the torch reference, under a graph's bound."""
    batch = make_batch(query_lens=[1] * 6, context_lens=[0, 100, 127, 300, 511, 700], num_heads=8, num_kv_heads=2,
                       head_dim=128, block_size=16, dtype=torch.float32, seed=24)
    batch.max_seq_len = 2048
    check_against_reference(batch, num_decodes=6, num_splits=SplitPlan(8, 2, 16, 4))


@pytest.mark.parametrize("max_registers", [None, 64])
def test_register_cap_is_the_same_launch(max_registers: int | None) -> None:
    """TileConfig.max_registers (Triton's maxnreg, for occupancy sweeps of the decode launch) changes
    how the launch is compiled, not what it computes: a decode batch against the torch reference and
    bit for bit against the uncapped launch."""
    from pagedserve.attention.paged_launch import TileConfig
    batch = make_batch(query_lens=[1] * 5, context_lens=[0, 33, 100, 250, 17], num_heads=8, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32, seed=7)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
            batch.scale, 1, 512)
    capped = paged_attention(*args, num_decodes=5, tiles=TileConfig(16, 64, 4, 3, max_registers))
    plain = paged_attention(*args, num_decodes=5, tiles=TileConfig(16, 64, 4, 3))
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, batch.scale, 5)
    torch.testing.assert_close(capped[:5], expected[:5], atol=1e-5, rtol=1e-5)
    assert torch.equal(capped[:5], plain[:5])


def test_chunked_plan_equals_the_merge_of_forced_segments() -> None:
    """Exits of unused segments and one-segment rows writing `out` directly round as the
    full merge would: a plan with chunks of 3 tiles against the same plan over more segments."""
    batch = make_batch(query_lens=[1] * 4, context_lens=[10, 100, 200, 290], num_heads=4, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32, seed=8)
    outs = []
    for segments in (4, 9):
        out = torch.full_like(batch.query, float("nan"))
        paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                        batch.query_start_loc, batch.scale, 1, batch.max_seq_len, num_decodes=4, out=out,
                        num_splits=SplitPlan(segments, 3, 0, 0))
        outs.append(out)
    assert torch.equal(outs[0][:4], outs[1][:4])
    assert outs[0][4:].isnan().all() and outs[1][4:].isnan().all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("queries_per_kv,head_dim,num_splits", [
    (4, 64, None), (4, 64, 1), (2, 128, 4), (1, 32, SplitPlan(5, 3, 0, 0)),
    (3, 64, SplitPlan(3, 2, 0, 0)), (8, 128, SplitPlan(4, 2, 0, 0)),   # the default model's 9 / 3; llama-70b's
    (4, 128, SplitPlan(8, 2, 16, 4))])   # narrow_decode_launch's plan (fp32's tiles are its 32 keys)
def test_rotary_store_in_the_decode_launch(dtype: torch.dtype, queries_per_kv: int, head_dim: int,
                                          num_splits: int | SplitPlan | None) -> None:
    """rotary_store: views of one qkv projection, unrotated; the decode launch rotates q and the new
    key, and the last active segment stores the key and value before it reads their tile. Against
    rotary_store_kv then the plain launch: the cache and the output bit for bit (bf16 agreement
    with transformers depends on it: a first version, which scored the new key apart, took
    one-at-a-time agreement on the H200 from 30 to 21 of 40); the new keys' slots hold NaN before
    the launch (overwritten before they are read), q / k / v are left as they were, a padded row
    (slot -1, seq_len 1, as the decode graphs pad) stores nothing, and the rows past the batch are
    not written."""
    from pagedserve.attention.triton_store_kv import RotaryStore, rotary_store_kv
    from pagedserve.layers.rotary import RotaryEmbedding
    num_kv_heads, block_size = 2, 16
    num_heads = num_kv_heads * queries_per_kv
    context_lens = [0, 7, 15, 40, 130, 0]   # the last row: a graph's padding (seq_len 1, slot -1)
    batch = make_batch([1] * len(context_lens), context_lens, num_heads, num_kv_heads, head_dim, block_size,
                       dtype, seed=head_dim + queries_per_kv)
    tokens = batch.query.shape[0]   # the batch's rows and NUM_PAD_TOKENS more
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(tokens, num_heads, head_dim)
    k, v = k.view(tokens, num_kv_heads, head_dim), v.view(tokens, num_kv_heads, head_dim)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, dtype=dtype).to(DEVICE)
    positions = torch.tensor(context_lens + [0] * NUM_PAD_TOKENS, device=DEVICE)
    tables = batch.block_tables.cpu()
    slots = [int(tables[s, c // block_size]) * block_size + c % block_size for s, c in enumerate(context_lens)]
    slots[-1] = -1
    slots = torch.tensor(slots + [-1] * NUM_PAD_TOKENS, device=DEVICE)
    n = len(context_lens)
    args = (batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.scale, 1, 512)

    ref_qkv, ref_caches = qkv.clone(), [batch.k_cache.clone(), batch.v_cache.clone()]
    rq, rk, rv = ref_qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    rq = rq.view(tokens, num_heads, head_dim)
    rk, rv = rk.view(tokens, num_kv_heads, head_dim), rv.view(tokens, num_kv_heads, head_dim)
    rotary_store_kv(positions, rq, rk, rv, rope.cos_cache, rope.sin_cache, *ref_caches, slots)
    expected = paged_attention(rq, *ref_caches, *args, num_decodes=n, out=torch.full_like(rq, float("nan")),
                               num_splits=num_splits)

    caches = [batch.k_cache.clone(), batch.v_cache.clone()]
    live = slots >= 0
    for cache in caches:
        cache.view(-1, num_kv_heads, head_dim)[slots[live]] = float("nan")
    before = qkv.clone()
    out = paged_attention(q, *caches, *args, num_decodes=n, out=torch.full_like(q, float("nan")),
                          num_splits=num_splits,
                          rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache))
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    assert torch.equal(qkv, before)
    assert torch.equal(out[:n], expected[:n]) and out[n:].isnan().all()
    with pytest.raises(ValueError, match="all-decode"):
        paged_attention(q, *caches, *args[:4], 2, 512, num_decodes=n,
                        rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache))


@pytest.mark.parametrize("num_splits", [None, 1, 3, SplitPlan(6, 2, 0, 0)])
def test_heads_first_grid_is_the_same_launch(num_splits: int | SplitPlan | None, monkeypatch) -> None:
    """DECODE_HEADS_FIRST (a sequence's KV-head programs adjacent in the grid: the 8 heads read one
    KV block at about the same time; H200, 448 rows of llama-1b heads: 200.0 -> 189.2 us, session
    31) changes only which program does what: a decode launch that rotates, stores, splits and
    merges in the kernel gives the same output and cache bits either way."""
    from pagedserve.attention import triton_paged_attention as tpa
    from pagedserve.attention.triton_store_kv import RotaryStore
    from pagedserve.layers.rotary import RotaryEmbedding
    num_kv_heads, queries_per_kv, head_dim, block_size = 4, 2, 32, 16
    num_heads = num_kv_heads * queries_per_kv
    context_lens = [3, 70, 15, 0, 200]
    batch = make_batch([1] * len(context_lens), context_lens, num_heads, num_kv_heads, head_dim, block_size,
                       torch.float32, seed=31)
    tokens = batch.query.shape[0]
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, dtype=torch.float32).to(DEVICE)
    tables = batch.block_tables.cpu()
    slots = [int(tables[s, c // block_size]) * block_size + c % block_size for s, c in enumerate(context_lens)]
    slots = torch.tensor(slots + [-1] * (tokens - len(slots)), device=DEVICE)
    results = []
    for heads_first in (False, True):
        monkeypatch.setattr(tpa, "DECODE_HEADS_FIRST", heads_first)
        caches = [batch.k_cache.clone(), batch.v_cache.clone()]
        out = paged_attention(batch.query.clone(), *caches, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                              batch.scale, 1, 512, num_decodes=len(context_lens), num_splits=num_splits,
                              out=torch.full_like(batch.query, float("nan")),
                              rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache))
        results.append((out[:len(context_lens)], *caches))
    assert not results[0][0].isnan().any()
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("queries_per_kv,num_splits", [(4, None), (1, 4), (2, SplitPlan(6, 2, 0, 0)), (8, 3)])
def test_merge_in_kernel_equals_the_reduce(dtype: torch.dtype, queries_per_kv: int,
                                          num_splits: int | SplitPlan | None, monkeypatch) -> None:
    """MERGE_IN_KERNEL: the last segment of each (token, KV head) merges its group's partials in
    the attention launch; against the reduce kernel's merge of the same partials (the same
    formulas: fp32 within 1e-6), twice on the same counters (each reset by its last segment:
    all zero after), rows with one active segment and rows past the batch left to the launch."""
    batch = make_batch(query_lens=[1] * 5, context_lens=[3, 20, 64, 150, 300], num_heads=2 * queries_per_kv,
                       num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, seed=queries_per_kv)
    outs = []
    for merge in (False, True, True):
        monkeypatch.setattr(tpa, "MERGE_IN_KERNEL", merge)
        out = torch.full_like(batch.query, float("nan"))
        paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                        batch.query_start_loc, batch.scale, 1, 512, num_decodes=5, out=out, num_splits=num_splits)
        outs.append(out)
    from pagedserve.attention import triton_segment_merge
    counters = triton_segment_merge._ARRIVALS
    assert counters and not counters[batch.query.device].any()
    tol = 1e-6 if dtype == torch.float32 else TOLERANCES[dtype][0]
    for out in outs[1:]:
        torch.testing.assert_close(out[:5], outs[0][:5], atol=tol, rtol=tol)
        assert out[5:].isnan().all()
    check_against_reference(batch, num_decodes=5, num_splits=num_splits)   # the reduce path itself


def test_rotary_store_with_the_reduce_kernel(monkeypatch) -> None:
    """Rotary + KV store in the launch, its split-K partials merged by the reduce launch
    (MERGE_IN_KERNEL off), against rotary_store_kv, the plain launch and the reduce kernel."""
    monkeypatch.setattr(tpa, "MERGE_IN_KERNEL", False)
    test_rotary_store_in_the_decode_launch(torch.float32, 4, 64, SplitPlan(5, 1, 0, 0))


def _step_metadata(num_seqs: int, max_query_len: int, num_decodes: int):
    """Metadata of a step whose launches the routing tests below intercept (no cache behind it)."""
    from pagedserve.attention.metadata import AttentionMetadata
    tokens = num_seqs * max_query_len
    return AttentionMetadata(slot_mapping=torch.zeros(tokens, dtype=torch.int64),
                             query_start_loc=torch.zeros(num_seqs + 1, dtype=torch.int32),
                             seq_lens=torch.ones(num_seqs, dtype=torch.int32),
                             block_tables=torch.zeros(num_seqs, 1, dtype=torch.int32),
                             max_query_len=max_query_len, max_seq_len=8, num_decodes=num_decodes)


def test_fused_decode_takes_small_all_decode_steps_only(monkeypatch) -> None:
    """TritonBackend.decode launches rotary + KV store + attention in one kernel for all-decode
    steps of at most fused_decode_max_seqs sequences; a larger step, a step with a prefill, or the
    switch off returns None (the caller then runs rotary_store_kv and the plain launch)."""
    from pagedserve.attention.backend import TritonBackend
    backend = TritonBackend()
    launched = []
    monkeypatch.setattr(backend, "_paged_attention", lambda q, *args, **kwargs: launched.append(kwargs) or q)
    rope = type("Rope", (), dict(cos_cache=torch.zeros(4, 8), sin_cache=torch.zeros(4, 8)))()

    def step(num_seqs: int, max_query_len: int = 1, num_decodes: int | None = None):
        tokens = num_seqs * max_query_len
        meta = _step_metadata(num_seqs, max_query_len, num_seqs if num_decodes is None else num_decodes)
        q, kv = torch.zeros(tokens, 2, 8), torch.zeros(tokens, 1, 8)
        return backend.decode(q, kv, kv, torch.empty(0), torch.empty(0), meta, 1.0, (rope, torch.zeros(tokens)))

    limit = TritonBackend.fused_decode_max_seqs
    assert step(1) is not None and step(limit) is not None
    assert len(launched) == 2 and all(isinstance(kw["rotary_store"], tpa.RotaryStore) for kw in launched)
    assert step(limit + 1) is None and step(3, max_query_len=4, num_decodes=1) is None
    monkeypatch.setattr(TritonBackend, "fused_decode", False)
    assert step(1) is None and len(launched) == 2


def test_attention_layer_fuses_all_decode_steps_past_the_gemv_rows(monkeypatch) -> None:
    """The layer hands an all-decode step to TritonBackend.decode whatever the gemv's row cap
    (GEMV_MAX_ROWS, 64: before session 24 the fused launch was gated by it, so a 65-512-row decode
    ran rotary, store and attention as three launches); the step past the backend's own cap, a
    step with a prefill, and the decode fusions off (FUSE_DECODE, GEMV_MAX_ROWS 0) run the
    unfused launches instead."""
    from pagedserve.attention.backend import TritonBackend
    from pagedserve.layers import linear_ops
    from pagedserve.layers.attention import Attention
    from pagedserve.layers.rotary import RotaryEmbedding
    backend = TritonBackend()
    fused, unfused = [], []
    monkeypatch.setattr(backend, "_paged_attention", lambda q, *a, **kw: fused.append(q.shape[0]) or q)
    monkeypatch.setattr(backend, "attend", lambda q, *a: unfused.append(q.shape[0]) or q)
    monkeypatch.setattr(backend, "store_kv", lambda *a: None)
    monkeypatch.setattr(RotaryEmbedding, "uses_triton", lambda self, q: True)   # as on CUDA
    monkeypatch.setattr(RotaryEmbedding, "forward", lambda self, positions, q, k: (q, k))
    layer = Attention(2, 8, 1.0, 1)
    layer.backend = backend
    rope = RotaryEmbedding(8, 1024, 10000.0)
    limit = TritonBackend.fused_decode_max_seqs
    assert linear_ops.GEMV_MAX_ROWS < 200 <= limit

    def step(num_seqs: int, max_query_len: int = 1) -> None:
        tokens = num_seqs * max_query_len
        meta = _step_metadata(num_seqs, max_query_len, num_seqs if max_query_len == 1 else 0)
        q, kv = torch.zeros(tokens, 16), torch.zeros(tokens, 8)
        assert layer(q, kv, kv, meta, (rope, torch.zeros(tokens, dtype=torch.int64))).shape == (tokens, 16)

    step(200)
    step(limit + 1)
    step(100, max_query_len=2)   # a prefill (on CPU rows past fuses(): rotary, store, attend)
    assert fused == [200] and unfused == [limit + 1, 200]
    monkeypatch.setattr(linear_ops, "FUSE_DECODE", False)
    step(200)
    monkeypatch.setattr(linear_ops, "FUSE_DECODE", True)
    monkeypatch.setattr(linear_ops, "GEMV_MAX_ROWS", 0)
    step(200)
    assert fused == [200] and unfused == [limit + 1, 200, 200, 200]
