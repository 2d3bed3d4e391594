"""What the model runner holds of each request's block table, so that a step sends only the
difference: a request the runner does not know goes in full (NewRequestData), a known one as
the blocks appended since (and the one copy-on-write replaced) in CachedRequestData. Per request
it remembers (blocks sent, id of the last one)."""
from __future__ import annotations

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.engine_io import CachedRequestData, NewRequestData, RequestId


class RunnerBlocks:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.sent: dict[RequestId, tuple[int, int]] = {}

    def forget(self, rid: RequestId) -> bool:
        """The runner drops `rid` (finished, preempted, requeued); True if it held it."""
        return self.sent.pop(rid, None) is not None

    def mark_known(self, rid: RequestId) -> None:
        """The runner learned `rid`'s whole table another way (a fork copies its parent's)."""
        blocks = self.kv.req_to_blocks[rid]
        self.sent[rid] = (len(blocks), blocks[-1].block_id if blocks else -1)

    def describe(self, request: Request, num_ahead: int, num_tokens: int) -> NewRequestData | CachedRequestData:
        """`request` as this step sends it (its blocks final for the step)."""
        rid = request.request_id
        blocks = self.kv.req_to_blocks[rid]
        output_token_ids = request.output_token_ids
        sent = self.sent.get(rid)
        if sent is None:
            self.mark_known(rid)
            return NewRequestData(rid, request.all_token_ids, len(request.prompt_token_ids), request.sampling_params,
                                  [b.block_id for b in blocks], num_ahead, request.lora_slot)
        num_sent, last_sent = sent
        num_blocks = len(blocks)
        new_block_ids, replaced = [], None
        if num_sent != num_blocks or (num_sent and blocks[-1].block_id != last_sent):
            if num_sent and blocks[num_sent - 1].block_id != last_sent:   # copy-on-write moved it
                replaced = blocks[num_sent - 1].block_id
            new_block_ids = [b.block_id for b in blocks[num_sent:]]
            self.sent[rid] = (num_blocks, blocks[-1].block_id)
        return CachedRequestData(rid, new_block_ids, num_ahead, replaced, num_tokens,
                                 output_token_ids[-1] if output_token_ids else None)
