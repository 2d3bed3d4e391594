"""Per-request block tables over the block pool: prefix lookup, allocate / fork
(copy-on-write) / free. Pure Python; the scheduler is its only caller.

Block table of a request with block_size 4 and 10 tokens, 6 of them computed:

    tokens   0 1 2 3 | 4 5 6 7 | 8 9 . .
    blocks   [  b7   ][  b2    ][  b9   ]
             full, hashed   full   partial (no hash)

A block is hashed (and becomes a prefix-cache entry) once all its token ids are known
and scheduled. The last prompt token is never served from cache: its logits are needed.

The host tier (num_host_blocks > 0): a second BlockPool of the same block layout in host
memory, holding
- the blocks of requests preempted by swap (`swap_out`; they count as computed tokens). A
  block that is not a device prefix-cache entry (the partial last block; every block with
  prefix caching off) is copied at once. A full, hashed block stays where it is, a free
  (evictable) device prefix entry, and only a host block is reserved for it (`_pending`):
  it is copied there if and when the device evicts it. Resuming, the request shares each
  of its blocks still cached on the device and loads the others into fresh device blocks,
  so swap copies only what recompute would have had to recompute; and
- prefix-cache entries: a hashed device block evicted to make room is copied to the host
  (`_offload`); a lookup that misses on the device goes on in the host pool, and those hits
  are loaded into fresh device blocks. Both pools are LRU; host entries are free blocks
  keeping their hash, so swapped requests' blocks always win over them.
Each step's copies are queued as (source, destination) block id pairs and taken by the
scheduler into the SchedulerOutput (`take_swaps`); the worker runs the swap-outs (device ->
host) first, then the swap-ins (host -> device). The step's forward waits for the swap-outs
(their source blocks are handed out again in the same step) but not for the swap-ins: it
overlaps them, so a request whose blocks are loaded in a step (`is_loading`) runs from the
next step on, and its blocks become prefix-cache entries only then. So that a host block
read by this step's swap-ins is not overwritten by its swap-outs, host blocks read in a step
stay referenced until take_swaps.

Write-behind: so that evictions rarely wait for a copy, take_swaps also copies the hashed
free device blocks next in line for eviction (as many as the most any of the last 16 steps
handed out) that the host lacks, as if they were evicted now (`_offload`) but staying cached on the device. They end
the swap-out list (`num_behind`): the worker runs them after the swap-ins, overlapping this
step's forward (which cannot write them: they are free), and the next step's forward waits
for them. Their eviction then finds them on the host and copies nothing.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pagedserve.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block_tokens
from pagedserve.core.request import Request
from pagedserve.engine_io import BlockId, RequestId


@dataclass
class PrefixCacheStats:
    queries: int = 0   # prompt tokens looked up
    hits: int = 0      # prompt tokens served from cache (either tier)
    host_hits: int = 0           # prompt tokens loaded from the host tier (every load, resumes included)
    blocks_swapped_out: int = 0  # device -> host copies (preemption by swap and evicted prefix blocks)
    blocks_swapped_in: int = 0   # host -> device copies (resumed requests and host prefix hits)
    blocks_offloaded: int = 0    # of blocks_swapped_out: evicted prefix blocks nobody reserved
    # preempted requests (either mode): their computed tokens when preempted, and of those,
    # the tokens they got back on resuming from the device prefix cache / from the host tier
    # (the rest were recomputed)
    preempted_tokens: int = 0
    resumed_device_tokens: int = 0
    resumed_host_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[RequestId, list[KVCacheBlock]] = {}
        self.req_to_hashes: dict[RequestId, list[BlockHash]] = {}
        self.num_cached_blocks: dict[RequestId, int] = {}
        self.pending_copies: list[tuple[BlockId, BlockId]] = []   # copy-on-write (src, dst)
        self.stats = PrefixCacheStats()
        # host tier (see the module docstring)
        self.host = BlockPool(num_host_blocks, enable_prefix_caching, on_host=True) if num_host_blocks else None
        self.req_to_host_blocks: dict[RequestId, list[KVCacheBlock]] = {}   # swapped-out requests
        # host block -> (device block, write-behind?): one writer per host block
        self._swap_out: dict[BlockId, tuple[BlockId, bool]] = {}
        self._num_allocated = 0   # device blocks handed out since the last take_swaps
        self._recent_allocated: deque[int] = deque(maxlen=16)   # ... in each of the last 16 steps
        self._swap_in: list[tuple[BlockId, BlockId]] = []   # (host block, device block)
        self._host_reads: list[KVCacheBlock] = []   # held until take_swaps
        self._loading: set[RequestId] = set()       # requests with swap-ins this step
        # host blocks reserved by swap_out for hashed blocks left in the device prefix cache,
        # written when the device evicts them. Invariant: a pending hash is in pool.cached.
        self._pending: dict[BlockHash, KVCacheBlock] = {}
        self._reserved: dict[BlockId, tuple[BlockHash, tuple[int, ...]]] = {}   # host block -> its key
        self._preempted: dict[RequestId, int] = {}   # computed tokens when preempted (stats)
        if self.host is not None and enable_prefix_caching:
            self.pool.on_evict = self._offload

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    @property
    def num_host_blocks(self) -> int:
        return self.host.num_blocks if self.host is not None else 0

    def host_usage(self) -> float:
        """Fraction of host blocks held (by swapped-out requests); 0.0 without a host tier."""
        return self.host.usage() if self.host is not None else 0.0

    def is_swapped(self, request: Request) -> bool:
        return request.request_id in self.req_to_host_blocks

    def block_ids(self, request_id: RequestId) -> list[BlockId]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """The request's chained hashes for its first `num_full_blocks` blocks (memoised)."""
        hashes = self.req_to_hashes.setdefault(request.request_id, [])
        # a salt or an adapter: blocks are shared only between requests with the same ones
        lora = request.lora_request
        extra = (request.cache_salt, lora.lora_int_id if lora else None) if request.cache_salt or lora else None
        size = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            tokens = tuple(request.token_ids_range(i * size, (i + 1) * size))
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens, extra))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request that has no blocks yet: (blocks, num_tokens),
        device blocks first, then any host-tier blocks (`on_host`) that continue it. Takes no
        references; pass the result to allocate_slots (which loads the host ones)."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size   # keep the last token to compute
        hashes = self._block_hashes(request, max_blocks)
        hits: list[KVCacheBlock] = []
        size = self.block_size
        pool = self.pool
        for i in range(max_blocks):
            block = pool.lookup(hashes[i], tuple(request.token_ids_range(i * size, (i + 1) * size)))
            if block is None:
                if pool is self.host or self.host is None:
                    break
                pool = self.host   # the device missed: go on in the host tier
                block = pool.lookup(hashes[i], tuple(request.token_ids_range(i * size, (i + 1) * size)))
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
        copied first (copy-on-write), queued in `pending_copies`. Host-tier hits among
        `new_computed_blocks`, and a swapped-out request's blocks, get fresh device blocks
        and are queued as swap-ins."""
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
        table, swapped = self._resume_table(request, blocks, new_computed_blocks)
        device_hits = [b for b in table if not b.on_host]
        loads = [b for b in table if b.on_host]
        # each block to load counts among the new blocks: it needs a device block to land in
        num_new_blocks = self.blocks_needed(num_total) - len(blocks) - len(device_hits)
        needs_copy = bool(blocks) and blocks[-1].ref_cnt > 1 and num_computed % self.block_size != 0 \
            and num_new_tokens > 0
        num_revived = sum(1 for b in device_hits if b.ref_cnt == 0)
        if max(num_new_blocks, 0) + int(needs_copy) + num_revived > self.pool.num_free_blocks:
            return False
        self._num_allocated += max(num_new_blocks, 0) + int(needs_copy)
        if needs_copy:
            src = blocks[-1]
            (dst,) = self.pool.allocate(1)
            self.pool.free([src])
            blocks[-1] = dst
            self.pending_copies.append((src.block_id, dst.block_id))
        self.pool.touch(device_hits)
        # host blocks stay held (no eviction may take them) until the step's lists are taken
        if swapped is not None:
            del self.req_to_host_blocks[request.request_id]
            self._host_reads += swapped
        elif loads:
            self.host.touch(loads)
            self._host_reads += loads
        new_blocks = self.pool.allocate(num_new_blocks) if num_new_blocks > 0 else []
        fresh = iter(new_blocks)
        for block in table:   # a host block lands in the next new block, in table order
            if block.on_host:
                dst = next(fresh)
                self._swap_in.append((block.block_id, dst.block_id))
                block = dst
            blocks.append(block)
        blocks.extend(fresh)
        if loads:
            self.stats.blocks_swapped_in += len(loads)
            if swapped is None:
                self.stats.host_hits += len(loads) * self.block_size
            self._loading.add(request.request_id)
        preempted = self._preempted.pop(request.request_id, None)
        if preempted is not None:   # resuming after a preemption
            device = min(preempted, len(device_hits) * self.block_size)
            self.stats.resumed_device_tokens += device
            self.stats.resumed_host_tokens += min(preempted, num_computed) - device
        if not loads:   # loading blocks are hashed next step, once their copies are awaited
            self._cache_full_blocks(request, blocks, num_total)
        return True

    def _resume_table(self, request: Request, blocks: list[KVCacheBlock], new_computed_blocks: list[KVCacheBlock]
                      ) -> tuple[list[KVCacheBlock], list[KVCacheBlock] | None]:
        """(the computed blocks to add, in table order: device blocks to share and host blocks
        to load; a swapped-out request's host blocks or None). For prefix hits that is
        `new_computed_blocks` (host hits are a suffix). A swapped-out request resuming shares
        each of its blocks still cached on the device (a pending reservation's block always
        is) and loads the others."""
        swapped = None if blocks else self.req_to_host_blocks.get(request.request_id)
        if swapped is None:
            return new_computed_blocks, None
        table = []
        for host_block in swapped:
            key = self._reserved.get(host_block.block_id)
            if key is None and host_block.block_hash is not None:
                key = (host_block.block_hash, host_block.token_ids)
            device = self.pool.lookup(*key) if key is not None else None
            assert device is not None or host_block.block_id not in self._reserved, "pending block lost"
            table.append(device if device is not None else host_block)
        return table, swapped

    def is_loading(self, request: Request) -> bool:
        """Blocks of the request are copied in from the host tier in this step: it may not run
        (or be a prefix hit) before the next step, whose forward waits for those copies."""
        return request.request_id in self._loading

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
        """Drop the request's device blocks, tail first (a prefix's head is evicted last)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.num_cached_blocks.pop(request.request_id, None)

    def preempt(self, request: Request, swap: bool) -> bool:
        """Free a preempted request's device blocks; with `swap`, keep its KV in the host tier
        if it has room (swap_out). True if swapped: the request keeps num_computed_tokens."""
        self._preempted[request.request_id] = request.num_computed_tokens
        self.stats.preempted_tokens += request.num_computed_tokens
        if swap and self.swap_out(request):
            return True
        self.free(request)
        return False

    def swap_out(self, request: Request) -> bool:
        """Preemption by swap: a host block for each block holding the request's computed
        tokens, then its device blocks are freed; it keeps num_computed_tokens. A full block
        the host caches (or has reserved) is shared; a hashed block, which stays in the
        device prefix cache, gets a pending reservation (written if the device evicts it);
        any other block is copied now. False, changing nothing, when the host tier cannot
        hold them (the caller recomputes instead). The request must have no work in flight
        (its blocks' KV is final)."""
        host = self.host
        num = self.blocks_needed(request.num_computed_tokens)
        if host is None or num == 0 or num > host.num_free_blocks:
            return False
        host_blocks = []
        for block in self.req_to_blocks.get(request.request_id, [])[:num]:
            key = (block.block_hash, block.token_ids)
            if block.block_hash is not None:
                held = host.lookup(*key)
                if held is None and (pending := self._pending.get(block.block_hash)) is not None \
                        and self._reserved[pending.block_id] == key:
                    held = pending
                if held is not None:
                    host.touch([held])
                    host_blocks.append(held)
                    continue
            (dst,) = host.allocate(1)
            host_blocks.append(dst)
            if block.block_hash is not None and self.pool.lookup(*key) is not None:
                self._pending[block.block_hash] = dst
                self._reserved[dst.block_id] = key
                continue
            if block.block_hash is not None:
                host.cache_block(dst, *key)
            self._queue_swap_out(block, dst)
        self.free(request)
        self.req_to_host_blocks[request.request_id] = host_blocks
        return True

    def _offload(self, block: KVCacheBlock, behind: bool = False) -> None:
        """The device pool hands out a free hashed block (or, `behind`, will soon): write it to
        the host block reserved for it, if any; else keep its KV in the host tier as a free
        (evictable) entry, unless the host has it already or has no free block."""
        if self._write_pending(block, behind):
            return
        host = self.host
        cached = host.lookup(block.block_hash, block.token_ids)
        if cached is not None:
            host.refresh(cached)
            return
        if host.num_free_blocks == 0:
            return
        (dst,) = host.allocate(1)
        host.cache_block(dst, block.block_hash, block.token_ids)
        host.free([dst])
        self._queue_swap_out(block, dst, behind)
        self.stats.blocks_offloaded += 1

    def _write_pending(self, block: KVCacheBlock, behind: bool = False) -> bool:
        """A hashed device block is about to lose its hash: if swapped-out requests reserved a
        host block for it, copy it there (which makes that a host prefix entry). True if so."""
        dst = self._pending.get(block.block_hash)
        if dst is None or self._reserved[dst.block_id] != (block.block_hash, block.token_ids):
            return False
        del self._pending[block.block_hash], self._reserved[dst.block_id]
        self.host.cache_block(dst, block.block_hash, block.token_ids)
        self._queue_swap_out(block, dst, behind)
        return True

    def _release_host(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference on each host block; a reservation nobody holds any more ends."""
        for block in blocks:
            if block.ref_cnt == 1 and (key := self._reserved.pop(block.block_id, None)) is not None:
                del self._pending[key[0]]
            self.host.free([block])

    def _queue_swap_out(self, src: KVCacheBlock, dst: KVCacheBlock, behind: bool = False) -> None:
        # a host block reallocated within the step keeps only its last writer
        self._swap_out.pop(dst.block_id, None)
        self._swap_out[dst.block_id] = (src.block_id, behind)
        self.stats.blocks_swapped_out += 1

    def take_swaps(self) -> tuple[list[tuple[BlockId, BlockId]], list[tuple[BlockId, BlockId]], int]:
        """This step's copies: (device, host) swap-outs, (host, device) swap-ins, and how many
        swap-outs (the last ones) are write-behind copies of free device blocks (module
        docstring). Releases the host blocks the swap-ins read (they stay cached in the host
        tier)."""
        self._recent_allocated.append(self._num_allocated)
        self._num_allocated = 0
        window = max(self._recent_allocated)   # a step's needs vary: prefills come in bursts
        if window and self.pool.on_evict is not None:
            for block in self.pool.peek_free(window):
                if block.block_hash is not None:
                    self._offload(block, behind=True)
        if not (self._swap_out or self._swap_in):
            return [], [], 0
        swap_out = [(device, host) for host, (device, behind) in self._swap_out.items() if not behind]
        num_behind = len(self._swap_out) - len(swap_out)
        swap_out += [(device, host) for host, (device, behind) in self._swap_out.items() if behind]
        swap_in, self._swap_in, self._swap_out = self._swap_in, [], {}
        self._loading.clear()
        if self._host_reads:
            self._release_host(list(reversed(self._host_reads)))
            self._host_reads = []
        return swap_out, swap_in, num_behind

    def drop_swapped(self, host_block_ids: set[BlockId]) -> list[RequestId]:
        """A step failed: host blocks it was to write hold no valid KV. They leave the host
        prefix cache; swapped-out requests holding one lose their host copy (returned: they
        are recomputed)."""
        if self.host is None or not host_block_ids:
            return []
        for block_id in host_block_ids:
            self.host.uncache(self.host.blocks[block_id])
        lost = [rid for rid, blocks in self.req_to_host_blocks.items()
                if any(b.block_id in host_block_ids for b in blocks)]
        for rid in lost:
            self._release_host(list(reversed(self.req_to_host_blocks.pop(rid))))
        return lost

    def uncache(self, request: Request) -> None:
        """A step with this request failed: its blocks' KV may be unwritten, so none of them
        may serve a prefix-cache hit any more (their contents stay, for current holders). A
        block a swapped-out request reserved a host block for is written there first: that
        reservation was made for valid KV (a pending hash's cached block is final)."""
        for block in self.req_to_blocks.get(request.request_id, []):
            if block.block_hash is not None and self.pool.cached.get(block.block_hash) is block:
                self._write_pending(block)
            self.pool.uncache(block)

    def forget(self, request: Request) -> None:
        """The request is finished for good: drop its memoised hashes and any host blocks too."""
        self.free(request)
        self.req_to_hashes.pop(request.request_id, None)
        self._preempted.pop(request.request_id, None)
        host_blocks = self.req_to_host_blocks.pop(request.request_id, None)
        if host_blocks:
            self._release_host(list(reversed(host_blocks)))

    def take_pending_copies(self) -> list[tuple[BlockId, BlockId]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
