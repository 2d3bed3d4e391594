"""prefill_attention (FlashAttention-style Triton kernel) and TritonBackend's dispatch (also
into a given output) against paged_attention_ref: varlen chunks, cached context + new tokens,
GQA, causal diagonal tiles, chunk boundaries that do and do not fall on tile edges.

The batches come from test_paged_attention.make_batch (random non-contiguous block tables,
junk in unused slots, NaN-poisoned output, padding tokens that must stay untouched); the new
tokens' key/value are read back out of the cache, so the kernel's contiguous K/V and the
reference's paged K/V are the same numbers.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention.backend import TritonBackend  # noqa: E402
from pagedserve.attention.metadata import AttentionMetadata  # noqa: E402
from pagedserve.attention.torch_ref import paged_attention_ref  # noqa: E402
from pagedserve.attention.triton_prefill_attention import (  # noqa: E402
    PrefillTiles, prefill_attention)
from tests.kernels.test_paged_attention import (  # noqa: E402
    DEVICE, FLOAT_DTYPES, TOLERANCES, Batch, make_batch)

# Small tiles keep the interpreter fast and put chunk edges inside and across tiles.
SMALL = PrefillTiles(block_m=16, block_n=16, num_warps=4, num_stages=1)


def new_kv(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The query tokens' K/V [num_tokens + pad, Hkv, D], gathered from the cache (as stored)."""
    block_size = batch.k_cache.shape[1]
    num_padded = batch.query.shape[0]
    qsl, seq_lens = batch.query_start_loc.tolist(), batch.seq_lens.tolist()
    key = torch.zeros(num_padded, *batch.k_cache.shape[2:], dtype=batch.k_cache.dtype, device=DEVICE)
    value = torch.zeros_like(key)
    for s in range(len(seq_lens)):
        context = seq_lens[s] - (qsl[s + 1] - qsl[s])
        for j, token in enumerate(range(qsl[s], qsl[s + 1])):
            pos = context + j
            block = int(batch.block_tables[s, pos // block_size])
            key[token] = batch.k_cache[block, pos % block_size]
            value[token] = batch.v_cache[block, pos % block_size]
    return key, value


def check(batch: Batch, tiles: PrefillTiles | None, strided_kv: bool = False, from_cache: bool = False) -> None:
    num_tokens = int(batch.query_start_loc[-1])
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                   batch.seq_lens, batch.query_start_loc, batch.scale, 0)
    key, value = (None, None) if from_cache else new_kv(batch)
    if strided_kv and not from_cache:  # views into one fused [T, (Hkv + Hkv) * D] buffer, as from a qkv projection
        fused = torch.cat([key, value], dim=1)
        key, value = fused[:, :key.shape[1]], fused[:, key.shape[1]:]
        assert not key.is_contiguous()
    out = torch.full_like(batch.query, float("nan"))
    returned = prefill_attention(batch.query, key, value, batch.k_cache, batch.v_cache, batch.block_tables,
                                 batch.seq_lens, batch.query_start_loc, batch.scale, out, 0,
                                 batch.seq_lens.shape[0], num_tokens, tiles=tiles)
    assert returned is out
    atol, rtol = TOLERANCES[batch.query.dtype]
    torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=atol, rtol=rtol)
    assert out[num_tokens:].isnan().all(), "padding tokens past query_start_loc[-1] were written"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("queries_per_kv", [1, 2])
def test_varlen_fresh_prompts(queries_per_kv: int, dtype: torch.dtype) -> None:
    """No context: causal over the chunk only; lengths below, on and across tile edges."""
    batch = make_batch(query_lens=[16, 5, 37, 1], context_lens=[0, 0, 0, 0], num_heads=2 * queries_per_kv,
                       num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype, seed=queries_per_kv)
    check(batch, SMALL)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("from_cache", [False, True], ids=["new_kv_contiguous", "new_kv_from_cache"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_cached_context_and_new_tokens(block_size: int, from_cache: bool, dtype: torch.dtype) -> None:
    """Chunked prefill: chunks after cached contexts (on and off block/tile edges), GQA 3:1,
    an empty chunk, head_dim padded to a power of two; the new K/V from a strided view of a
    fused buffer, or read back from the cache."""
    batch = make_batch(query_lens=[20, 0, 33, 7], context_lens=[32, 9, 19, 50], num_heads=3, num_kv_heads=1,
                       head_dim=48, block_size=block_size, dtype=dtype, seed=block_size)
    check(batch, SMALL, strided_kv=True, from_cache=from_cache)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tiles", [PrefillTiles(32, 16, 4, 1), None], ids=["32x16", "default"])
def test_wider_tiles(tiles: PrefillTiles | None, dtype: torch.dtype) -> None:
    """Several key tiles per diagonal, and the default launch shape of the dtype."""
    batch = make_batch(query_lens=[70, 3], context_lens=[40, 0], num_heads=4, num_kv_heads=1,
                       head_dim=32, block_size=16, dtype=dtype, seed=7)
    check(batch, tiles)


def test_tiles_the_gpu_refuses_fall_back_to_smaller_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch shape refused for shared memory (LARGE_TILES on a GPU smaller than an H100) is
    retried with the next smaller default shape, the same output, and not tried again."""
    from triton.runtime.errors import OutOfResources
    from pagedserve.attention import triton_prefill_attention as tpa
    real, tried = tpa._prefill_attention_kernel, []

    class RefusingWideTiles:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tried.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
                if kwargs["BLOCK_N"] == 32:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tpa, "_prefill_attention_kernel", RefusingWideTiles())
    monkeypatch.setattr(tpa, "_UNFIT", set())
    monkeypatch.setattr(tpa, "SMALL_TILES", PrefillTiles(32, 16, 4, 1))
    batch = make_batch(query_lens=[70, 3], context_lens=[40, 0], num_heads=4, num_kv_heads=1,
                       head_dim=32, block_size=16, dtype=torch.float32, seed=7)
    check(batch, PrefillTiles(32, 32, 4, 2))
    check(batch, PrefillTiles(32, 32, 4, 2))
    assert tried == [(32, 32), (32, 16), (32, 16)]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_short_tiles(head_dim: int) -> None:
    """SHORT_TILES (64 x 64) on fresh and continued chunks, 16-bit as the engine launches them:
    several key tiles per row tile, diagonals off tile edges."""
    from pagedserve.attention import triton_prefill_attention as tpa
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    batch = make_batch(query_lens=[130, 7, 64], context_lens=[0, 70, 33], num_heads=4, num_kv_heads=2,
                       head_dim=head_dim, block_size=16, dtype=dtype, seed=head_dim)
    check(batch, tpa.SHORT_TILES)


def test_backend_passes_longest_sequence() -> None:
    """The tiles follow the launch's longest sequence: a run of short chunks passes the longest of
    its own sequences (context + new), a one-sequence launch its own length, the plain path the
    step's max_seq_len."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    backend = TritonBackend()
    seen = []
    real = backend._prefill_attention
    backend._prefill_attention = lambda *a, **kw: seen.append((a[10], a[11], kw.get("max_keys"))) or real(*a, **kw)
    backend.prefill_min_query_len, backend.sdpa_min_query_len = 8, 20
    backend.long_chunk_path, backend.cudnn_shape_multiple = "triton", 1
    backend_step([1, 9, 5, 33, 12, 21], [40, 30, 0, 17, 3, 0], 1, dtype, backend, host_lists=True, seed=17)
    # seqs 1-2 (lengths 39, 5), seq 3 alone (50), seq 4 (15), seq 5 alone (21); attended twice
    assert seen == [(1, 3, 39), (3, 4, 50), (4, 5, 15), (5, 6, 21)] * 2
    seen.clear()
    backend.use_sdpa = False
    backend_step([1, 9, 5], [40, 30, 0], 1, dtype, backend, host_lists=True, seed=3)
    assert seen == [(1, 3, 41)] * 2   # the step's max_seq_len: the decode row's 41 keys included


@pytest.mark.parametrize("context_len", [0, 16, 37])
def test_contiguous_context_copy(context_len: int) -> None:
    """One sequence whose context comes as a contiguous copy (gathered out of the cache), with a
    partial last context tile: the same rows as through the block table."""
    batch = make_batch(query_lens=[21], context_lens=[context_len], num_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=8, dtype=torch.float32, seed=21)
    key, value = new_kv(batch)
    blocks = batch.block_tables[0, :-(-context_len // 8)].long()
    context = (batch.k_cache[blocks].flatten(0, 1)[:context_len], batch.v_cache[blocks].flatten(0, 1)[:context_len])
    out = torch.full_like(batch.query, float("nan"))
    poisoned = batch.k_cache.clone().fill_(float("nan"))  # the paged cache must not be read
    prefill_attention(batch.query, key, value, poisoned, batch.v_cache, batch.block_tables, batch.seq_lens,
                      batch.query_start_loc, batch.scale, out, 0, 1, 21, tiles=SMALL, context=context)
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                   batch.seq_lens, batch.query_start_loc, batch.scale, 0)
    torch.testing.assert_close(out[:21], expected[:21], atol=1e-4, rtol=1e-4)


def test_split_chunked_prefill_matches_one_shot() -> None:
    """A prompt attended in one chunk or in two (the second reading the first from the cache)
    gives the same rows: the chunk boundary changes which path reads a key, not the result."""
    whole = make_batch(query_lens=[40], context_lens=[0], num_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=16, dtype=torch.float32, seed=9)
    key, value = new_kv(whole)
    out = torch.full_like(whole.query, float("nan"))
    prefill_attention(whole.query, key, value, whole.k_cache, whole.v_cache, whole.block_tables, whole.seq_lens,
                      whole.query_start_loc, whole.scale, out, 0, 1, 40, tiles=SMALL)
    # the same prompt as a second chunk: rows 23..39 after 23 cached tokens
    tail = torch.full_like(whole.query, float("nan"))
    qsl = torch.tensor([0, 17], dtype=torch.int32, device=DEVICE)
    prefill_attention(whole.query[23:], key[23:], value[23:], whole.k_cache, whole.v_cache, whole.block_tables,
                      whole.seq_lens, qsl, whole.scale, tail[23:], 0, 1, 17, tiles=SMALL)
    torch.testing.assert_close(tail[23:40], out[23:40], atol=1e-5, rtol=1e-5)


def step_meta(batch: Batch, num_decodes: int, host_lists: bool) -> AttentionMetadata:
    """The metadata of a batch as one step (with the host lists of an eager step or without)."""
    num_tokens = int(batch.query_start_loc[-1])
    return AttentionMetadata(slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=DEVICE),
                             query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
                             block_tables=batch.block_tables, max_query_len=batch.max_query_len,
                             max_seq_len=batch.max_seq_len, num_decodes=num_decodes, num_decode_tokens=num_decodes,
                             query_start_loc_host=batch.query_start_loc.tolist() if host_lists else None,
                             seq_lens_host=batch.seq_lens.tolist() if host_lists else None)


def backend_step(query_lens: list[int], context_lens: list[int], num_decodes: int, dtype: torch.dtype,
                 backend: TritonBackend, host_lists: bool, seed: int) -> None:
    """One step through backend.attend against the reference."""
    batch = make_batch(query_lens=query_lens, context_lens=context_lens, num_heads=4, num_kv_heads=2,
                       head_dim=32, block_size=16, dtype=dtype, seed=seed)
    num_tokens = int(batch.query_start_loc[-1])
    key, value = new_kv(batch)
    meta = step_meta(batch, num_decodes, host_lists)
    out = backend.attend(batch.query, key, value, batch.k_cache, batch.v_cache, meta, batch.scale)
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                   batch.seq_lens, batch.query_start_loc, batch.scale, num_decodes)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=atol, rtol=rtol)
    # into a given output (the mixed graphs' static one: rows of a longer buffer), the same values
    rows = batch.query.shape[0]
    buffer = torch.full((rows + 3, *batch.query.shape[1:]), float("nan"), dtype=dtype, device=DEVICE)
    into = backend.attend(batch.query, key, value, batch.k_cache, batch.v_cache, meta, batch.scale, out=buffer[:rows])
    assert into.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[:num_tokens], out[:num_tokens]) and buffer[rows:].isnan().all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backend_mixed_step(dtype: torch.dtype) -> None:
    """TritonBackend with the prefill threshold lowered: decodes go to the paged kernel, the
    chunks to the prefill kernel, one output."""
    backend = TritonBackend()
    backend.prefill_min_query_len = 8
    backend_step([1, 1, 24, 9], [30, 3, 17, 0], 2, dtype, backend, host_lists=False, seed=13)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("path", ["cudnn", "triton"])
def test_backend_long_chunks_by_sequence(path: str, dtype: torch.dtype) -> None:
    """The per-sequence path, thresholds lowered: decodes -> paged kernel; chunks of >= 20
    tokens one at a time ("cudnn": SDPA, a math stand-in off CUDA, new part + gathered context
    merged by LSE; "triton": the prefill kernel on the gathered context); the runs of shorter
    chunks between them -> one Triton launch each."""
    if path == "cudnn" and DEVICE.type == "cuda" and dtype == torch.float32:
        pytest.skip("cuDNN's fused attention takes 16-bit types only (sdpa_available)")
    backend = TritonBackend()
    backend.prefill_min_query_len, backend.sdpa_min_query_len = 8, 20
    backend.long_chunk_path, backend.cudnn_shape_multiple = path, 1
    backend._sdpa_available = lambda device, dtype, head_dim: True
    backend_step([1, 9, 5, 33, 12, 21], [40, 30, 0, 17, 3, 0], 1, dtype, backend, host_lists=True, seed=17)


def test_backend_cudnn_only_round_shapes() -> None:
    """cuDNN (math stand-in here) takes only chunks whose length and context are multiples of
    cudnn_shape_multiple; the others go to the Triton kernel (bf16 on CUDA: cuDNN takes 16-bit
    types only)."""
    backend = TritonBackend()
    backend.prefill_min_query_len, backend.sdpa_min_query_len, backend.cudnn_shape_multiple = 8, 16, 16
    backend.long_chunk_path = "cudnn"
    backend._sdpa_available = lambda device, dtype, head_dim: True
    calls = []
    real = backend._sdpa_prefill_sequence
    backend._sdpa_prefill_sequence = lambda *a: calls.append(a[6:9]) or real(*a)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    backend_step([1, 32, 20, 16], [7, 16, 0, 5], 1, dtype, backend, host_lists=True, seed=19)
    assert [(token_begin, query_len, context_len) for token_begin, query_len, context_len in calls] == [(1, 32, 16)] * 2   # attended twice


@pytest.mark.parametrize("block_size,block_n", [(32, 16), (8, 32), (16, 16)])
@pytest.mark.parametrize("cache", ["shared_strides", "v_strides_differ", "int64_offsets"])
def test_paged_context_loop(block_size: int, block_n: int, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The context loop through the block table (block ids loaded a tile ahead): tiles narrower
    and wider than a cache block, contexts of 0, < 1 tile, whole tiles and a partial last
    tile; K/V addressed by one row offset (equal strides), by two (v_cache a view with padded
    rows), and in int64 (the path of caches of >= 2**31 elements); the same rows as the reference."""
    from pagedserve.attention import triton_prefill_attention as tpa
    batch = make_batch(query_lens=[9, 20, 5, 17], context_lens=[0, 13, 64, 75], num_heads=4, num_kv_heads=2,
                       head_dim=32, block_size=block_size, dtype=torch.float32, seed=block_size + block_n)
    if cache == "v_strides_differ":
        padded = torch.full((*batch.v_cache.shape[:3], 40), float("nan"), device=DEVICE)
        padded[..., :32] = batch.v_cache
        batch = dataclasses.replace(batch, v_cache=padded[..., :32])
        assert batch.v_cache.stride() != batch.k_cache.stride()
    if cache == "int64_offsets":
        monkeypatch.setattr(tpa, "I64_CACHE_ELEMENTS", 1)
    check(batch, PrefillTiles(32, block_n, 4, 1))


def test_default_tiles_by_launch_size() -> None:
    """16-bit launches of >= LARGE_MIN_TOKENS new tokens take LARGE_TILES, smaller ones
    SMALL_TILES; fp32 and head_dim > 128 keep small tiles."""
    from pagedserve.attention import triton_prefill_attention as tpa
    assert tpa.default_prefill_tiles(torch.bfloat16, 128, 8192) == tpa.LARGE_TILES == PrefillTiles(128, 128, 8, 3)
    assert tpa.default_prefill_tiles(torch.float16, 128, tpa.LARGE_MIN_TOKENS) == tpa.LARGE_TILES
    assert tpa.default_prefill_tiles(torch.bfloat16, 64, 8192) == tpa.SMALL_TILES   # head_dim 64: never LARGE
    assert tpa.default_prefill_tiles(torch.bfloat16, 128, tpa.LARGE_MIN_TOKENS - 1) == tpa.SMALL_TILES
    assert tpa.default_prefill_tiles(torch.float32, 128, 8192) == PrefillTiles(64, 32, 4, 2)
    assert tpa.default_prefill_tiles(torch.bfloat16, 256, 8192) == PrefillTiles(64, 16, 4, 2)


def test_default_tiles_for_short_sequences() -> None:
    """A 16-bit launch whose longest sequence (context + new) is at most SHORT_MAX_KEYS keys takes
    SHORT_TILES by head dim, whatever its token count; longer ones, fp32 and head_dim > 128 as
    before."""
    from pagedserve.attention import triton_prefill_attention as tpa
    short = tpa.SHORT_MAX_KEYS
    assert tpa.SHORT_TILES == PrefillTiles(64, 64, 4, 3)
    assert tpa.default_prefill_tiles(torch.bfloat16, 64, 8192, short) == tpa.SHORT_TILES
    assert tpa.default_prefill_tiles(torch.bfloat16, 128, 8192, 300) == tpa.SHORT_TILES
    assert tpa.default_prefill_tiles(torch.float16, 32, 100, 100) == tpa.SHORT_TILES
    assert tpa.default_prefill_tiles(torch.bfloat16, 64, 8192, short + 1) == tpa.SMALL_TILES
    assert tpa.default_prefill_tiles(torch.bfloat16, 128, 8192, short + 1) == tpa.LARGE_TILES
    assert tpa.default_prefill_tiles(torch.bfloat16, 128, 600, short + 1) == tpa.SMALL_TILES
    assert tpa.default_prefill_tiles(torch.float32, 128, 8192, 100) == PrefillTiles(64, 32, 4, 2)
    assert tpa.default_prefill_tiles(torch.bfloat16, 256, 8192, 100) == PrefillTiles(64, 16, 4, 2)


_COMPILE_FOR_SM90 = """
from pagedserve.attention import triton_prefill_attention as p
for tiles in (p.LARGE_TILES, p.SMALL_TILES, p.SHORT_TILES):
    for contiguous in (False, True):
        c = build_prefill(tiles, contiguous)
        assert c.metadata.shared <= 227 * 1024, (tiles, c.metadata.shared)  # sm_90's per-block limit
        waits = [line for line in c.asm["ttgir"].splitlines() if "ttg.async_wait" in line and "num = " in line]
        print(tiles.block_n, contiguous, c.metadata.shared, [w.split("num = ")[1][:1] for w in waits])
        # every full-tile loop keeps num_stages - 1 tiles in flight
        assert sum(w.startswith("      ") and "num = 0" not in w for w in waits) == 3, waits
"""


def test_kernel_compiles_for_sm90() -> None:
    """The prefill kernel's default launch shapes to cubins for sm_90 (tests/kernels/sm90_compile.py),
    within the shared memory of one block, with the context loop's K/V copies pipelined (block
    ids loaded a tile ahead; read in the tile, the pipeliner waited for every copy at the top of
    each iteration: the regression this pins)."""
    pytest.importorskip("triton.backends.nvidia")
    if DEVICE.type == "cuda":
        pytest.skip("the GPU tests compile the kernel for the device itself")
    from tests.kernels.sm90_compile import run
    proc = run(_COMPILE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]
