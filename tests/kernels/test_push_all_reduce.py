"""The push all-reduce kernel (layers/triton_all_reduce.py) on one device with two simulated
ranks: each rank's buffers are the other's peer buffers. Kernels run one at a time here, so a
rank that runs before its peer signalled times out (its spin bound is tiny), and is run again at
the same epoch once the peer's flag is up, as it would have waited. What is checked: the sum
(fp32, exact: one rounding of a two-term sum), the slots taken in turn, the per-program epochs,
the grid, the spin timeout. Memory ordering between GPUs is the device script's to check
(benchmarks/tp_gpu.py allreduce: exact against NCCL, in CUDA graphs)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.layers.triton_all_reduce import BLOCK, MAX_PROGRAMS, PushBuffers, grid_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(slot_bytes: int) -> list[PushBuffers]:
    recv = [torch.zeros(2 * slot_bytes, dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    flags = [torch.zeros(MAX_PROGRAMS, dtype=torch.int64, device=DEVICE) for _ in range(2)]
    return [PushBuffers(recv[1 - r], recv[r], flags[1 - r], flags[r], max_spins=2) for r in range(2)]


def _all_reduce_in_turn(ranks: list[PushBuffers], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 1 first (it sends, then times out), rank 0 (its flag is up: done), rank 1 again."""
    epochs = ranks[1].epochs.clone()
    ranks[1](xs[1])
    assert ranks[1].error.any()   # gave up waiting: nothing was there yet
    ranks[1].error.zero_()
    ranks[1].epochs.copy_(epochs)
    out0 = ranks[0](xs[0])
    out1 = ranks[1](xs[1])
    assert not ranks[0].error.any() and not ranks[1].error.any()
    return [out0, out1]


def test_two_ranks_get_the_same_exact_sum_call_after_call():
    ranks = _pair(slot_bytes=4 * 4 * BLOCK)
    gen = torch.Generator().manual_seed(0)
    calls = torch.zeros(MAX_PROGRAMS, dtype=torch.int64)
    for numel in (BLOCK, 1000, 3 * BLOCK + 5, 2 * BLOCK, 1):   # slots 1, 0, 1, 0, 1 of programs 0
        xs = [torch.randn(numel, generator=gen).to(DEVICE) for _ in range(2)]
        out0, out1 = _all_reduce_in_turn(ranks, xs)
        assert torch.equal(out0, xs[0] + xs[1]) and torch.equal(out1, out0)
        assert xs[0].shape == out0.shape and not out0.data_ptr() == xs[0].data_ptr()
        calls[:grid_for(numel)[0]] += 1
    # each program counts its own calls: program 0 ran in all 5, program 3 only in the call of 4 blocks
    assert calls[:5].tolist() == [5, 2, 1, 1, 0]
    assert ranks[0].epochs.tolist() == calls.tolist() == ranks[1].epochs.tolist()


def test_probe_ok_only_without_a_timeout_then_the_service_spin_bound():
    ranks = _pair(slot_bytes=4 * BLOCK)
    x = torch.ones(BLOCK, device=DEVICE)
    ranks[1](x)   # the peer has not sent: gives up
    assert not ranks[1].probe_ok() and ranks[1].max_spins == 2
    ranks[0](x)   # rank 1's flag is up
    assert ranks[0].probe_ok() and ranks[0].max_spins == PushBuffers.MAX_SPINS


def test_the_grid_depends_only_on_the_size_and_covers_it():
    for numel in (1, BLOCK, BLOCK + 1, 7 * BLOCK, MAX_PROGRAMS * BLOCK * 3 + 17):
        programs, chunk = grid_for(numel)
        assert 1 <= programs <= MAX_PROGRAMS and chunk % BLOCK == 0 and programs * chunk >= numel
        assert (programs - 1) * chunk < numel   # no program without work


def test_what_the_push_buffers_take():
    ranks = _pair(slot_bytes=64)
    assert ranks[0].can_reduce(torch.ones(16, device=DEVICE))              # 64 bytes of fp32
    assert not ranks[0].can_reduce(torch.ones(17, device=DEVICE))          # larger than a slot
    assert not ranks[0].can_reduce(torch.ones(8, dtype=torch.int32, device=DEVICE))
    assert not ranks[0].can_reduce(torch.ones(4, 4, device=DEVICE).t())    # not contiguous
    with pytest.raises(ValueError, match="byte buffers"):
        PushBuffers(torch.zeros(64), torch.zeros(64), *[torch.zeros(MAX_PROGRAMS, dtype=torch.int64)] * 2)
