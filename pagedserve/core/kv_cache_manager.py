"""Per-request block tables over the block pool: prefix lookup, allocate / fork
(copy-on-write) / free. Pure Python; the scheduler is its only caller.

Block table of a request with block_size 4 and 10 tokens, 6 of them computed:

    tokens   0 1 2 3 | 4 5 6 7 | 8 9 . .
    blocks   [  b7   ][  b2    ][  b9   ]
             full, hashed   full   partial (no hash)

A block is hashed (and becomes a prefix-cache entry) once all its token ids are known
and scheduled. The last prompt token is never served from cache: its logits are needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block_tokens
from pagedserve.core.request import Request
from pagedserve.engine_io import BlockId, RequestId


@dataclass
class PrefixCacheStats:
    queries: int = 0   # prompt tokens looked up
    hits: int = 0      # prompt tokens served from cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[RequestId, list[KVCacheBlock]] = {}
        self.req_to_hashes: dict[RequestId, list[BlockHash]] = {}
        self.num_cached_blocks: dict[RequestId, int] = {}
        self.pending_copies: list[tuple[BlockId, BlockId]] = []   # copy-on-write (src, dst)
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: RequestId) -> list[BlockId]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """The request's chained hashes for its first `num_full_blocks` blocks (memoised)."""
        hashes = self.req_to_hashes.setdefault(request.request_id, [])
        extra = (request.cache_salt,) if request.cache_salt else None
        size = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            tokens = tuple(request.token_ids_range(i * size, (i + 1) * size))
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens, extra))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request that has no blocks yet: (blocks, num_tokens).
        Takes no references; pass the result to allocate_slots."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size   # keep the last token to compute
        hashes = self._block_hashes(request, max_blocks)
        hits: list[KVCacheBlock] = []
        size = self.block_size
        for i in range(max_blocks):
            block = self.pool.lookup(hashes[i], tuple(request.token_ids_range(i * size, (i + 1) * size)))
            if block is None:
                break
            hits.append(block)
        if request.num_cached_tokens < 0:
            self.stats.queries += request.num_tokens
            self.stats.hits += len(hits) * size
        return hits, len(hits) * size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones (and after
        `new_computed_blocks`, prefix hits for a request with no blocks). Returns False and
        changes nothing when the pool cannot satisfy it. A shared partial last block is
        copied first (copy-on-write), queued in `pending_copies`."""
        blocks = self.req_to_blocks.get(request.request_id)
        if blocks is None:
            blocks = self.req_to_blocks[request.request_id] = []
        num_total = request.num_computed_tokens + request.num_unresolved_tokens + num_new_tokens
        if not new_computed_blocks and blocks and blocks[-1].ref_cnt == 1 \
                and num_total <= len(blocks) * self.block_size:
            # fast path (most decode steps): the tokens fit the blocks held, nothing shared,
            # and no block filled up since the last call
            if self.enable_prefix_caching \
                    and num_total // self.block_size > self.num_cached_blocks.get(request.request_id, 0):
                self._cache_full_blocks(request, blocks, num_total)
            return True
        new_computed_blocks = new_computed_blocks or []
        num_computed = request.num_scheduled_tokens_ahead + len(new_computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_new_blocks = self.blocks_needed(num_total) - len(blocks) - len(new_computed_blocks)
        needs_copy = bool(blocks) and blocks[-1].ref_cnt > 1 and num_computed % self.block_size != 0 \
            and num_new_tokens > 0
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(num_new_blocks, 0) + int(needs_copy) + num_revived > self.pool.num_free_blocks:
            return False
        if needs_copy:
            src = blocks[-1]
            (dst,) = self.pool.allocate(1)
            self.pool.free([src])
            blocks[-1] = dst
            self.pending_copies.append((src.block_id, dst.block_id))
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
        if num_new_blocks > 0:
            blocks.extend(self.pool.allocate(num_new_blocks))
        self._cache_full_blocks(request, blocks, num_total)
        return True

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self.num_cached_blocks[request.request_id] = num_full
        hashes = self._block_hashes(request, num_full)
        size = self.block_size
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i], tuple(request.token_ids_range(i * size, (i + 1) * size)))

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` the parent's blocks by reference (n > 1 after the shared prefill). The
        partial last block is copied by whichever sibling writes to it first."""
        blocks = list(self.req_to_blocks[parent.request_id])
        self.pool.touch(blocks)
        self.req_to_blocks[child.request_id] = blocks
        self.req_to_hashes[child.request_id] = list(self.req_to_hashes.get(parent.request_id, []))
        self.num_cached_blocks[child.request_id] = self.num_cached_blocks.get(parent.request_id, 0)

    def free(self, request: Request) -> None:
        """Drop the request's blocks, tail first (a prefix's head is evicted last)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.num_cached_blocks.pop(request.request_id, None)

    def uncache(self, request: Request) -> None:
        """A step with this request failed: its blocks' KV may be unwritten, so none of them
        may serve a prefix-cache hit any more (their contents stay, for current holders)."""
        for block in self.req_to_blocks.get(request.request_id, []):
            self.pool.uncache(block)

    def forget(self, request: Request) -> None:
        """The request is finished for good: drop its memoised hashes too."""
        self.free(request)
        self.req_to_hashes.pop(request.request_id, None)

    def take_pending_copies(self) -> list[tuple[BlockId, BlockId]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
