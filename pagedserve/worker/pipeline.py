"""Pipeline parallelism: what travels between stages, point to point (torch.distributed
isend / recv), so that no stage waits for a later one.

    stage 0 (rank 0 = the engine, and its TP peers)     stage s > 0 (rank r gets from r - tp)
      message = the step (broadcast in stage 0's TP group)  message <- rank r - tp
      message -> rank r + tp                                 message -> rank r + tp (not the last)
      embed + its layers -> (hidden, residual) -> r + tp     (hidden, residual) <- r - tp; its layers
                                                             last stage, TP rank 0: sample;
      PendingPipelineOutput.get() <------------------------- ModelRunnerOutput -> rank 0

Messages and outputs are pickled into byte tensors on the gloo group (CPU); hidden states go
on the default group (NCCL on GPU, gloo on CPU). Every channel is one pair of ranks, in order,
and data only flows forward on NCCL (outputs return over gloo), so a stage never waits for a
later one: rank 0 launches the next micro-batch while the last stage computes this one. The
last stage answers a step after it launched the next message (tp_worker.run_message; rank 0
sends a NoopMessage when no step follows the one it waits for). Sends are isend: their buffers
are kept until the transfer completed.
"""
from __future__ import annotations

import pickle
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pagedserve.engine_io import ModelRunnerOutput


MAX_UNFINISHED_SENDS = 64   # per group; older sends are waited for (see PipelineLinks._isend)


@dataclass
class PipelineLinks:
    """This rank's neighbours: `prev` / `next` (None at the ends) and, on the last stage's TP
    rank 0 and on rank 0, `output_peer` (where sampled tokens go / come from)."""

    prev: int | None
    next: int | None
    output_peer: int | None
    objects: Any                 # gloo group for pickled messages and outputs
    tensors: Any                 # group for hidden states (None: the default group)
    device: torch.device

    def __post_init__(self) -> None:
        # per group (gloo objects, NCCL tensors): (work, its tensors) of each send not known to be done, oldest first
        self._sending: dict[int, deque[tuple[Any, tuple[torch.Tensor, ...]]]] = {}

    @staticmethod
    def of(rank: int, tp: int, pp: int, objects: Any, device: torch.device) -> "PipelineLinks":
        stage = rank // tp
        last_driver = (pp - 1) * tp
        peer = last_driver if rank == 0 else 0 if rank == last_driver else None
        return PipelineLinks(rank - tp if stage > 0 else None, rank + tp if stage < pp - 1 else None, peer,
                             objects, None, device)

    # ---- objects: step messages forward, outputs back to rank 0 ------------------------------
    def forward_message(self, message: Any) -> None:
        if self.next is not None:
            self._send_object(message, self.next)

    def recv_message(self) -> Any:
        return self._recv_object(self.prev)

    def send_output(self, output: ModelRunnerOutput) -> None:
        self._send_object(output, self.output_peer)

    def recv_output(self) -> ModelRunnerOutput:
        return self._recv_object(self.output_peer)

    def _send_object(self, obj: Any, dst: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        self._isend((size, data), dst, self.objects)

    def _recv_object(self, src: int) -> Any:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src, group=self.objects)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, src=src, group=self.objects)
        return pickle.loads(data.numpy().tobytes())

    # ---- hidden states forward --------------------------------------------------------------
    def send_intermediate(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        self._isend((hidden.contiguous(), residual.contiguous()), self.next, self.tensors)

    def recv_intermediate(self, num_tokens: int, hidden_size: int, dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.empty((num_tokens, hidden_size), dtype=dtype, device=self.device)
        residual = torch.empty_like(hidden)
        self.recv_into(hidden, residual)
        return hidden, residual

    def recv_into(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """The previous stage's rows into these (contiguous) tensors: a CUDA graph's static
        inputs, or fresh ones. On NCCL the current stream waits, not the host (gloo: the host)."""
        for tensor in (hidden, residual):
            dist.recv(tensor, src=self.prev, group=self.tensors)

    def _isend(self, tensors: tuple[torch.Tensor, ...], dst: int, group: Any) -> None:
        sending = self._sending.setdefault(id(group), deque())
        # NCCL sends report completion; gloo ones only to wait(), which returns once the peer has
        # received (long since for all but the newest few: at most PP steps are in flight)
        while sending:
            work = sending[0][0]
            if not work.is_completed():
                if len(sending) + len(tensors) <= MAX_UNFINISHED_SENDS:
                    break
                work.wait()
            sending.popleft()
        for tensor in tensors:
            sending.append((dist.isend(tensor, dst=dst, group=group), tensors))

    def wait_sent(self, timeout_s: float = 5.0) -> None:
        """Before leaving the group: wait up to `timeout_s` for the sends to leave this rank (an
        output rank 0 never asked for, at shutdown, may never leave)."""
        deadline = time.monotonic() + timeout_s
        sending = deque(entry for group in self._sending.values() for entry in group)
        self._sending.clear()
        while sending:
            work = sending.popleft()[0]
            try:
                work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.01)))
            except Exception:
                return
