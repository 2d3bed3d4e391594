"""The CPU KV pool (worker/kv_pool.kv_zeros): zeros, like torch.zeros, but from the OS's zero pages,
so only the pages of written blocks become resident (Linux: RssAnon in /proc/self/status)."""
import sys

import pytest
import torch

from pagedserve.worker.kv_pool import kv_zeros


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_kv_pool_is_zeros_and_resident_only_where_written():
    shape = (4, 2048, 16, 3, 64)   # [2 * layers, blocks, block_size, kv heads, head_dim]: 96 MiB of fp32
    before = _rss_anon_bytes()
    pool = kv_zeros(shape, torch.float32, torch.device("cpu"))
    assert pool.shape == shape and pool.dtype == torch.float32 and pool.is_contiguous()
    pool[:, 7] = 1.5   # one block of every plane: 4 x 12 KiB
    grown = _rss_anon_bytes() - before
    assert grown < 4 * 2**20, grown   # not the 96 MiB of a written pool, nor a 2 MiB huge page per plane
    assert torch.equal(pool[:, 7], torch.full_like(pool[:, 7], 1.5))
    assert not pool[:, :7].any() and not pool[:, 8:].any()
    assert torch.equal(kv_zeros((3, 5), torch.bfloat16, torch.device("cpu")), torch.zeros(3, 5, dtype=torch.bfloat16))
