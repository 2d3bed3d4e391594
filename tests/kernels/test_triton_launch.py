"""layers/triton_launch.launch_fitting: a launch the GPU refuses for shared memory runs again at
fewer pipeline stages (the same tiles in the same order: the same result), remembered per
launch shape; the paged attention and the W4A16 GEMMs launch through it. The refusal is
forced here (Triton raises it before enqueueing anything); what the depths need is compiled
for sm_90 and read from the cubins' metadata."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from triton.runtime.errors import OutOfResources  # noqa: E402

from pagedserve.layers import triton_launch  # noqa: E402
from pagedserve.layers.triton_launch import launch_fitting  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SM86_SHARED = 101_376   # the most shared memory a block may take on sm_86 / sm_89 (99 KiB)


class Refusing:
    """Stands in a JITFunction: refuses launches deeper than `fits` stages, else launches `real`
    (or records the call). `calls`: the depth of each attempt."""

    def __init__(self, fits: int, stages_arg: str = "num_stages", real=None) -> None:
        self.fits, self.stages_arg, self.real, self.calls = fits, stages_arg, real, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            depth = kwargs[self.stages_arg]
            self.calls.append(depth)
            if depth > self.fits:
                raise OutOfResources(40_000 * depth, SM86_SHARED, "shared memory")
            if self.real is not None:
                self.real[grid](*args, **kwargs)
        return launch


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch) -> None:
    monkeypatch.setattr(triton_launch, "_FITTED", {})


def test_refused_launch_steps_down_and_remembers() -> None:
    kernel = Refusing(fits=2)
    launch_fitting(kernel, (1,), 7, stages=4, BLOCK=64, num_warps=4)
    assert kernel.calls == [4, 3, 2]
    launch_fitting(kernel, (1,), 7, stages=4, BLOCK=64, num_warps=4)
    assert kernel.calls[3:] == [2]        # the depth that fitted, first time
    launch_fitting(kernel, (1,), 7, stages=4, BLOCK=32, num_warps=4)
    assert kernel.calls[4:] == [4, 3, 2]  # another shape is its own
    launch_fitting(kernel, (1,), 7, stages=2, BLOCK=64, num_warps=4)
    assert kernel.calls[7:] == [2]        # as is another depth asked


def test_no_deeper_than_min_stages() -> None:
    kernel = Refusing(fits=1)
    with pytest.raises(OutOfResources):
        launch_fitting(kernel, (1,), stages=3, min_stages=2, num_warps=4)
    assert kernel.calls == [3, 2]


def test_a_depth_given_as_constexpr() -> None:
    kernel = Refusing(fits=1, stages_arg="NUM_STAGES")
    launch_fitting(kernel, (1,), stages=3, stages_arg="NUM_STAGES", num_warps=4)
    assert kernel.calls == [3, 2, 1]


def test_a_launch_that_never_fits_raises() -> None:
    kernel = Refusing(fits=0)
    with pytest.raises(OutOfResources):
        launch_fitting(kernel, (1,), stages=2, num_warps=4)
    assert kernel.calls == [2, 1]


def test_launches_that_fit_take_the_fast_path_only() -> None:
    kernel = Refusing(fits=8)
    launch_fitting(kernel, (1,), stages=3, num_warps=4)
    assert kernel.calls == [3] and triton_launch._FITTED == {}


def test_paged_attention_at_fewer_stages_is_the_same(monkeypatch) -> None:
    """A mixed batch (decodes split over segments, a prefill chunk) with every launch refused above
    one stage: the output equals the launch at its own depth, bit for bit."""
    from pagedserve.attention import triton_paged_attention as tpa
    from tests.kernels.test_paged_attention import make_batch
    batch = make_batch(query_lens=[1, 1, 9, 37], context_lens=[40, 130, 21, 0], num_heads=8, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=torch.float32, seed=11)

    def run() -> torch.Tensor:
        return tpa.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, batch.scale, batch.max_query_len, batch.max_seq_len,
                                   num_decodes=2, num_splits=4)

    tokens = int(batch.query_start_loc[-1])
    expected = run()[:tokens]
    refusing = Refusing(fits=1, real=tpa._paged_attention_kernel)
    monkeypatch.setattr(tpa, "_paged_attention_kernel", refusing)
    assert torch.equal(run()[:tokens], expected)
    assert refusing.calls == [3, 2, 1, 2, 1]   # the decode launch (3 stages), the prefill-shaped one (2)


def test_the_last_prefill_tiles_at_fewer_stages_are_the_same(monkeypatch) -> None:
    """The prefill kernel's smallest tiles (the end of its tile fallbacks) refused above one stage."""
    from pagedserve.attention import triton_prefill_attention as tpa
    from tests.kernels.test_prefill_attention import make_batch
    batch = make_batch(query_lens=[70, 3], context_lens=[40, 0], num_heads=4, num_kv_heads=1,
                       head_dim=32, block_size=16, dtype=torch.float32, seed=7)
    tiles = tpa.default_prefill_tiles(torch.float32, 32)
    tokens = int(batch.query_start_loc[-1])

    def run() -> torch.Tensor:
        out = torch.zeros_like(batch.query)
        key = batch.query[:, :1].clone()   # any new K / V: both runs take the same
        return tpa.prefill_attention(batch.query, key, key.clone(), batch.k_cache, batch.v_cache, batch.block_tables,
                                     batch.seq_lens, batch.query_start_loc, batch.scale, out, 0, 2, tokens,
                                     tiles=tiles)[:tokens]

    expected = run()
    refusing = Refusing(fits=1, real=tpa._prefill_attention_kernel)
    monkeypatch.setattr(tpa, "_prefill_attention_kernel", refusing)
    monkeypatch.setattr(tpa, "_UNFIT", set())
    assert torch.equal(run(), expected) and refusing.calls == [2, 1]


@pytest.mark.parametrize("act_order", [False, True], ids=["tuned-gemm", "generic-gemm"])
def test_w4a16_gemms_at_fewer_stages_are_the_same(monkeypatch, act_order) -> None:
    """The tuned GEMM (NUM_STAGES constexpr) and the generic one (num_stages) refused above one stage."""
    from pagedserve.layers.quantization import triton_w4a16
    from tests.kernels.test_quant_kernels import _asymmetric_int4
    torch.manual_seed(4)
    k, n, group, rows = 256, 40, 128, 19
    qweight, scales, zeros = _asymmetric_int4(k, n, group, torch.float32)
    x = torch.randn(rows, k, device=DEVICE)
    if act_order:
        g_idx = (torch.arange(k) // group).flip(0).to(torch.int32).to(DEVICE)
        name, arg = "_w4a16_kernel", "num_stages"
        run = lambda: triton_w4a16.w4a16_matmul(x, qweight, scales, zeros, group, g_idx, path="gemm")  # noqa: E731
    else:
        name, arg = "_w4_gemm_kernel", "NUM_STAGES"
        config = triton_w4a16.GemmConfig(32, 32, num_stages=3)
        run = lambda: triton_w4a16.w4a16_gemm(x, qweight, scales, zeros, group, config)  # noqa: E731
    expected = run()
    refusing = Refusing(fits=1, stages_arg=arg, real=getattr(triton_w4a16, name))
    monkeypatch.setattr(triton_w4a16, name, refusing)
    assert torch.equal(run(), expected)
    assert refusing.calls == [3, 2, 1]


_SHARED_AT_DEPTHS = """
import inspect, json
from tests.kernels.sm90_compile import build
from pagedserve.attention.triton_paged_attention import _paged_attention_kernel as attention
from pagedserve.layers.quantization.triton_w4a16 import _w4_gemm_kernel as gemm, _w4a16_kernel as generic
names = lambda k: list(inspect.signature(k.fn).parameters)
aligned = lambda k: tuple(n for n in names(k) if n.endswith("_ptr") or n.startswith("stride") and n != "stride_block_table")
fp32 = lambda k: {n: "*fp32" for n in names(k) if n.endswith("_ptr")}
ints = {n: "*i32" for n in ("qw_ptr", "z_ptr", "g_ptr", "gidx_ptr", "block_tables_ptr", "seq_lens_ptr",
                            "query_start_loc_ptr", "partial_active_ptr", "arrivals_ptr")}
ints["slot_mapping_ptr"] = "*i64"
shared = {}
for depth in (3, 1):   # fp32 activations at the tuned 64 x 128 tiles
    k = build(gemm, dict(GROUP_SIZE=128, BLOCK_M=64, BLOCK_N=128, IEEE=True, NUM_STAGES=depth, SCALE_W=False),
              {**fp32(gemm), **ints, "s_ptr": "*fp32"}, aligned(gemm), num_warps=4)
    shared[f"gemm {depth}"] = k.metadata.shared
    k = build(generic, dict(GROUP_SIZE=128, HAS_GIDX=False, ONE_GROUP_PER_BLOCK=True, BLOCK_M=64, BLOCK_N=128,
                            BLOCK_K=64, IEEE=True), {**fp32(generic), **ints, "s_ptr": "*fp32"}, aligned(generic),
              num_warps=4, num_stages=depth)
    shared[f"generic {depth}"] = k.metadata.shared
for depth in (2, 1):   # fp32, head_dim 256, a prefill-shaped launch (default_tile_config: 64 x 16)
    k = build(attention, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=256, HEAD_DIM_PAD=256, BLOCK_SIZE=16,
                              BLOCK_M=64, BLOCK_Q=16, TILE_N=16, ONE_TILE_PER_SEQ=False, DOT_PRECISION="ieee",
                              ROTARY_STORE=False, LIBDEVICE=True, MERGE=False, GROUP_PAD=4, SEG_CHUNK=16),
              {**fp32(attention), **ints}, aligned(attention), num_warps=4, num_stages=depth)
    shared[f"attention {depth}"] = k.metadata.shared
print(json.dumps(shared))
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU tests launch these kernels on the device itself")
def test_the_refused_launches_fit_99_kib_at_one_stage() -> None:
    """What launch_fitting is for, from sm_90 cubins: the fp32 W4A16 GEMMs at their 3 stages and the
    fp32 head_dim-256 prefill-shaped attention at its 2 need more than an sm_86 / sm_89 block may
    take; at one stage each fits."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_SHARED_AT_DEPTHS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    for deep, shallow in (("gemm 3", "gemm 1"), ("generic 3", "generic 1"), ("attention 2", "attention 1")):
        assert shared[deep] > SM86_SHARED >= shared[shallow], shared
