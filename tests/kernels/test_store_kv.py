"""store_kv (Triton) against store_kv_ref: exact copies, -1 slots skipped, strided inputs; and
rotary_store_kv (rotary fused into the store) against the rotary kernel then store_kv."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention.torch_ref import store_kv_ref  # noqa: E402
from pagedserve.attention.triton_store_kv import rotary_store_kv, store_kv  # noqa: E402
from pagedserve.layers.rotary import RotaryEmbedding  # noqa: E402
from pagedserve.layers.triton_ops import rotary_in_place  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter (CPU) runs numpy, which has no bfloat16: half types are tested on CUDA only.
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [torch.float32]


def _random_case(num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    return key, value, k_cache, v_cache, slots.to(DEVICE)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (3, 96)])
def test_store_kv_matches_reference(dtype: torch.dtype, block_size: int, num_kv_heads: int,
                                    head_dim: int) -> None:
    key, value, k_cache, v_cache, slots = _random_case(
        num_tokens=37, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        num_blocks=9, dtype=dtype, seed=block_size * 100 + head_dim)
    slots[[0, 5, 36]] = -1  # padding tokens
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_expected, v_expected, slots)
    k_before = k_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)
    assert not torch.equal(k_cache, k_before)  # the test writes something


def test_all_padding_leaves_cache_unchanged() -> None:
    key, value, k_cache, v_cache, slots = _random_case(5, 2, 64, 16, 2, torch.float32, seed=1)
    slots.fill_(-1)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def test_strided_views_of_fused_qkv_and_int32_slots() -> None:
    num_tokens, num_heads, num_kv_heads, head_dim = 11, 4, 2, 64
    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE)
    _, key, value = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    key = key.view(num_tokens, num_kv_heads, head_dim)
    value = value.view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    k_cache = torch.zeros(4, 16, num_kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 17, 18, 63, -1, 0, 40, 41, 42, 5, 6], dtype=torch.int32, device=DEVICE)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_expected, v_expected, slots.long())
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_empty_batch_is_a_no_op() -> None:
    key, value, k_cache, v_cache, slots = _random_case(0, 2, 64, 16, 2, torch.float32, seed=2)
    k_before = k_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_before)


@pytest.mark.parametrize("bad", ["slot_len", "head_dim", "slot_dtype", "cache_layout"])
def test_bad_inputs_raise_clear_errors(bad: str) -> None:
    key, value, k_cache, v_cache, slots = _random_case(6, 2, 64, 16, 2, torch.float32, seed=3)
    if bad == "slot_len":
        slots = slots[:5]
    elif bad == "head_dim":
        key, value = key[..., :32], value[..., :32]
    elif bad == "slot_dtype":
        slots = slots.float()
    else:
        k_cache = k_cache.transpose(1, 2)
    with pytest.raises(ValueError):
        store_kv(key, value, k_cache, v_cache, slots)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (6, 3, 32), (8, 8, 128)])
def test_rotary_store_kv_matches_rotary_then_store(dtype: torch.dtype, heads: int, kv_heads: int,
                                                  head_dim: int) -> None:
    """Views of one qkv projection, padding slots: q and k rotated in place and the cache
    written bit for bit as the rotary kernel then store_kv do it (the same rotation helper),
    and q / the cached k within tolerance of the torch rotary."""
    generator = torch.Generator().manual_seed(heads * head_dim)
    tokens, block_size, num_blocks = 5, 16, 4
    rope = RotaryEmbedding(head_dim, 512, 10000.0, dtype=dtype).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    positions = torch.tensor([0, 3, 200, 511, 17], device=DEVICE)
    slots = torch.tensor([5, -1, 63, 20, -1], device=DEVICE)
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
              for _ in range(2)]

    def views(t):
        q, k, v = t.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    ref_qkv, ref_caches = qkv.clone(), [c.clone() for c in caches]
    q_ref, k_ref, v_ref = views(ref_qkv)
    cos, sin = rope.cos_cache[positions].unsqueeze(1), rope.sin_cache[positions].unsqueeze(1)
    torch_q, torch_k = q_ref * cos + rope._rotate_half(q_ref) * sin, k_ref * cos + rope._rotate_half(k_ref) * sin
    rotary_in_place(positions, q_ref, k_ref, rope.cos_cache, rope.sin_cache)
    store_kv(k_ref, v_ref, *ref_caches, slots)
    q, k, v = views(qkv)
    rotary_store_kv(positions, q, k, v, rope.cos_cache, rope.sin_cache, *caches, slots)
    assert torch.equal(qkv, ref_qkv)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q, torch_q, atol=tol, rtol=tol)
    torch.testing.assert_close(caches[0].view(-1, kv_heads, head_dim)[slots[slots >= 0]], torch_k[slots >= 0],
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rotary_store_kv_of_an_unnormed_hand_off(dtype: torch.dtype) -> None:
    """A W4A16 norm launch's fp32 hand-off (w4a16_handoff.py): each token's q / k / v scaled by
    rsqrt(squares / K + eps) in the launch, q rotated into `q out` (its dtype), the cache
    written; against torch on the scaled rows. The hand-off's key is left as it was."""
    generator = torch.Generator().manual_seed(11)
    tokens, heads, kv_heads, head_dim, block_size = 3, 4, 2, 64, 16
    rope = RotaryEmbedding(head_dim, 512, 10000.0, dtype=dtype).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(DEVICE) * 40
    squares = (torch.rand(tokens, generator=generator) * 1e4 + 10).to(DEVICE)
    positions = torch.tensor([7, 0, 300], device=DEVICE)
    slots = torch.tensor([9, 40, -1], device=DEVICE)
    caches = [torch.zeros(4, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    before = qkv.clone()
    q_out = torch.empty(q.shape, dtype=dtype, device=DEVICE)
    got = rotary_store_kv(positions, q, k, v, rope.cos_cache, rope.sin_cache, *caches, slots, (q_out, squares, 1 / 256, 1e-5))
    assert got is q_out and torch.equal(qkv, before)
    scale = torch.rsqrt(squares / 256 + 1e-5)[:, None, None]
    qs, ks, vs = q * scale, k * scale, v * scale
    cos, sin = (c[positions].float().unsqueeze(1) for c in (rope.cos_cache, rope.sin_cache))
    torch_q, torch_k = qs * cos + rope._rotate_half(qs) * sin, ks * cos + rope._rotate_half(ks) * sin
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q_out.float(), torch_q, atol=tol, rtol=tol)
    live = slots >= 0
    stored = [c.view(-1, kv_heads, head_dim)[slots[live]].float() for c in caches]
    torch.testing.assert_close(stored[0], torch_k[live], atol=tol, rtol=tol)
    torch.testing.assert_close(stored[1], vs[live], atol=tol, rtol=tol)
    assert not caches[0].view(-1, kv_heads, head_dim)[[i for i in range(64) if i not in (9, 40)]].any()


_COMPILE_FOR_SM90 = """
from pagedserve.attention.triton_store_kv import _rotary_store_kv_kernel as kernel
ints = {name: "*i64" for name in ("slot_mapping_ptr", "pos_ptr")}
handed = {name: "*fp32" for name in ("q_ptr", "key_ptr", "value_ptr", "sq_ptr")}
for scaled, types in ((False, ints), (True, {**ints, **handed})):
    build(kernel, dict(BLOCK_SIZE=16, HALF=64, BLOCK_H=32, LIBDEVICE=True, SCALED=scaled), types, num_warps=4)
"""


def test_rotary_store_kv_compiles_for_sm90() -> None:
    """The kernel, plain and scaled (a hand-off's fp32 rows), to a cubin for sm_90 (the
    interpreter above does not check what compiles; tests/kernels/sm90_compile.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_COMPILE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]
