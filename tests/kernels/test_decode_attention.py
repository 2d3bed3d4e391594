"""decode_attention (one launch: rotary, K/V store, attention, split-K merge) against the
generic path: rotary_in_place at position seq_len - 1, store_kv_ref, paged_attention_ref. The
cache must come out bit for bit the same; the output within the paged kernel's tolerances;
padding rows as the decode graphs pad them (seq_len 1, slot -1) write nothing; the merge
counters back at zero."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention.torch_ref import paged_attention_ref, store_kv_ref  # noqa: E402
from pagedserve.attention.triton_decode_attention import decode_attention  # noqa: E402
from pagedserve.attention.triton_paged_attention import SplitPlan, paged_attention  # noqa: E402
from pagedserve.attention.triton_store_kv import rotary_store_kv  # noqa: E402
from pagedserve.layers.rotary import RotaryEmbedding  # noqa: E402
from pagedserve.layers import triton_ops  # noqa: E402
from pagedserve.layers.triton_ops import rotary_in_place  # noqa: E402

from tests.kernels.test_paged_attention import DEVICE, FLOAT_DTYPES, TOLERANCES, make_batch  # noqa: E402


def run_case(context_lens: list[int], dtype: torch.dtype, rotary: bool, num_splits: int | None,
             tiles_per_segment: int | None, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
             no_slot: tuple[int, ...] = (), seed: int = 0) -> None:
    """One token per sequence; the sequences in `no_slot` have slot -1 (their rows are not
    compared: the reference cache holds no new key for them)."""
    query_lens = [1] * len(context_lens)
    batch = make_batch(query_lens, context_lens, heads, kv_heads, head_dim, 16, dtype, seed)
    num_tokens = len(context_lens)
    generator = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    seq_lens = batch.seq_lens.tolist()
    positions = torch.tensor([n - 1 for n in seq_lens], device=DEVICE)
    slot_mapping = torch.tensor([-1 if s in no_slot else int(batch.block_tables[s, (n - 1) // 16]) * 16 + (n - 1) % 16
                                 for s, n in enumerate(seq_lens)], dtype=torch.int64, device=DEVICE)
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, dtype=dtype).to(DEVICE)

    ref_caches = [batch.k_cache.clone(), batch.v_cache.clone()]
    q_ref, k_ref = q.clone(), k.clone()
    if rotary:
        rotary_in_place(positions, q_ref, k_ref, rope.cos_cache, rope.sin_cache)
    store_kv_ref(k_ref, v, *ref_caches, slot_mapping)
    expected = paged_attention_ref(q_ref, *ref_caches, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                   batch.scale, None)

    qkv_before = qkv.clone()
    for repeat in range(2):   # the second call finds the merge counters reset
        caches = [batch.k_cache.clone(), batch.v_cache.clone()]
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k, v, *caches, batch.block_tables, batch.seq_lens, slot_mapping, batch.scale,
                         batch.max_seq_len, (rope.cos_cache, rope.sin_cache) if rotary else None, out,
                         num_splits=num_splits, tiles_per_segment=tiles_per_segment)
        assert torch.equal(qkv, qkv_before), "query / key / value were modified"
        assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
        atol, rtol = TOLERANCES[dtype]
        live = [t for t in range(num_tokens) if t not in no_slot]   # slot -1: the cache holds no new key
        torch.testing.assert_close(out[live], expected[live], atol=atol, rtol=rtol)
        counters = triton_ops._counter_holder(DEVICE)[-1]
        assert int(counters.abs().sum()) == 0, f"merge counters left set after call {repeat}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("num_splits,tiles_per_segment", [(None, 1), (1, 1), (4, 1), (4, 2), (8, 100)])
def test_decode_attention_matches_rotary_store_then_attend(dtype: torch.dtype, rotary: bool,
                                                           num_splits: int | None, tiles_per_segment: int) -> None:
    # contexts: none (only the new key), inside one tile, several tiles (split over segments)
    run_case([0, 5, 40, 300, 129], dtype, rotary, num_splits, tiles_per_segment)


@pytest.mark.parametrize("num_splits", [None, 16])
def test_default_segment_rule_at_every_context_length(num_splits: int | None) -> None:
    """tiles_per_segment None (the paged kernel's rule): contexts of 1-2 key tiles (one
    segment), 3-8 (one tile a segment), 16 and more (two a segment): the reference's output."""
    from pagedserve.attention import triton_paged_attention as paged
    assert (paged.LONE_TILES, paged.SHORT_TILES, paged.TILES_PER_SEGMENT) == (2, 8, 2)
    run_case([0, 40, 100, 300, 500, 1000], torch.float32, True, num_splits, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else []))
# 32: 40 tiles over 20 segments, merged in two chunks; the chunked plan: 3 tiles a segment, unused ones exit
@pytest.mark.parametrize("num_splits", [1, 32, SplitPlan(16, 3, 0, 0)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128)])
def test_bit_for_bit_the_generic_path(dtype: torch.dtype, num_splits: int | SplitPlan, heads: int, kv_heads: int,
                                      head_dim: int) -> None:
    """The one launch against rotary_store_kv + paged_attention (+ its reduce) on the same
    inputs: output and cache equal bit for bit (the default model's 9 / 3 heads among the
    shapes): the bf16 agreement with transformers is the generic path's. Contexts in one tile,
    at a tile's last key, over 2, 5, 16 and 40 tiles."""
    context_lens = [0, 5, 63, 100, 300, 1000, 2500]
    num_tokens = len(context_lens)
    batch = make_batch([1] * num_tokens, context_lens, heads, kv_heads, head_dim, 16, dtype, seed=3)
    generator = torch.Generator().manual_seed(4)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    seq_lens = batch.seq_lens.tolist()
    positions = torch.tensor([n - 1 for n in seq_lens], device=DEVICE)
    slots = torch.tensor([int(batch.block_tables[s, (n - 1) // 16]) * 16 + (n - 1) % 16 for s, n in enumerate(seq_lens)],
                         dtype=torch.int64, device=DEVICE)
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, dtype=dtype).to(DEVICE)
    generic_caches = [batch.k_cache.clone(), batch.v_cache.clone()]
    q_rot, k_rot = q.clone(), k.clone()
    rotary_store_kv(positions, q_rot, k_rot, v, rope.cos_cache, rope.sin_cache, *generic_caches, slots)
    expected = paged_attention(q_rot, *generic_caches, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                               batch.scale, 1, batch.max_seq_len, num_decodes=num_tokens, num_splits=num_splits)
    caches = [batch.k_cache.clone(), batch.v_cache.clone()]
    out = decode_attention(q, k, v, *caches, batch.block_tables, batch.seq_lens, slots, batch.scale,
                           batch.max_seq_len, (rope.cos_cache, rope.sin_cache), num_splits=num_splits)
    assert torch.equal(caches[0], generic_caches[0]) and torch.equal(caches[1], generic_caches[1])
    assert torch.equal(out, expected), f"max abs difference {(out.float() - expected.float()).abs().max()}"


def test_graph_padding_rows_write_nothing() -> None:
    """Rows padded as the decode graphs pad them (seq_len 1, slot -1) leave the cache as it was."""
    run_case([7, 0, 250, 0], torch.float32, True, 4, 1, no_slot=(1, 3))


def test_merge_of_more_segments_than_one_chunk() -> None:
    """16 active segments: the last one merges them in two chunks of 8."""
    run_case([600, 3, 530], torch.float32, True, 16, 1)


def test_head_dim_128_one_kv_head_group_of_eight() -> None:
    run_case([1, 200, 64], torch.float32, True, 2, 1, heads=8, kv_heads=1, head_dim=128)


def test_bad_inputs_raise_clear_errors() -> None:
    batch = make_batch([1], [3], 4, 2, 64, 16, torch.float32, 0)
    q = batch.query[:1]
    k = torch.zeros(1, 2, 64, device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens)
    with pytest.raises(ValueError, match="key/value"):
        decode_attention(q, k[:, :1], k, *args, slots, 1.0, 64)
    with pytest.raises(ValueError, match="slot_mapping"):
        decode_attention(q, k, k, *args, torch.zeros(2, dtype=torch.int64, device=DEVICE), 1.0, 64)
    with pytest.raises(ValueError, match="one token a sequence"):   # two sequences, one token
        decode_attention(q, k, k, batch.k_cache, batch.v_cache, batch.block_tables.repeat(2, 1),
                         batch.seq_lens.repeat(2), slots, 1.0, 64)
    with pytest.raises(ValueError, match="rotary"):
        decode_attention(q, k, k, *args, slots, 1.0, 64, (torch.zeros(8, 63), torch.zeros(8, 63)))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_three_query_heads_per_kv_head(num_splits: int) -> None:
    """The default model's shape (9 heads over 3 KV heads, head_dim 64): a group that does not
    fill a power of two."""
    run_case([3, 77, 260], torch.float32, True, num_splits, 1, heads=9, kv_heads=3, head_dim=64)


@pytest.mark.parametrize("arch", ["llama", "llama3_tied", "qwen3"])
def test_engine_takes_the_one_launch_path_and_keeps_greedy_ids(arch, tiny_checkpoints, monkeypatch) -> None:
    """The engine on the CPU with the Triton backend under the interpreter and Attention's CUDA
    gate opened (on CUDA it is open): its decode steps go through decode_attention (every
    layer, the step's padding and split choice as the runner builds them) and the greedy ids
    equal the torch backend's."""
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA the model parity tests run this path natively")
    from pagedserve import LLM, SamplingParams
    from pagedserve.attention import backend, triton_decode_attention
    from pagedserve.layers import attention, linear_ops
    from pagedserve.worker import model_runner
    from tests.helpers import random_prompts

    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, 512, 3, 40, seed=2)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def generate() -> list[list[int]]:
        llm = LLM(model=tiny_checkpoints[arch], device="cpu", dtype="float32", skip_tokenizer_init=True,
                  max_model_len=128)
        outs = llm.generate(prompts, params, use_tqdm=False)
        llm.shutdown()
        return [list(o.outputs[0].token_ids) for o in outs]

    expected = generate()
    calls = []
    one_launch = triton_decode_attention.decode_attention
    monkeypatch.setattr(triton_decode_attention, "decode_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape[0]) or one_launch(*args, **kwargs))
    monkeypatch.setattr(attention, "fuses", lambda q, weight=None: 0 < q.shape[0] <= 16)
    monkeypatch.setattr(linear_ops, "FUSE_DECODE_ATTENTION", True)   # off by default until GPU-checked
    monkeypatch.setattr(RotaryEmbedding, "uses_triton", lambda self, q: True)
    monkeypatch.setattr(model_runner, "select_backend", lambda device, *_: backend.TritonBackend())
    assert generate() == expected
    assert calls and set(calls) <= {1, 2, 3}


_COMPILE_FOR_SM90 = """
from pagedserve.attention import triton_decode_attention as d, triton_paged_attention as p
ints = {n: "*i32" for n in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "counter_ptr",
                             "partial_active_ptr", "active_ptr")}
types = {**ints, **{n: "*fp32" for n in ("partial_acc_ptr", "partial_max_ptr", "partial_sum_ptr")},
         "slot_mapping_ptr": "*i64"}
shape = dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_M=16, TILE_N=64,
             DOT_PRECISION="tf32")
for pdl in (False, True):
    build(d._decode_attention_kernel, dict(shape, NUM_KV_HEADS=8, HALF=64, ROTARY=True, LIBDEVICE=True, PDL=pdl), types)
build(p._paged_attention_kernel, dict(shape, BLOCK_Q=4, ONE_TILE_PER_SEQ=True), types)
build(p._reduce_segments_kernel, dict(NUM_HEADS=32, HEAD_DIM=128, HEAD_DIM_PAD=128, SEG_CHUNK=16), types)
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU tests compile these kernels for the device itself")
def test_kernels_compile_for_sm90() -> None:
    """The one-launch kernel (PDL on and off), the paged kernel and its reduce to cubins for
    sm_90 (tests/kernels/sm90_compile.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_COMPILE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]
