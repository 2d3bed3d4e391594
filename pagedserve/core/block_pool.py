"""The pool of KV blocks: free list in LRU order, ref counts, and the hash -> block map of
the prefix cache.

Invariants:
- a block is in the free queue iff its ref_cnt == 0; the queue is the never-used blocks (ids
  from `_fresh` up, made as objects on first use) followed by `_free`, the blocks freed after
  use;
- a free block keeps its hash (and stays findable) until it is handed out again, so a
  later request can revive it (lazy eviction); the free queue's head is evicted first;
- `cached` maps a hash to at most one block, and that block's `block_hash` is the key.

The host tier (kv_cache_manager.py) is a second BlockPool whose blocks are `on_host`; the
device pool's `on_evict` hook lets the manager copy an evicted prefix block there first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, NewType

from pagedserve.engine_io import BlockId

BlockHash = NewType("BlockHash", int)


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    block_id: BlockId
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = field(default=(), repr=False)   # set once the block is full and hashed
    on_host: bool = False   # a block of the host tier's pool (core/kv_cache_manager.py)


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: tuple[int, ...],
                      extra_keys: tuple | None = None) -> BlockHash:
    """Chained hash of a full block: (parent hash, token ids, extra keys such as a cache salt).
    Python's tuple hash of ints is deterministic; lookups also compare token ids, so a
    collision can never serve the wrong KV."""
    return BlockHash(hash((parent_hash, token_ids, extra_keys)))


class BlockPool:
    """Mutated only by the KV cache manager, from the engine thread."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, on_host: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # Blocks never handed out yet are ids [_fresh, num_blocks): the head of the free queue,
        # in id order (they were its first entries and nothing that reaches the queue later
        # goes ahead of them), made as objects only when first used. A pool of millions of
        # blocks (a small model on a large GPU) then costs nothing to build.
        self.blocks = _Blocks(num_blocks, on_host)
        self._fresh = 0
        # called with a hashed block about to lose its hash because it is handed out again
        # (not on uncache: that KV may be unwritten)
        self.on_evict: Callable[[KVCacheBlock], None] | None = None
        # block_id -> None for blocks freed after use; insertion order = eviction order (head first).
        self._free: OrderedDict[BlockId, None] = OrderedDict()
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._fresh + len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by live requests (0.0 .. 1.0)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def free_block_ids(self) -> list[BlockId]:
        """Free blocks in eviction order (for tests and reports)."""
        return [BlockId(i) for i in range(self._fresh, self.num_blocks)] + list(self._free)

    def peek_free(self, count: int) -> list[KVCacheBlock]:
        """The first `count` free blocks in eviction order (next to be handed out)."""
        fresh = min(count, self.num_blocks - self._fresh)
        made = self.blocks.made   # a freed block was made when first handed out
        return self.blocks.span(self._fresh, self._fresh + fresh) + \
            [made[block_id] for block_id in islice(self._free, count - fresh)]

    def allocate(self, count: int) -> list[KVCacheBlock]:
        """Pop `count` blocks from the head of the free queue, evicting their cached hashes.
        The caller checked num_free_blocks first."""
        if count > self.num_free_blocks:
            raise RuntimeError(f"cannot allocate {count} blocks, {self.num_free_blocks} free")
        fresh = min(count, self.num_blocks - self._fresh)
        out = self.blocks.span(self._fresh, self._fresh + fresh)
        for block in out:
            block.ref_cnt = 1
        self._fresh += fresh
        made = self.blocks.made
        for _ in range(count - fresh):
            block_id, _ = self._free.popitem(last=False)
            block = made[block_id]
            if block.block_hash is not None and self.on_evict is not None:
                self.on_evict(block)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = ()

    def lookup(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> KVCacheBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take one more reference on each block (prefix hit or fork); a free block leaves the
        free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference on each block, in the order given; a block reaching 0 goes to the
        tail of the free queue (evicted last). Callers pass a request's blocks tail first, so
        a prefix's head blocks outlive its tail."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def refresh(self, block: KVCacheBlock) -> None:
        """A free block was used again (a host-tier hit by an eviction): evict it last."""
        if block.ref_cnt == 0:
            self._free.move_to_end(block.block_id)

    def uncache(self, block: KVCacheBlock) -> None:
        """Drop the block's hash: it is no longer a prefix-cache entry."""
        self._evict(block)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash, token_ids: tuple[int, ...]) -> None:
        """Register a full block under its hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = token_ids
        self.cached.setdefault(block_hash, block)


class _Blocks:
    """The pool's blocks by id, each made on first access: `made` holds ids 0 .. len(made) - 1."""

    __slots__ = ("made", "_size", "_on_host")

    def __init__(self, size: int, on_host: bool) -> None:
        self.made: list[KVCacheBlock] = []
        self._size, self._on_host = size, on_host

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int | slice):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._size))]
        if not 0 <= index < self._size:
            raise IndexError(f"block {index} of a pool of {self._size}")
        return self.span(index, index + 1)[0]

    def span(self, start: int, stop: int) -> list[KVCacheBlock]:
        """Blocks start .. stop - 1 (within the pool), made first where they are not yet."""
        made = self.made
        if stop > len(made):
            on_host = self._on_host
            made.extend(KVCacheBlock(BlockId(i), on_host=on_host) for i in range(len(made), stop))
        return made[start:stop]
