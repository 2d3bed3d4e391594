"""What crosses from the scheduler to the model runner (and, under tensor parallelism, is
broadcast to every rank): new requests in full, running ones as diffs. Small and picklable."""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.core.block_pool import BlockId
from pagedserve.core.request import RequestId
from pagedserve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must rebuild after preemption)."""

    req_id: RequestId
    token_ids: list[int]            # prompt + any output so far (after preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[BlockId]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request already in the runner's batch: only what changed."""

    req_id: RequestId
    new_block_ids: list[BlockId]
    num_computed_tokens: int
    replaced_last_block: BlockId | None = None   # copy-on-write moved the last block
    # The last sampled token, for ranks that did not sample it themselves (TP workers).
    num_tokens: int = 0
    last_token_id: int | None = None


@dataclass
class ForkedRequestData:
    """A sibling of a parallel-sampling request: shares the parent's state and blocks."""

    req_id: RequestId
    parent_req_id: RequestId
    sampling_params: SamplingParams


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    forked_requests: list[ForkedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[RequestId, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[RequestId] = field(default_factory=set)     # runner drops their state
    preempted_req_ids: set[RequestId] = field(default_factory=set)    # runner drops state, keeps RNG
    blocks_to_copy: list[tuple[BlockId, BlockId]] = field(default_factory=list)
    shutdown: bool = False

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """Per scheduled request that reached the end of its tokens: the sampled token and,
    when asked for, logprobs. Requests in the middle of a chunked prefill are absent."""

    sampled_token_ids: dict[RequestId, int] = field(default_factory=dict)
    # req_id -> (token_ids [1 + k], logprobs [1 + k], rank of the sampled token)
    logprobs: dict[RequestId, tuple[list[int], list[float], int]] = field(default_factory=dict)
    # req_id -> list over prompt positions of (token_ids, logprobs, rank of the actual token)
    prompt_logprobs: dict[RequestId, list[tuple[list[int], list[float], int]]] = field(default_factory=dict)
