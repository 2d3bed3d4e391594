"""Block pool and KV cache manager: exact block ids, ref counts, prefix hits, LRU eviction
order, copy-on-write, and no leak."""
from __future__ import annotations

import pytest

from pagedserve.core.block_pool import BlockPool, hash_block_tokens
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestId
from pagedserve.sampling_params import SamplingParams

B = 4


def req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(RequestId(rid), tokens, SamplingParams(max_tokens=8), cache_salt=salt)


def ids(manager: KVCacheManager, request: Request) -> list[int]:
    return manager.block_ids(request.request_id)


def test_pool_allocate_free_order():
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2]
    assert [b.ref_cnt for b in a] == [1, 1, 1]
    assert pool.num_free_blocks == 3
    pool.free(list(reversed(a)))
    # freed blocks go to the tail, tail-first: eviction order is 3,4,5 then 2,1,0
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    with pytest.raises(RuntimeError):
        pool.allocate(7)


def test_pool_of_millions_builds_nothing_ahead():
    """A small model on a large GPU gets tens of millions of blocks (16M for the tiny test models
    on an H200): the pool makes a block only when it is first handed out or looked at, and
    hands out never-used blocks first, in id order, before any freed one (as the eager pool)."""
    import tracemalloc
    tracemalloc.start()
    pool = BlockPool(20_000_000)
    built = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert built < 1 << 20, built   # the eager pool: ~3 GB of block objects and free-list entries
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2] and pool.num_free_blocks == 20_000_000 - 3
    pool.free([a[2], a[1]])
    assert [b.block_id for b in pool.peek_free(3)] == [3, 4, 5]
    assert [b.block_id for b in pool.allocate(2)] == [3, 4]
    assert pool.blocks[2] is a[2] and pool.blocks[7].ref_cnt == 0 and len(pool.blocks) == 20_000_000
    small = BlockPool(4)
    first = small.allocate(4)
    small.free([first[1], first[3]])
    assert small.free_block_ids() == [1, 3] and [b.block_id for b in small.peek_free(5)] == [1, 3]
    assert [b.block_id for b in small.allocate(2)] == [1, 3] and small.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        small.allocate(1)
    with pytest.raises(IndexError):
        small.blocks[4]


def test_allocate_on_demand_and_free():
    m = KVCacheManager(num_blocks=8, block_size=B)
    r = req("a", list(range(10)))                     # 10 tokens -> 3 blocks
    assert m.allocate_slots(r, 10)
    assert ids(m, r) == [0, 1, 2]
    r.num_computed_tokens = 10
    r.output_token_ids.append(99)                     # 11th token fits block 2
    assert m.allocate_slots(r, 1) and ids(m, r) == [0, 1, 2]
    r.num_computed_tokens = 11
    r.output_token_ids.append(98)
    r.num_computed_tokens = 12
    r.output_token_ids.append(97)                     # 13th token needs a 4th block
    assert m.allocate_slots(r, 1) and ids(m, r) == [0, 1, 2, 3]
    m.free(r)
    assert m.pool.num_free_blocks == 8
    assert m.pool.free_block_ids() == [4, 5, 6, 7, 3, 2, 1, 0]


def test_prefix_hit_shares_blocks_and_skips_last_token():
    m = KVCacheManager(num_blocks=16, block_size=B)
    a = req("a", list(range(12)))                     # 3 full blocks
    assert m.allocate_slots(a, 12)
    assert ids(m, a) == [0, 1, 2]
    # identical prompt: the last token must be computed, so only 2 blocks (8 tokens) are served
    b = req("b", list(range(12)))
    hits, num = m.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num == 8
    assert m.allocate_slots(b, 4, hits)
    assert ids(m, b) == [0, 1, 3]
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # a prompt sharing one block, then diverging
    c = req("c", list(range(4)) + [50, 51, 52, 53, 54])
    hits, num = m.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and num == 4
    assert m.stats.queries == 12 + 9 and m.stats.hits == 8 + 4


def test_lookup_compares_token_ids_on_hash_collision():
    m = KVCacheManager(num_blocks=8, block_size=B)
    a = req("a", [1, 2, 3, 4, 5])
    assert m.allocate_slots(a, 5)
    block = m.pool.blocks[0]
    # forge a collision: another token tuple registered under the same hash
    assert m.pool.lookup(block.block_hash, (9, 9, 9, 9)) is None
    assert m.pool.lookup(block.block_hash, (1, 2, 3, 4)) is block


def test_cache_salt_separates_prefixes():
    m = KVCacheManager(num_blocks=8, block_size=B)
    a = req("a", list(range(9)), salt="x")
    assert m.allocate_slots(a, 9)
    assert m.get_computed_blocks(req("b", list(range(9)), salt="y")) == ([], 0)
    assert m.get_computed_blocks(req("c", list(range(9)), salt="x"))[1] == 8


def test_freed_blocks_stay_cached_until_evicted_lru():
    m = KVCacheManager(num_blocks=6, block_size=B)
    a = req("a", list(range(9)))                      # blocks 0,1 full + 2 partial
    assert m.allocate_slots(a, 9)
    m.forget(a)
    assert m.pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    # still served from cache after being freed
    b = req("b", list(range(9)))
    hits, num = m.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num == 8
    # a new request that needs 4 blocks evicts from the head: 3, 4, 5, then 2 (no hash)
    c = req("c", [100 + i for i in range(16)])
    assert m.allocate_slots(c, 16)
    assert ids(m, c) == [3, 4, 5, 2]
    assert m.pool.lookup(hits[0].block_hash, (0, 1, 2, 3)) is not None   # 0 and 1 survive
    d = req("d", [200 + i for i in range(5)])          # needs 2 blocks: evicts 1 then 0
    assert m.allocate_slots(d, 5)
    assert ids(m, d) == [1, 0]
    assert m.get_computed_blocks(req("e", list(range(9)))) == ([], 0)


def test_allocation_failure_changes_nothing():
    m = KVCacheManager(num_blocks=3, block_size=B)
    a = req("a", list(range(8)))
    assert m.allocate_slots(a, 8)
    b = req("b", list(range(100, 110)))
    assert not m.allocate_slots(b, 10)
    assert ids(m, b) == [] and m.pool.num_free_blocks == 1


def test_fork_and_copy_on_write():
    m = KVCacheManager(num_blocks=10, block_size=B)
    parent = req("p", list(range(6)))                 # blocks 0 (full), 1 (partial: 2 of 4)
    assert m.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = req("c", list(range(6)))
    child.num_computed_tokens = 6
    m.fork(parent, child)
    assert ids(m, child) == [0, 1]
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    # each appends one token: the first writer copies the shared partial block
    parent.output_token_ids.append(7)
    assert m.allocate_slots(parent, 1)
    assert ids(m, parent) == [0, 2]
    assert m.take_pending_copies() == [(1, 2)]
    child.output_token_ids.append(8)
    assert m.allocate_slots(child, 1)
    assert ids(m, child) == [0, 1]                    # now sole owner: writes in place
    assert m.take_pending_copies() == []
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1, 2)] == [2, 1, 1]
    m.forget(parent)
    m.forget(child)
    assert m.pool.num_free_blocks == 10


def test_chained_hash_depends_on_parent():
    h1 = hash_block_tokens(None, (1, 2, 3, 4))
    assert hash_block_tokens(h1, (5, 6, 7, 8)) != hash_block_tokens(None, (5, 6, 7, 8))
