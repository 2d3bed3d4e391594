"""FP8 KV caches (kv_cache_dtype fp8 / fp8_e4m3 / fp8_e5m2) in the Triton kernels, against the
torch reference on the same cache: the stores write the bytes torch's conversion writes (E4M3
saturating at +-448), and attention reads the FP8 values back into the query's dtype, within the
fp32 tolerance of the reference over the same (dequantized) keys and values."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention.torch_ref import paged_attention_ref, store_kv_ref  # noqa: E402
from pagedserve.attention.triton_paged_attention import paged_attention  # noqa: E402
from pagedserve.attention.triton_prefill_attention import prefill_attention  # noqa: E402
from pagedserve.attention.triton_store_kv import RotaryStore, rotary_store_kv, store_kv  # noqa: E402
from pagedserve.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.kernels.test_paged_attention import DEVICE, NUM_PAD_TOKENS, make_batch  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _fp8_batch(query_lens, context_lens, fp8, seed, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16):
    batch = make_batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, torch.float32, seed)
    batch.k_cache, batch.v_cache = batch.k_cache.to(fp8), batch.v_cache.to(fp8)
    return batch


@pytest.mark.parametrize("fp8", FP8)
def test_store_writes_torchs_bytes_and_saturates(fp8: torch.dtype) -> None:
    """On CUDA any values (the GPU's round-to-nearest-even is torch's); Triton's interpreter loses
    the carry when a mantissa rounds up (-126.3 -> -64 in E4M3), so on the CPU the values are on
    the FP8 grid already, but for the ones past the largest finite value (saturation)."""
    generator = torch.Generator().manual_seed(3)
    bound = 448.0 if fp8 == torch.float8_e4m3fn else 57344.0
    key = torch.randn(9, 2, 64, generator=generator) * bound / 2
    value = torch.randn(9, 2, 64, generator=generator)
    if DEVICE.type == "cpu":
        key, value = key.to(fp8).float(), value.to(fp8).float()
    key[0, 0, :4] = torch.tensor([3 * bound, -3 * bound, bound * 1.01, -float(2 ** 20)])   # past the bound
    key, value = key.to(DEVICE), value.to(DEVICE)
    caches = [torch.zeros(4, 8, 2, 64, dtype=fp8, device=DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches]
    slots = torch.tensor([3, -1, 9, 17, 0, 31, -1, 8, 25], device=DEVICE)
    store_kv_ref(key, value, *expected, slots)
    store_kv(key, value, *caches, slots)
    assert torch.equal(caches[0].view(torch.uint8), expected[0].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), expected[1].view(torch.uint8))
    stored = caches[0].view(-1, 2, 64)[3].float()   # slot 3: key row 0
    assert stored[0, :4].tolist() == [bound, -bound, bound, -bound] and stored.isfinite().all()


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_attention_reads_fp8(fp8: torch.dtype, num_splits: int | None) -> None:
    """Decodes then prefill chunks with context, over an FP8 cache."""
    batch = _fp8_batch([1, 1, 1, 5, 19], [0, 40, 130, 7, 33], fp8, seed=11)
    num_tokens = int(batch.query_start_loc[-1])
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, batch.scale, 3)
    out = paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                          batch.query_start_loc, batch.scale, batch.max_query_len, batch.max_seq_len, num_decodes=3,
                          out=torch.full_like(batch.query, float("nan")), num_splits=num_splits)
    torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=1e-4, rtol=1e-4)
    # the FP8 values, not the fp32 they came from: the same batch with fp32 caches differs
    full = make_batch([1, 1, 1, 5, 19], [0, 40, 130, 7, 33], 4, 2, 64, 16, torch.float32, 11)
    unrounded = paged_attention_ref(full.query, full.k_cache, full.v_cache, full.block_tables, full.seq_lens,
                                    full.query_start_loc, full.scale, 3)
    assert (out[:num_tokens] - unrounded[:num_tokens]).abs().max() > 1e-3


@pytest.mark.parametrize("fp8", FP8)
def test_prefill_kernel_reads_fp8_context(fp8: torch.dtype) -> None:
    """The prefill kernel with the new tokens' K/V read from the cache (as the reference reads them)."""
    batch = _fp8_batch([37, 64], [50, 0], fp8, seed=5)
    num_tokens = int(batch.query_start_loc[-1])
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, batch.scale, 0)
    out = torch.full_like(batch.query, float("nan"))
    prefill_attention(batch.query, None, None, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                      batch.query_start_loc, batch.scale, out, 0, 2, num_tokens, max_keys=batch.max_seq_len)
    torch.testing.assert_close(out[:num_tokens], expected[:num_tokens], atol=1e-4, rtol=1e-4)


def test_rotary_store_in_the_decode_launch_fp8() -> None:
    """The decode launch that rotates and stores the new key itself writes the same FP8 bytes as
    rotary_store_kv, and attends as the plain launch does after it."""
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 64, 16
    context_lens = [0, 7, 40, 130]
    fp8 = torch.float8_e4m3fn
    batch = _fp8_batch([1] * len(context_lens), context_lens, fp8, seed=2)
    tokens = batch.query.shape[0]
    generator = torch.Generator().manual_seed(5)
    qkv = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator) * 4).to(DEVICE)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, dtype=torch.float32).to(DEVICE)
    positions = torch.tensor(context_lens + [0] * NUM_PAD_TOKENS, device=DEVICE)
    tables = batch.block_tables.cpu()
    slots = torch.tensor([int(tables[s, c // block_size]) * block_size + c % block_size
                          for s, c in enumerate(context_lens)] + [-1] * NUM_PAD_TOKENS, device=DEVICE)
    args = (batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.scale, 1, 512)
    n = len(context_lens)

    def views(t):
        q, k, v = t.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        return q.view(tokens, num_heads, head_dim), k.view(tokens, -1, head_dim), v.view(tokens, -1, head_dim)

    ref_qkv, ref_caches = qkv.clone(), [batch.k_cache.clone(), batch.v_cache.clone()]
    rq, rk, rv = views(ref_qkv)
    rotary_store_kv(positions, rq, rk, rv, rope.cos_cache, rope.sin_cache, *ref_caches, slots)
    expected = paged_attention(rq, *ref_caches, *args, num_decodes=n, out=torch.full_like(rq, float("nan")))
    caches = [batch.k_cache.clone(), batch.v_cache.clone()]
    q, k, v = views(qkv)
    out = paged_attention(q, *caches, *args, num_decodes=n, out=torch.full_like(q, float("nan")),
                          rotary_store=RotaryStore(k, v, slots, rope.cos_cache, rope.sin_cache))
    assert torch.equal(caches[0].view(torch.uint8), ref_caches[0].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), ref_caches[1].view(torch.uint8))
    torch.testing.assert_close(out[:n], expected[:n], atol=1e-5, rtol=1e-5)


_FP8_FOR_SM90 = """
import inspect
from pagedserve.attention.triton_paged_attention import _paged_attention_kernel as kernel
from pagedserve.attention.triton_prefill_attention import _prefill_attention_kernel as prefill
from pagedserve.attention.triton_store_kv import _rotary_store_kv_kernel as rotary_store, _store_kv_kernel as store
for fp8 in ("*fp8e4nv", "*fp8e5"):
    caches = {"k_cache_ptr": fp8, "v_cache_ptr": fp8}
    types = {name: "*fp32" for name in ("partial_acc_ptr", "partial_max_ptr", "partial_sum_ptr")}
    types.update({name: "*i32" for name in ("partial_active_ptr", "block_tables_ptr", "seq_lens_ptr",
                                            "query_start_loc_ptr", "arrivals_ptr")})
    types.update(caches, slot_mapping_ptr="*i64")
    aligned = tuple(name for name in inspect.signature(kernel.fn).parameters
                    if name.endswith("_ptr") or name.startswith("stride") and name != "stride_block_table")
    for rotary in (False, True):
        build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_M=16,
                           BLOCK_Q=4, TILE_N=64, ONE_TILE_PER_SEQ=True, DOT_PRECISION="tf32", ROTARY_STORE=rotary,
                           LIBDEVICE=True, MERGE=rotary, GROUP_PAD=4, SEG_CHUNK=16, WAIT_INPUTS=rotary,
                           PREFETCH_STEP=128, HEADS_FIRST=True), types, aligned, num_warps=4, num_stages=3)
    for contiguous in (False, True):
        names = list(inspect.signature(prefill.fn).parameters)
        build(prefill, {k: v for k, v in dict(QUERIES_PER_KV=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16,
                                              NEW_KV_FROM_CACHE=False, SAME_KV_STRIDES=True, CACHE_I64=False,
                                              DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_N=64,
                                              CONTEXT_CONTIGUOUS=contiguous).items() if k in names},
              {**types, "ctx_key_ptr": fp8, "ctx_value_ptr": fp8}, num_warps=4, num_stages=2)
    fp32 = {name: "*fp32" for name in ("query_ptr", "out_ptr", "new_k_ptr", "new_v_ptr", "cos_ptr", "sin_ptr")}
    build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_M=16,
                       BLOCK_Q=4, TILE_N=32, ONE_TILE_PER_SEQ=True, DOT_PRECISION="ieee", ROTARY_STORE=True,
                       LIBDEVICE=True, MERGE=True, GROUP_PAD=4, SEG_CHUNK=16, WAIT_INPUTS=False, PREFETCH_STEP=128,
                       HEADS_FIRST=True), {**types, **fp32}, aligned, num_warps=4, num_stages=3)   # an fp32 model
    build(store, dict(BLOCK_SIZE=16, ROW=1024, ROW_PAD=1024), {**caches, "slot_mapping_ptr": "*i64"})
    build(rotary_store, dict(BLOCK_SIZE=16, HALF=64, BLOCK_H=32, LIBDEVICE=True, SCALED=False),
          {**caches, "slot_mapping_ptr": "*i64", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
           "sq_ptr": "*fp32"})
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU tests compile the kernels for the device itself")
def test_fp8_kernels_compile_for_sm90() -> None:
    """The decode (plain and rotary-store), prefill (context paged or contiguous) and store kernels
    over E4M3 and E5M2 caches to cubins for sm_90: the interpreter checks no FP8 conversion's code."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_FP8_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]
