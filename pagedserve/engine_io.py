"""The core <-> worker contract: what the scheduler hands the model runner each step, what
comes back, and the Executor interface the core drives. A leaf module: it belongs to neither
package and imports nothing of pagedserve but the sampling parameters the runner needs (and
LoadedLoRA, the adapters' factors that Executor.add_lora hands the ranks).

Everything here is small and picklable: under tensor parallelism a SchedulerOutput is
broadcast to every rank. New requests travel in full, running ones as diffs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, NewType, Protocol, runtime_checkable

from pagedserve.lora_request import LoadedLoRA
from pagedserve.sampling_params import SamplingParams

RequestId = NewType("RequestId", str)
BlockId = NewType("BlockId", int)


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen (or must rebuild after preemption)."""

    req_id: RequestId
    token_ids: list[int]            # prompt + any output so far (after preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[BlockId]
    num_computed_tokens: int
    lora_slot: int = -1             # its LoRA adapter's device slot; -1: the base model


@dataclass(slots=True)
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
    # Structured outputs: the sampling rows with a grammar this step, and their token bitmask
    # (an int32 CPU tensor [len(structured_req_ids), ceil(vocab / 32)], row i for id i; a set
    # bit allows the token). None with rows named: the mask is deferred (async scheduling):
    # execute_model(so, non_block=True) returns a DeferredSampling, sampled once it arrives.
    structured_req_ids: list[RequestId] = field(default_factory=list)
    grammar_bitmask: Any | None = None
    # The host tier (core/kv_cache_manager.py): (device block, host block) copies out and
    # (host block, device block) copies in. The runner applies them in that order, before
    # copy-on-write and the forward; each list's destinations are distinct.
    blocks_to_swap_out: list[tuple[BlockId, BlockId]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[BlockId, BlockId]] = field(default_factory=list)
    # the last `num_swap_out_behind` swap-outs copy free device blocks (write-behind): they
    # run after the swap-ins; this step's forward need not wait for them, the next one does
    num_swap_out_behind: int = 0
    # LoRA adapters (LoRARequest) to copy into device slots before this step's forward, from the
    # ranks' host caches (Executor.add_lora put them there)
    lora_loads: list[tuple[int, Any]] = field(default_factory=list)
    # A decode window (core/decode_window.py): the runner runs this many steps of one token a row,
    # each fed the last one's samples on the device; the sampled tokens come back per step.
    # Rows that reach their max_tokens sooner run only their first `window_row_steps[id]` steps.
    num_steps: int = 1
    window_row_steps: dict[RequestId, int] | None = None

    @property
    def has_work(self) -> bool:
        """Anything for the runner to do: tokens to compute, state to drop, or blocks to copy."""
        return bool(self.total_num_scheduled_tokens or self.finished_req_ids or self.preempted_req_ids
                    or self.blocks_to_swap_out or self.blocks_to_swap_in or self.lora_loads)


class TokenLogprobs(NamedTuple):
    """Logprobs at one position: the chosen token first, then the top-k (token_ids and
    logprobs have 1 + k entries); `rank` is the chosen token's rank in the distribution
    (1 = most likely)."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int


@dataclass
class ModelRunnerOutput:
    """Per scheduled request that reached the end of its tokens: the sampled token and,
    when asked for, logprobs. Requests in the middle of a chunked prefill are absent."""

    sampled_token_ids: dict[RequestId, int] = field(default_factory=dict)
    logprobs: dict[RequestId, TokenLogprobs] = field(default_factory=dict)
    # one entry per prompt position that got logprobs this step (the actual next token first)
    prompt_logprobs: dict[RequestId, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class WindowOutput:
    """A decode window's outputs (SchedulerOutput.num_steps > 1): one ModelRunnerOutput a
    step, in order; the core applies them one after the other."""

    steps: list[ModelRunnerOutput]


class PendingOutput(Protocol):
    """A launched step (or decode window) whose output is on its way to the host."""

    def get(self) -> ModelRunnerOutput | WindowOutput: ...


@runtime_checkable
class DeferredSampling(Protocol):
    """A launched step whose forward pass is queued on the device and whose sampling waits
    for the grammar bitmask of its constrained rows (the deferred SchedulerOutput.grammar_bitmask).
    `sample(bitmask, sampled_ids)` queues the sampling (and, if given, a copy of the sampled
    ids, one per sampled row, into the int64 CPU tensor `sampled_ids`, landing there
    asynchronously; `grammar_rows[i]`: the row of structured_req_ids[i], -1 if not sampled);
    `get()` without it samples the rows unmasked (only for a step whose results are dropped)."""

    grammar_rows: list[int]

    def sample(self, grammar_bitmask: Any, sampled_ids: Any = None) -> PendingOutput: ...

    def get(self) -> ModelRunnerOutput: ...


@runtime_checkable
class Executor(Protocol):
    """What the core drives. `num_blocks` KV blocks exist on every rank, and `num_host_blocks`
    host-tier blocks (0: none; an executor without the attribute has none).

    execute_model(so, non_block=False) runs one step and returns its ModelRunnerOutput (so.num_steps
    > 1: a WindowOutput; only a one-process executor gets such a step); with
    non_block=True it may return a PendingOutput at once (resolved by `.get()`), or a
    DeferredSampling when the step's grammar bitmask is deferred, which the core only asks for
    when `max_concurrent_batches` > 1 (async scheduling)."""

    num_blocks: int
    max_concurrent_batches: int
    num_host_blocks: int

    def execute_model(self, so: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | WindowOutput | PendingOutput | DeferredSampling: ...

    def check_health(self) -> None:
        """Raise EngineDeadError if the executor can no longer run steps."""

    def add_lora(self, lora: LoadedLoRA) -> None:
        """Every rank's host cache keeps this adapter's factors (already read and checked), for
        the steps that copy it into a device slot (SchedulerOutput.lora_loads)."""

    def remove_lora(self, lora_int_id: int) -> None:
        """Every rank drops that adapter's host copy (unknown ids are ignored)."""

    def shutdown(self) -> None: ...
