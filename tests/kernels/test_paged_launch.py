"""The paged attention kernel's launch shapes (attention/paged_launch.py) and the launches
paged_attention makes with them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.attention import paged_launch, triton_paged_attention as tpa  # noqa: E402
from pagedserve.attention.paged_launch import TileConfig, narrow_decode_launch  # noqa: E402
from pagedserve.attention.split_plan import SplitPlan  # noqa: E402
from pagedserve.attention.triton_paged_attention import paged_attention  # noqa: E402
from tests.kernels.test_paged_attention import make_batch  # noqa: E402


def test_narrow_decode_launch_for_latency_bound_decodes(monkeypatch) -> None:
    """Few-program 16-bit decode launches bounded by <= 2048 keys take 32-key tiles, 2 stages and
    the count rule's plan with its thresholds in 32-key tiles (one tile a segment up to 512 keys,
    lone up to 128); anything else keeps the default launch (None). paged_attention launches
    with them unless the caller forces a plan or tiles."""
    monkeypatch.setattr(paged_launch, "sm_count", lambda device: 132)   # the H200's
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    narrow = (TileConfig(16, 32, 4, 2), SplitPlan(32, 2, 16, 4))
    assert narrow_decode_launch(1, 8, 4, 128, 1, 2048, bf16, 32, cpu) == narrow   # llama-8b, batch 1
    assert narrow_decode_launch(4, 8, 4, 64, 1, 2048, torch.float16, 32, cpu) == (
        TileConfig(16, 32, 4, 2), SplitPlan(8, 2, 16, 4))   # 32 programs: 264 / 32 -> 8 segments
    for args in ((5, 8, 4, 128, 1, 2048, bf16), (1, 8, 4, 128, 1, 4096, bf16), (1, 8, 4, 128, 2, 2048, bf16),
                 (1, 8, 4, 256, 1, 2048, bf16), (1, 8, 4, 128, 1, 2048, torch.float32)):
        assert narrow_decode_launch(*args, 32, cpu) is None, args
    launched = []
    monkeypatch.setattr(tpa, "_launch_attention", lambda *a, **kw: launched.append((a[13], a[14])))
    batch = make_batch([1], [383], 32, 8, 128, 16, torch.float32, seed=1)
    q, k, v = (t.to(bf16) for t in (batch.query, batch.k_cache, batch.v_cache))
    for kwargs in ({}, {"num_splits": SplitPlan(32)}, {"tiles": TileConfig(16, 64, 4, 3)}):
        paged_attention(q, k, v, batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.scale, 1, 2048,
                        num_decodes=1, **kwargs)
    assert launched[0] == narrow
    assert launched[1] == (TileConfig(16, 64, 4, 3), SplitPlan(32)) and launched[2][0] == TileConfig(16, 64, 4, 3)


def test_cascade_decode_launch_plan(monkeypatch) -> None:
    """A cascade's decode launch (launch_plan cascade=True): 32-key tiles and 2 stages (16-key for fp32), never
    narrow, and at most CASCADE_MAX_SEGMENTS segments: a CUDA graph's chunked plan (bound 32768, 256 rows of
    llama-8b: 15 segments of 69 tiles) becomes 4 segments of 256 tiles; the count rule's count is lowered; a plan the
    caller forces is kept."""
    monkeypatch.setattr(paged_launch, "sm_count", lambda device: 132)
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    assert paged_launch.launch_plan(256, 32, 8, 128, 1, 32768, bf16, cpu, tiles=TileConfig(16, 32, 4, 2))[1] \
        == SplitPlan(15, 69, 0, 0)   # the plain launch under the same tiles
    assert paged_launch.launch_plan(256, 32, 8, 128, 1, 32768, bf16, cpu, cascade=True) == (
        TileConfig(16, 32, 4, 2), SplitPlan(4, 256, 0, 0), False)
    assert paged_launch.launch_plan(1, 32, 8, 128, 1, 2048, bf16, cpu, cascade=True) == (   # not narrow
        TileConfig(16, 32, 4, 2), SplitPlan(4, 2, 8, 2), False)
    assert paged_launch.launch_plan(64, 32, 8, 128, 1, 2048, torch.float32, cpu, cascade=True)[0] \
        == TileConfig(16, 16, 4, 2)
    assert paged_launch.launch_plan(256, 32, 8, 128, 1, 32768, bf16, cpu, 6, cascade=True)[1] == SplitPlan(6)
