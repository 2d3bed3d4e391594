"""The paged decode attention kernel compiled for sm_90 on a machine without a GPU
(tests/kernels/sm90_compile.py): what the Triton interpreter that runs the other kernel tests
does not check (loop-carried types, layouts, the order of the PTX's loads and stores). The
launches are the decode graphs' (one query tile a sequence, on the heads-first grid of the
engine's DECODE_HEADS_FIRST, and on the old grid)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# the decode kernel's argument types (partials and indices) and what a launch's specialisation
# knows: pointers and strides multiples of 16 (vectorised loads); for the scripts below
_DECODE_KERNEL_TYPES = """
import inspect
from pagedserve.attention.triton_paged_attention import _paged_attention_kernel as kernel
types = {name: "*fp32" for name in ("partial_acc_ptr", "partial_max_ptr", "partial_sum_ptr")}
types.update({name: "*i32" for name in ("partial_active_ptr", "block_tables_ptr", "seq_lens_ptr",
                                        "query_start_loc_ptr")})
types["slot_mapping_ptr"] = "*i64"
aligned = tuple(name for name in inspect.signature(kernel.fn).parameters
                if name.endswith("_ptr") or name.startswith("stride") and name != "stride_block_table")
"""


_COMPILE_FOR_SM90 = _DECODE_KERNEL_TYPES + """
for head_dim, tile_n in ((128, 64), (64, 64)):   # llama-8b's and llama-1b's decode launches
    for rotary in (False, True):
        for heads_first in (True, False):   # the decode grid, and the old one (> 65,535 sequences)
            build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim,
                               BLOCK_SIZE=16, BLOCK_M=16, BLOCK_Q=4, TILE_N=tile_n, ONE_TILE_PER_SEQ=True,
                               DOT_PRECISION="tf32", ROTARY_STORE=rotary, LIBDEVICE=True, MERGE=rotary,
                               GROUP_PAD=4, SEG_CHUNK=16, WAIT_INPUTS=rotary, PREFETCH_STEP=64,
                               HEADS_FIRST=heads_first),
                  {**types, "arrivals_ptr": "*i32"}, aligned, num_warps=4, num_stages=3)
from pagedserve.attention.triton_segment_merge import _reduce_segments_kernel as reduce
build(reduce, dict(NUM_HEADS=32, HEAD_DIM=128, HEAD_DIM_PAD=128, SEG_CHUNK=16),
      {**types, "active_ptr": "*i32"}, ("partial_acc_ptr", "out_ptr"), num_warps=4)
"""


_DECODE_PTX = _DECODE_KERNEL_TYPES + """
import json
k = build(kernel, dict(NUM_HEADS=32, QUERIES_PER_KV=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_M=16,
                       BLOCK_Q=4, TILE_N=64, ONE_TILE_PER_SEQ=True, DOT_PRECISION="tf32", ROTARY_STORE=True,
                       LIBDEVICE=True, MERGE=True, GROUP_PAD=4, SEG_CHUNK=16, WAIT_INPUTS=True, PREFETCH_STEP=64,
                       HEADS_FIRST=True),
          {**types, "arrivals_ptr": "*i32"}, aligned, num_warps=4, num_stages=3)
names = ("ld.global", "st.global.b16", "cp.async.commit_group", "cp.async.wait_group 0", "atom.global", "bar.sync",
         "prefetch.global.L2", "griddepcontrol.wait")
lines = [" ".join(line.split()) for line in k.asm["ptx"].splitlines()]
print(json.dumps([name for line in lines for name in names if name in line]))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="compiles for sm_90 on a machine without a GPU")
def test_fused_decode_stores_the_new_key_before_the_loop_reads() -> None:
    """llama-8b's one-row decode launch (rotary, store, merge) for sm_90: the new key and value go out
    before the loop issues its first K/V tile, and after the loop no load is issued before the merge's
    atomic. Stored after the loop, their tile was read back on its own (K, then V after the first dot):
    the last segment, which finishes a batch-1 launch, paid three dependent round trips more. As a
    programmatic dependent launch (DECODE_PDL) it prefetches K / V lines and waits (griddepcontrol.wait)
    after the loads that do not depend on the projection before it, and before those that do."""
    pytest.importorskip("triton.backends.nvidia")
    import json
    from tests.kernels.sm90_compile import run
    proc = run(_DECODE_PTX)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    first_commit, loop_end = ops.index("cp.async.commit_group"), ops.index("cp.async.wait_group 0")
    assert ops[:first_commit].count("st.global.b16") == 2, ops   # the new key's and value's rows (bf16)
    wait = ops.index("griddepcontrol.wait")
    assert ops.count("griddepcontrol.wait") == 1 and ops[:wait].count("prefetch.global.L2") == 2, ops
    assert ops[:wait].count("ld.global") >= 3 and "ld.global" in ops[wait:ops.index("st.global.b16")], ops
    after_loop = ops[loop_end:ops.index("atom.global")]
    assert "ld.global" not in after_loop, after_loop


def test_decode_kernel_compiles_for_sm90() -> None:
    """The decode launch, plain and with rotary_store, and the reduce launch to cubins for sm_90
    (bf16, the decode graphs' shapes): the interpreter does not check what compiles
    (tests/kernels/sm90_compile.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_COMPILE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]
