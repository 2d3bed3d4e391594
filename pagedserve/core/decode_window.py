"""Decode windows (num_scheduler_steps > 1, vLLM V0's multi-step scheduling): one schedule runs
up to K decode steps of one token a row, and the engine thread schedules, sends and applies
outputs once per window instead of once per step.

A window runs only when nothing can happen before it ends that one step a schedule would
have acted on: the Scheduler rules out waiting requests that could join, grammars, forks,
suspects and pipeline micro-batches (Scheduler._window_may_open), and `plan_window` checks the
rows themselves: each decodes one token a step, none would pass max_model_len inside the
window, and the pool has a spare block or two a row, so no preemption. The window is never
longer than the most tokens any row still may take (a batch ending together ends with its
window). A row that may take fewer than the window's steps runs only those (its entry in the
short rows, SchedulerOutput.window_row_steps): it gets slots and in-flight counts only for
them, and the runner drops it from the window's later steps. update_from_output applies a
window's outputs one step at a time; a row that stops inside the window (a stop token or
string) drops the tokens after its stop.
"""
from __future__ import annotations

from pagedserve.core.request import Request
from pagedserve.engine_io import RequestId


def plan_window(running: list[Request], steps: int, num_free_blocks: int, block_size: int, max_model_len: int,
                max_num_batched_tokens: int) -> tuple[int, dict[RequestId, int] | None]:
    """How many decode steps this schedule runs (1: no window, else at most `steps`) over the
    running rows, and the rows that run fewer of them ({request id: steps}; None without a
    window)."""
    if not running or len(running) > max_num_batched_tokens \
            or num_free_blocks < len(running) * (1 + -(-steps // block_size)):
        return 1, None
    most, short = 1, []
    last = max_model_len + 1 - steps   # the window writes positions num_tokens - 1 ... + steps - 1
    for r in running:
        num_prompt = len(r.prompt_token_ids)
        num_tokens = num_prompt + len(r.output_token_ids) + r.num_inflight_samples
        left = r.max_tokens - (num_tokens - num_prompt)   # tokens it may still take after those
        if r.num_inflight_samples and (left <= 0 or num_tokens >= max_model_len):
            continue   # its tokens in flight end it: schedule() passes it over
        if num_tokens - r.num_computed_tokens - r.num_unresolved_tokens != 1 or num_tokens > last:
            return 1, None
        if left > most:
            most = left
        if left < steps:
            short.append((r.request_id, left))
    steps = min(steps, most)
    if steps == 1:
        return 1, None
    return steps, {rid: left for rid, left in short if left < steps}
