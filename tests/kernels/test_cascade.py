"""Cascade attention (attention/triton_cascade.py): decode rows that share a cached prefix read it
in one launch for all rows, and the decode launch continues from its partials. Against the plain
rotary_store decode launch on the same batch: the same cache bits, outputs within fp32 rounding
(the sums run in another order), and with cascade_len 0 the same bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention import cascade_plan  # noqa: E402
from pagedserve.attention.split_plan import SplitPlan  # noqa: E402
from pagedserve.attention.cascade_plan import shared_prefix  # noqa: E402
from pagedserve.attention.paged_launch import launch_plan  # noqa: E402
from pagedserve.attention.triton_paged_attention import paged_attention  # noqa: E402
from pagedserve.attention.triton_store_kv import RotaryStore  # noqa: E402
from pagedserve.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _batch(context_lens: list[int], shared_blocks: int, num_heads: int, num_kv_heads: int, head_dim: int,
           dtype: torch.dtype, block_size: int = 16, seed: int = 0, groups: list[int] | None = None):
    """Rows whose block tables begin with the same `shared_blocks` ids (the others their own; with
    `groups`, row r's begin with those of set groups[r], each set its own ids), a cache of random
    keys, one unrotated qkv row each, the rows' slots (the last row a graph's padding: seq_len 1,
    slot -1). A row whose new key lies inside the shared blocks holds its own copy of the block it
    writes and of those after it, as copy-on-write gives it: two rows never write or read one slot
    in a launch (on a GPU the order of those programs is not fixed)."""
    g = torch.Generator().manual_seed(seed)
    rows = len(context_lens)
    groups = groups or [0] * rows
    kept = [min(shared_blocks, c // block_size) for c in context_lens]   # shared blocks before the new key's
    own = [max(-(-(c + 1) // block_size), shared_blocks) - n for c, n in zip(context_lens, kept)]
    num_sets = max(groups) + 1
    num_blocks = num_sets * shared_blocks + sum(own) + 2
    ids = torch.randperm(num_blocks, generator=g).tolist()
    sets = [ids[i * shared_blocks:(i + 1) * shared_blocks] for i in range(num_sets)]
    rest = ids[num_sets * shared_blocks:]
    shared = [b for ids_ in sets for b in ids_]
    width = max(n + m for n, m in zip(kept, own)) + 1
    tables = torch.zeros(rows, width, dtype=torch.int32)
    copies = []   # (own block, the shared block it copies)
    for r, (n, m) in enumerate(zip(kept, own)):
        mine = [rest.pop() for _ in range(m)]
        copies += [(b, sets[groups[r]][n + j]) for j, b in enumerate(mine) if n + j < shared_blocks]
        tables[r, :n + m] = torch.tensor(sets[groups[r]][:n] + mine, dtype=torch.int32)
    tables[-1] = 0
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    for b, src in copies:
        k_cache[b], v_cache[b] = k_cache[src], v_cache[src]
    k_cache, v_cache = k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype)
    seq_lens = torch.tensor([c + 1 for c in context_lens[:-1]] + [1], dtype=torch.int32)
    slots = [int(tables[r, c // block_size]) * block_size + c % block_size for r, c in enumerate(context_lens[:-1])]
    assert len(set(s // block_size for s in slots) & set(shared)) == 0   # no row writes a shared block
    qkv = torch.randn(rows, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(rows, num_heads, head_dim), k.view(rows, num_kv_heads, head_dim),
            v.view(rows, num_kv_heads, head_dim), k_cache, v_cache, tables.to(DEVICE), seq_lens.to(DEVICE),
            torch.tensor(slots + [-1], device=DEVICE))


def _cascade(lengths: list[int], order: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cascade's device arrays (cascade_plan.shared_prefix's) for rows' prefix keys: the rows of
    one nonzero length one group, in `order` of the lengths (else the order they first appear)."""
    order = order or list(dict.fromkeys(n for n in lengths if n))
    members = [np.array([r for r, n in enumerate(lengths) if n == length]) for length in order]
    arrays = cascade_plan.cascade_arrays(np.array(lengths), members)
    return tuple(torch.from_numpy(a).to(DEVICE) for a in arrays.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("queries_per_kv,head_dim,prefix,num_splits", [
    (4, 64, 96, None), (4, 64, 40, SplitPlan(3, 1, 0, 0)), (3, 64, 130, SplitPlan(4, 2, 0, 0)),
    (8, 32, 200, 1)])
def test_cascade_matches_the_plain_decode_launch(dtype, queries_per_kv, head_dim, prefix, num_splits) -> None:
    """Rows of contexts 200-300 sharing 13 blocks (208 keys), the prefix read through row 0's
    table; cascade lengths inside them (40: not a block's multiple; 130, 200: not a tile's), the
    splits the decode launch may take. A row whose context is the prefix alone (seq_len = prefix +
    1) reads only its new key past it; row 1 takes no part (cascade_len 0: its own whole context),
    nor does the padding row."""
    num_kv_heads = 2
    num_heads = num_kv_heads * queries_per_kv
    context_lens = [208, 230, 300, 250, 217, prefix, 0]
    q, k, v, k_cache, v_cache, tables, seq_lens, slots = _batch(context_lens, 13, num_heads, num_kv_heads,
                                                                 head_dim, dtype, seed=prefix)
    rope = RotaryEmbedding(head_dim, 1024, 10000.0, dtype=dtype).to(DEVICE)
    n = len(context_lens)
    qsl = torch.arange(n + 1, dtype=torch.int32, device=DEVICE)

    # the plain launch under the cascade launch's tiles and plan (paged_launch.launch_plan's cascade), so that the
    # rows outside the prefix round alike
    tiles, plan, _ = launch_plan(n, num_heads, num_kv_heads, head_dim, 1, 1024, dtype, DEVICE, num_splits, cascade=True)

    def run(lengths):
        caches = [k_cache.clone(), v_cache.clone()]
        cascade = None if lengths is None else _cascade(lengths)
        out = paged_attention(q, *caches, tables, seq_lens, qsl, 0.125, 1, 1024, num_decodes=n,
                              out=torch.full_like(q, float("nan")), num_splits=plan if cascade is None else num_splits,
                              tiles=tiles if cascade is None else None,
                              rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache), cascade=cascade)
        return out, caches

    expected, ref_caches = run(None)
    out, caches = run([prefix, 0, prefix, prefix, prefix, prefix, 0])
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    torch.testing.assert_close(out[:n - 1], expected[:n - 1], atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(out[1], expected[1])   # no part in it: the plain launch's bits
    assert not torch.equal(out[:n - 1], expected[:n - 1]) or dtype != torch.float32   # the sums did change order
    off, _ = run([0] * n)   # no cascade this step (a graph's padding): the CASCADE launch gives the plain bits
    assert torch.equal(off[:n], expected[:n])


@pytest.mark.parametrize("queries_per_kv", [4, 16])
def test_cascade_for_two_groups_of_rows(queries_per_kv) -> None:
    """Two system prompts: rows 0, 2, 4, 6 share one set of 13 blocks, rows 1, 3, 5, 7, 8 another
    (interleaved), each group reading its prefix (200 and 176 keys) through its own tiles (16 rows
    a tile, or 4 at 16 queries a KV head: the second group then spans two tiles), listed second
    group first: within fp32 rounding of the plain launch; one group alone leaves the other rows'
    bits; the two listed as one group (the second's rows read through the first's blocks) fails."""
    num_kv_heads, head_dim = 2, 64
    num_heads = num_kv_heads * queries_per_kv
    context_lens = [208, 230, 300, 250, 217, 240, 260, 212, 280, 0]
    groups = [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]
    q, k, v, k_cache, v_cache, tables, seq_lens, slots = _batch(context_lens, 13, num_heads, num_kv_heads, head_dim,
                                                                 torch.float32, seed=11, groups=groups)
    rope = RotaryEmbedding(head_dim, 1024, 10000.0, dtype=torch.float32).to(DEVICE)
    n = len(context_lens)
    qsl = torch.arange(n + 1, dtype=torch.int32, device=DEVICE)
    tiles, plan, _ = launch_plan(n, num_heads, num_kv_heads, head_dim, 1, 1024, torch.float32, DEVICE, None,
                                 cascade=True)

    def run(cascade):
        return paged_attention(q, k_cache.clone(), v_cache.clone(), tables, seq_lens, qsl, 0.125, 1, 1024,
                               num_decodes=n, out=torch.full_like(q, float("nan")),
                               num_splits=plan if cascade is None else None, tiles=tiles if cascade is None else None,
                               rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache), cascade=cascade)
    expected = run(None)
    lengths = [200 if grp == 0 else 176 for grp in groups[:-1]] + [0]
    out = run(_cascade(lengths, order=[176, 200]))
    torch.testing.assert_close(out[:n - 1], expected[:n - 1], atol=2e-5, rtol=2e-5)
    assert not torch.equal(out[:n - 1], expected[:n - 1])
    alone = run(_cascade([length if length == 200 else 0 for length in lengths]))
    torch.testing.assert_close(alone[:n - 1], expected[:n - 1], atol=2e-5, rtol=2e-5)
    assert all(torch.equal(alone[r], expected[r]) for r in (1, 3, 5, 7, 8))   # not in the group: the plain bits
    one = _cascade(lengths)
    one[1][:] = torch.arange(n, dtype=torch.int32, device=DEVICE)   # the two groups listed as one, in row order:
    one[2][1:] = n - 1                                               # row 1 read through row 0's table
    wrong = run(one)
    torch.testing.assert_close(wrong[0], expected[0], atol=2e-5, rtol=2e-5)
    assert (wrong[1] - expected[1]).abs().max() > 1e-2


def test_cascade_over_an_fp8_cache() -> None:
    """kv_cache_dtype fp8: the prefix launch reads E4M3 keys and values as the decode launch does
    (fp32 for an fp32 query), so the cascade matches the plain launch within fp32 rounding, and the
    new keys' FP8 bytes are the same."""
    context_lens = [208, 230, 300, 250, 0]
    q, k, v, k_cache, v_cache, tables, seq_lens, slots = _batch(context_lens, 13, 8, 2, 64, torch.float32, seed=9)
    k_cache, v_cache = (c.clamp(-8, 8).to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    rope = RotaryEmbedding(64, 1024, 10000.0, dtype=torch.float32).to(DEVICE)
    qsl = torch.arange(6, dtype=torch.int32, device=DEVICE)
    outs, caches = [], []
    for lengths in (None, [200, 200, 200, 200, 0]):
        cache = [k_cache.clone(), v_cache.clone()]
        cascade = None if lengths is None else _cascade(lengths)
        outs.append(paged_attention(q, *cache, tables, seq_lens, qsl, 0.125, 1, 1024, num_decodes=5,
                                    rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache),
                                    cascade=cascade))
        caches.append(cache)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(*caches))
    torch.testing.assert_close(outs[1][:4], outs[0][:4], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cascade_for_the_decode_rows_of_a_mixed_batch(dtype) -> None:
    """A mixed batch (the decode rows' queries rotated and their keys stored, as in a mixed step):
    its decode rows take the cascade in a call of their own, without the rotation, and match the
    plain launch within fp32 rounding (row 1, no part in it, too); the prompt chunks after them
    (one reading the shared blocks as its context) keep their usual launch: the plain call's bits."""
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 64, 16
    decode_lens = [208, 230, 300, 250, 217]
    q, k, v, k_cache, v_cache, tables, seq_lens, slots = _batch(decode_lens + [0], 13, num_heads, num_kv_heads,
                                                                 head_dim, dtype, seed=5)
    nd = len(decode_lens)
    for r in range(nd):   # the mixed step's store of the decode rows' keys (store_kv, before attention)
        block, offset = divmod(int(slots[r]), block_size)
        k_cache[block, offset], v_cache[block, offset] = k[r], v[r]
    # two prompt chunks: 40 tokens after the 13 shared blocks (3 blocks of their own), 24 with no context (2)
    g = torch.Generator().manual_seed(6)
    first_new = k_cache.shape[0]
    k_cache = torch.cat([k_cache, torch.randn(5, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)])
    v_cache = torch.cat([v_cache, torch.randn(5, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)])
    width = max(tables.shape[1], 16)
    all_tables = torch.zeros(nd + 2, width, dtype=torch.int32, device=DEVICE)
    all_tables[:nd, :tables.shape[1]] = tables[:nd]
    all_tables[nd, :16] = torch.cat([tables[0, :13], torch.arange(first_new, first_new + 3, device=DEVICE,
                                                                    dtype=torch.int32)])
    all_tables[nd + 1, :2] = torch.arange(first_new + 3, first_new + 5, device=DEVICE, dtype=torch.int32)
    lens = torch.cat([seq_lens[:nd], torch.tensor([248, 24], dtype=torch.int32, device=DEVICE)])
    qsl = torch.tensor(list(range(nd + 1)) + [nd + 40, nd + 64], dtype=torch.int32, device=DEVICE)
    query = torch.cat([q[:nd], torch.randn(64, num_heads, head_dim, generator=g).to(DEVICE, dtype)])

    def run(cascade):
        return paged_attention(query, k_cache, v_cache, all_tables, lens, qsl, 0.125, 40, 301, num_decodes=nd,
                               out=torch.full_like(query, float("nan")), cascade=cascade)
    expected = run(None)
    out = run(_cascade([208, 0, 208, 208, 208]))
    assert torch.equal(out[nd:], expected[nd:])
    torch.testing.assert_close(out[:nd], expected[:nd], atol=TOL[dtype], rtol=TOL[dtype])
    assert not torch.equal(out[:nd], expected[:nd]) or dtype != torch.float32   # the sums did change order
    wrong = run(_cascade([224] * nd))
    assert (wrong[1] - expected[1]).abs().max() > 1e-2   # row 1's own block 14 read through row 0's table: teeth


def test_a_wrong_prefix_gives_other_outputs() -> None:
    """The check has teeth: a cascade length past the shared blocks (row 1's own blocks read
    through row 0's table) changes that row's output."""
    q, k, v, k_cache, v_cache, tables, seq_lens, slots = _batch([100, 120, 0], 2, 8, 2, 64, torch.float32)
    rope = RotaryEmbedding(64, 1024, 10000.0, dtype=torch.float32).to(DEVICE)
    qsl = torch.arange(4, dtype=torch.int32, device=DEVICE)
    outs = [paged_attention(q, k_cache.clone(), v_cache.clone(), tables, seq_lens, qsl, 0.125, 1, 1024,
                            num_decodes=3, rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache),
                            cascade=None if c is None else _cascade([c, c, 0]))
            for c in (None, 32, 64)]
    torch.testing.assert_close(outs[1][:2], outs[0][:2], atol=2e-5, rtol=2e-5)
    assert (outs[2][1] - outs[0][1]).abs().max() > 1e-2


def test_shared_prefix(monkeypatch) -> None:
    """Groups of rows that hold one block id for key CASCADE_MIN_KEYS - 1 (64 here: column 3), the
    largest first, up to CASCADE_MAX_GROUPS: whole common blocks, at most their min(seq_len) - 1;
    rows too short to reach the column left out; none below the row or key thresholds, nor where
    the groups' shared keys are under 0.35 of what the other rows read (CASCADE_MIN_SHARE)."""
    monkeypatch.setattr(cascade_plan, "CASCADE_MIN_ROWS", 3)
    monkeypatch.setattr(cascade_plan, "CASCADE_MIN_KEYS", 64)
    monkeypatch.setattr(cascade_plan, "CASCADE_MAX_GROUPS", 4)   # (5 bounds below)
    tables = np.zeros((4, 12), dtype=np.int32)
    tables[:, :6] = [7, 3, 9, 1, 4, 8]
    tables[:, 6:] = np.arange(24).reshape(4, 6) + 20
    seq_lens = np.array([180, 170, 190, 175], dtype=np.int32)

    def plan(t, lens=seq_lens):
        keys, arrays = shared_prefix(t, lens, 16)
        return (keys, *(arrays[name].tolist() for name in ("cascade_len", "cascade_rows", "cascade_groups"))) \
            if keys else (keys, arrays)
    assert plan(tables) == (96, [96] * 4, [0, 1, 2, 3], [0, 4, 4, 4, 4])          # 6 blocks of 16
    tables[2, 5] = 99
    assert plan(tables) == (80, [80] * 4, [0, 1, 2, 3], [0, 4, 4, 4, 4])          # row 2 leaves at block 5
    assert plan(tables, np.array([180, 70, 190, 175], dtype=np.int32))[:2] == (69, [69] * 4)   # row 1's new key at 69
    assert plan(tables, np.array([180, 60, 190, 175], dtype=np.int32)) == (80, [80, 0, 80, 80], [0, 2, 3, 0],
                                                                            [0, 3, 3, 3, 3])   # row 1 short: left out
    tables[0, :6] = [50, 51, 52, 53, 54, 55]   # the first row computed the prefix itself (its own blocks)
    assert plan(tables) == (80, [0, 80, 80, 80], [1, 2, 3, 0], [0, 3, 3, 3, 3])
    tables[3, :6] = [7, 3, 9, 60, 61, 62]      # the last row shares 3 blocks only: two rows are left, too few
    assert plan(tables) == (0, {})
    assert plan(tables[:2], seq_lens[:2]) == (0, {})                               # 2 rows: too few

    # two system prompts behind one chat template's first block (block 7): rows 0, 2, 4, 6 hold prompt A (8 blocks),
    # rows 1, 3, 5 prompt B (5), row 7 prompt C's 4 alone; the first block alone would make one group of 8 sharing
    # 16 keys
    tables = np.arange(8 * 12, dtype=np.int32).reshape(8, 12) + 100
    tables[:, 0] = 7
    tables[0::2, 1:8] = np.arange(10, 17)
    tables[1::2, 1:5] = np.arange(30, 34)
    tables[7, 1:5] = np.arange(40, 44)
    seq_lens = np.full(8, 170, dtype=np.int32)
    assert plan(tables, seq_lens) == (128, [128, 80, 128, 80, 128, 80, 128, 0], [0, 2, 4, 6, 1, 3, 5, 0],
                                      [0, 4, 7, 7, 7])
    seq_lens[[1, 3, 5, 7]] = [600, 400, 300, 300]   # the groups' 752 shared keys against 300: taken
    assert plan(tables, seq_lens)[0] == 128
    monkeypatch.setattr(cascade_plan, "CASCADE_MAX_GROUPS", 1)   # the largest group only
    seq_lens[[1, 3, 5, 7]] = 170
    assert plan(tables, seq_lens) == (128, [128, 0, 128, 0, 128, 0, 128, 0], [0, 2, 4, 6, 0, 0, 0, 0], [0, 4])
    seq_lens[[1, 3, 5, 7]] = [600, 400, 300, 300]   # 512 shared keys against 1,600 the others read (0.32): not taken
    assert plan(tables, seq_lens) == (0, {})


_CASCADE_FOR_SM90 = """
import inspect
from pagedserve.attention.triton_paged_attention import _paged_attention_kernel as decode
from pagedserve.attention.triton_cascade import _cascade_prefix_kernel as prefix
i32 = ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "partial_active_ptr", "arrivals_ptr",
       "cascade_len_ptr", "cascade_rows_ptr", "cascade_groups_ptr")
f32 = ("partial_acc_ptr", "partial_max_ptr", "partial_sum_ptr", "prefix_acc_ptr", "prefix_max_ptr",
       "prefix_sum_ptr", "part_acc_ptr", "part_max_ptr", "part_sum_ptr")
types = {**{n: "*i32" for n in i32}, **{n: "*fp32" for n in f32}, "slot_mapping_ptr": "*i64"}
for kernel in (decode, prefix):
    aligned = tuple(n for n in inspect.signature(kernel.fn).parameters
                    if n.endswith("_ptr") or n.startswith("stride") and n != "stride_block_table")
    # the cascade graphs' decode launch (>= 8 rows: launch_plan's cascade tiles, no PDL), and a mixed step's
    # (its query rotated before: no ROTARY_STORE, no ROTATE in the prefix launch)
    for rotary, head_dim in ((True, 128), (True, 64), (False, 128)):
        if kernel is decode:
            build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim,
                               BLOCK_SIZE=16, BLOCK_M=16, BLOCK_Q=4, TILE_N=32, ONE_TILE_PER_SEQ=True,
                               DOT_PRECISION="tf32", ROTARY_STORE=rotary, LIBDEVICE=rotary, MERGE=True, GROUP_PAD=4,
                               SEG_CHUNK=16, HEADS_FIRST=True, CASCADE=True), types, aligned, num_warps=4,
                  num_stages=2)
        else:
            build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_M=64,
                               TILE_N=64, DOT_PRECISION="tf32", LIBDEVICE=True, MAX_GROUPS=4, ROTATE=rotary), types,
                  aligned, num_warps=4, num_stages=3)
    fp8 = {**types, "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"}   # kv_cache_dtype fp8
    if kernel is decode:
        build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_M=16,
                           BLOCK_Q=4, TILE_N=32, ONE_TILE_PER_SEQ=True, DOT_PRECISION="tf32", ROTARY_STORE=True,
                           LIBDEVICE=True, MERGE=True, GROUP_PAD=4, SEG_CHUNK=16, HEADS_FIRST=True, CASCADE=True),
              fp8, aligned, num_warps=4, num_stages=2)
    else:
        build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=64, TILE_N=64,
                           DOT_PRECISION="tf32", LIBDEVICE=True, MAX_GROUPS=4), fp8, aligned, num_warps=4, num_stages=3)
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="compiles for sm_90 on a machine without a GPU")
def test_cascade_kernels_compile_for_sm90() -> None:
    """The prefix launch and the decode launch with CASCADE to cubins for sm_90 (bf16, llama-8b's
    and llama-1b's head dims; an FP8 cache): the interpreter does not check what compiles
    (tests/kernels/sm90_compile.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_CASCADE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the cascade runs in the CUDA engine's fused decode launch")
def test_engine_with_cascade_gives_the_plain_tokens(tmp_path, monkeypatch) -> None:
    """An engine on CUDA (fp32, decode graphs): 64 requests, half sharing a 320-token cached prompt
    prefix and half a 352-token one (two system prompts), greedy with logprobs, with the cascade on
    and off (the runner reads TritonBackend.cascade every step): the same ids, logprobs within
    fp32 rounding, and the cascade graphs replayed for the decode steps, with both groups."""
    from transformers import LlamaConfig

    from pagedserve import LLM, SamplingParams
    from pagedserve.attention.backend import TritonBackend
    from pagedserve.worker import input_batch
    from pagedserve.worker.cuda_graph import CudaGraphRunner
    LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=2048).save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=1024,
              gpu_memory_utilization=0.3, seed=0)
    replays, groups, run, plan = [], [], CudaGraphRunner.run, input_batch.shared_prefix

    def spy(self, inputs, receive=None):
        replays.append(inputs.cascade_len)
        return run(self, inputs, receive)

    def count_groups(*args):
        keys, arrays = plan(*args)
        groups.append(sorted(set(arrays["cascade_len"].tolist()) - {0}) if keys else [])
        return keys, arrays
    monkeypatch.setattr(CudaGraphRunner, "run", spy)
    monkeypatch.setattr(input_batch, "shared_prefix", count_groups)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, 4000, (n,), generator=g).tolist() for n in (320, 352)]
    prompts = [{"prompt_token_ids": prefixes[i % 2] + torch.randint(3, 4000, (8,), generator=g).tolist()}
               for i in range(64)]
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0, logprobs=1, detokenize=False)
    llm.generate([{"prompt_token_ids": p + [5]} for p in prefixes], [params] * 2, use_tqdm=False)   # cached first
    outs = {}
    for cascade in (False, True):
        monkeypatch.setattr(TritonBackend, "cascade", cascade)
        replays.clear()
        groups.clear()
        outs[cascade] = [o.outputs[0] for o in llm.generate(prompts, [params] * 64, use_tqdm=False)]
        assert any(replays) == cascade and (not cascade or sum(r == 352 for r in replays) >= 10), replays
        assert not cascade or sum(found == [320, 352] for found in groups) >= 10, groups
    for plain, cascaded in zip(outs[False], outs[True]):
        assert cascaded.token_ids == plain.token_ids
        for a, b, token in zip(plain.logprobs, cascaded.logprobs, plain.token_ids):
            assert abs(a[token].logprob - b[token].logprob) < 1e-4
    llm.shutdown()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the cascade runs in the Triton backend's launches (CUDA)")
def test_engine_mixed_steps_with_cascade_give_the_plain_tokens(tmp_path, monkeypatch) -> None:
    """An engine on CUDA (fp32, max_num_seqs 72): 160 requests sharing a 320-token cached prefix with
    output lengths 4-40, so that waiting requests take finished rows' places beside ~70 decode rows
    (mixed steps, the piecewise graphs with an eager attention): with the cascade on, mixed steps
    take it, and the ids and logprobs are those without it."""
    from transformers import LlamaConfig

    from pagedserve import LLM, SamplingParams
    from pagedserve.attention.backend import TritonBackend
    from pagedserve.worker.mixed_graphs import MixedGraphs
    LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=2048).save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=1024,
              gpu_memory_utilization=0.3, seed=0, max_num_seqs=72)
    mixed, run_mixed = [], MixedGraphs.run

    def spy(self, inputs):
        mixed.append((inputs.meta.num_decodes, inputs.cascade_len))
        return run_mixed(self, inputs)
    monkeypatch.setattr(MixedGraphs, "run", spy)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 4000, (320,), generator=g).tolist()
    prompts = [{"prompt_token_ids": prefix + torch.randint(3, 4000, (8,), generator=g).tolist()} for _ in range(160)]
    params = [SamplingParams(max_tokens=int(n), ignore_eos=True, temperature=0.0, logprobs=1, detokenize=False)
              for n in torch.randint(4, 41, (160,), generator=g)]
    llm.generate([{"prompt_token_ids": prefix + [5]}], [params[0]], use_tqdm=False)   # the prefix cached first
    outs = {}
    for cascade in (False, True):
        monkeypatch.setattr(TritonBackend, "cascade", cascade)
        mixed.clear()
        outs[cascade] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert any(n for _, n in mixed) == cascade, mixed
        if cascade:   # the mixed steps of >= 64 decode rows share the prefix (the cascade takes >= 8)
            assert sum(n == 320 for d, n in mixed if d >= 64) >= 10, mixed
    for plain, cascaded in zip(outs[False], outs[True]):
        assert cascaded.token_ids == plain.token_ids
        for a, b, token in zip(plain.logprobs, cascaded.logprobs, plain.token_ids):
            assert abs(a[token].logprob - b[token].logprob) < 1e-4
    llm.shutdown()
