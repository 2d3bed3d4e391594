"""Undoing a failed (or dropped) step on the scheduler's side (EngineCore._fail): its requests
are requeued to be recomputed, the suspects among them isolated (Scheduler.suspects: each is
then scheduled alone until it samples a token), and the swaps it may not have run are dropped.
"""
from __future__ import annotations

from pagedserve.core.request import RequestStatus
from pagedserve.engine_io import RequestId, SchedulerOutput

_RUNNING = RequestStatus.RUNNING


class StepRecovery:
    """Scheduler's methods for a failed step (a base of Scheduler: they work on its queues,
    block manager, LoRA slots, runner_blocks and suspects)."""

    def requeue_after_failure(self, request_ids: list[RequestId], suspects: set[RequestId],
                              max_failures: int = 2) -> list[RequestId]:
        """Undo a failed (or dropped) step for these requests: their in-flight work is
        forgotten, their blocks uncached and freed, and they wait to be recomputed (outputs
        kept), in order. Those in `suspects` are isolated afterwards. Returns the ids that
        already failed `max_failures` times: the caller fails them instead."""
        give_up, requeued = [], []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished():
                continue
            if rid in suspects:
                request.num_step_failures += 1
                if request.num_step_failures >= max_failures:
                    give_up.append(rid)
                    continue
                self.suspects.add(rid)
            request.num_unresolved_tokens = 0
            request.num_inflight_samples = 0
            if request.status == _RUNNING:
                self.running.remove(request)
                self.kv.uncache(request)
                self.kv.free(request)
                request.num_computed_tokens = 0
                request.status = RequestStatus.PREEMPTED
                if self.lora_slots is not None:
                    self.lora_slots.release(request)
                if self.runner_blocks.forget(rid):
                    self._requeued_since_last_step.add(rid)
                requeued.append(request)
        for request in reversed(requeued):
            self._enqueue(request, front=True)
        return give_up

    def drop_swaps(self, out: SchedulerOutput) -> None:
        """`out` failed (or was dropped): its copies may not have run. Requests whose host copy
        came from it are recomputed instead of swapped in; running requests whose blocks it was
        to load are recomputed too."""
        lost = self.kv.drop_swapped({host for _, host in out.blocks_to_swap_out})
        for rid in lost:
            request = self.requests.get(rid)
            if request is not None:
                request.num_computed_tokens = 0
        loaded = {device for _, device in out.blocks_to_swap_in}
        if loaded:
            owners = [r.request_id for r in self.running
                      if any(b.block_id in loaded for b in self.kv.req_to_blocks.get(r.request_id, ()))]
            self.requeue_after_failure(owners, suspects=set())
