"""A launched step's sampled ids on their way to the host (model_runner.py makes them): a
pinned copy and an event; get() waits for them, fills the requests' placeholder tokens and
reports the tokens (and logprobs) in the step's ModelRunnerOutput."""
from __future__ import annotations

import torch

from pagedserve.engine_io import ModelRunnerOutput, TokenLogprobs, WindowOutput
from pagedserve.worker.input_batch import CachedRequestState


class PendingRunnerOutput:
    """A launched step whose sampled tokens are on their way to the host."""

    def __init__(self, output: ModelRunnerOutput, states: list[CachedRequestState], positions: list[int],
                 token_ids: torch.Tensor, logprobs: tuple[torch.Tensor, ...] | None,
                 event: torch.cuda.Event | None) -> None:
        self.output, self.states, self.positions = output, states, positions
        self.token_ids, self.logprobs, self.event = token_ids, logprobs, event

    def ready(self) -> bool:
        """Whether get() would return without waiting for the device."""
        return self.event is None or self.event.query()

    def get(self) -> ModelRunnerOutput:
        """Wait for the copy, fill the placeholders, and report the tokens."""
        if self.event is not None:
            self.event.synchronize()
        output = self.output
        tokens = self.token_ids.tolist()
        for state, pos, token in zip(self.states, self.positions, tokens):
            state.token_ids[pos] = token
            if state.pending_pos == pos:
                state.pending_pos = -1
        output.sampled_token_ids.update(zip([state.req_id for state in self.states], tokens))
        if self.logprobs is not None:
            _collect_logprobs(self.states, *self.logprobs, output)
        return output


class PendingWindow:
    """A launched decode window (SchedulerOutput.num_steps > 1): its steps' outputs, each on
    its way to the host."""

    def __init__(self, steps: list[PendingRunnerOutput | ModelRunnerOutput]) -> None:
        self.steps = steps

    def get(self) -> WindowOutput:
        """Wait for every step's copy; their outputs in order (each fills its placeholders)."""
        return WindowOutput([step if isinstance(step, ModelRunnerOutput) else step.get() for step in self.steps])


def to_host(tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Start a device -> pinned host copy (the caller records an event after it), into the
    first rows of `out` if given."""
    if out is not None:
        return out[:tensor.shape[0]].copy_(tensor, non_blocking=True)
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _collect_logprobs(states: list[CachedRequestState], token_ids: torch.Tensor, logprobs: torch.Tensor,
                      ranks: torch.Tensor, output: ModelRunnerOutput) -> None:
    ids, lps, ranks = token_ids.tolist(), logprobs.tolist(), ranks.tolist()
    for row, state in enumerate(states):
        k = state.sampling_params.logprobs
        if k is not None:
            output.logprobs[state.req_id] = TokenLogprobs(ids[row][:1 + k], lps[row][:1 + k], ranks[row])
