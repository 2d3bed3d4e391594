"""One tensor- or pipeline-parallel rank: join the process group, load this rank's shard (its
slice of its pipeline stage's layers), then run every step rank 0 sends until told to stop.

Ranks 1..N-1 are either started by rank 0's MultiprocTPExecutor as `python -m
pagedserve.worker --spawned ...` processes on its machine (worker/rank_process.py:
stdin, stderr and start-up milestones) or started by hand on other machines through
torch.distributed's env:// rendezvous:

    MASTER_ADDR=<rank 0 host> MASTER_PORT=29500 WORLD_SIZE=N RANK=r python -m pagedserve.worker

Messages from rank 0, in order (the first on the gloo control group, the rest through the
StepChannel: rank 0's shared-memory queue (worker/shm_queue.py) when it made one, else the step
group: the default NCCL group on GPU, the gloo group on CPU):

    StartMessage(config, step_queue)   once, right after the group forms
    StepMessage(so) | NoopMessage() | ShutdownMessage()   until shutdown
    AddLoraMessage(lora) | RemoveLoraMessage(id)   between steps: this rank's host cache of LoRA
                                       adapters (the factors rank 0's frontend read: no rank reads
                                       an adapter's files, so none can fail on them)

Under pipeline parallelism only stage 0's ranks get the step messages by broadcast (on a gloo
group of stage 0); each rank forwards every message to its peer in the next stage, which
receives it point to point (worker/pipeline.py). The last stage answers each step when the
next message arrives (run_message).

A rank ends when told to, when its stdin reaches EOF (rank 0 died; spawned ranks), or when a collective
fails or times out (a peer died or went silent); it never outlives rank 0 for long.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.engine_io import ModelRunnerOutput, SchedulerOutput
from pagedserve.layers.custom_all_reduce import init_symm_mem_all_reduce
from pagedserve.layers.parallel import init_model_parallel, set_custom_all_reduce
from pagedserve.lora_request import LoadedLoRA
from pagedserve.worker.kv_budget import check_kv_fits, non_torch_memory, num_host_blocks, num_kv_blocks
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.pipeline import PipelineLinks
from pagedserve.worker.rank_process import JOINING, LOADED
from pagedserve.worker.shm_queue import QueueHandle, ShmMessageQueue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartMessage:
    """Everything a rank needs to build its runner (weights are read from config.weights), and
    the shared-memory step queue to attach to (None: steps come through the step group)."""

    config: EngineConfig
    step_queue: QueueHandle | None = None


@dataclass(frozen=True)
class StepMessage:
    scheduler_output: SchedulerOutput


@dataclass(frozen=True)
class NoopMessage:
    """Heartbeat: keeps an idle group inside the collective timeout."""


@dataclass(frozen=True)
class ShutdownMessage:
    pass


@dataclass(frozen=True)
class AddLoraMessage:
    lora: LoadedLoRA


@dataclass(frozen=True)
class RemoveLoraMessage:
    lora_int_id: int


Message = StartMessage | StepMessage | NoopMessage | ShutdownMessage | AddLoraMessage | RemoveLoraMessage


@dataclass(frozen=True)
class RankInit:
    """How one rank joins the group."""

    rank: int
    world_size: int
    init_method: str          # "tcp://host:port" or "env://"
    backend: str              # "gloo" (CPU) or "nccl" (GPU)
    timeout_s: float          # per collective; rank 0 sends a heartbeat more often than this


def init_distributed(init: RankInit) -> Any:
    """Join the default group (used by the parallel layers) and return a gloo group for the
    small per-step control messages (pickled objects travel over CPU even with NCCL)."""
    timeout = timedelta(seconds=init.timeout_s)
    dist.init_process_group(init.backend, init_method=init.init_method, rank=init.rank,
                            world_size=init.world_size, timeout=timeout)
    return dist.new_group(backend="gloo", timeout=timeout)


def step_group(init: RankInit, control: Any, config: EngineConfig) -> Any:
    """Where the per-step messages travel: with NCCL, the default (GPU) group, a few tens of
    microseconds (pickled bytes in a device tensor); gloo's TCP broadcast of small objects
    costs milliseconds per step. On CPU, the gloo control group. The start-up message always
    uses gloo (sent before the CUDA device is chosen). Under pipeline parallelism: a gloo
    group of stage 0's ranks (every rank creates it; the other stages get the messages point
    to point)."""
    if config.parallel.pipeline_parallel_size > 1:
        return dist.new_group(list(range(config.parallel.tensor_parallel_size)), backend="gloo",
                              timeout=timedelta(seconds=init.timeout_s))
    return None if init.backend == "nccl" else control


def setup_parallel(config: EngineConfig, rank: int, control: Any, device: torch.device) -> PipelineLinks | None:
    """The TP groups of every stage, and this rank's pipeline links (None without PP)."""
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    init_model_parallel(tp, pp)
    return PipelineLinks.of(rank, tp, pp, control, device) if pp > 1 else None


def receive_message(steps: "StepChannel", pipe: PipelineLinks | None) -> Message:
    """The next message: from rank 0's step channel on stage 0 (under PP always the broadcast
    on stage 0's group: no shared-memory queue), from the previous stage after it."""
    if pipe is None or pipe.prev is None:
        return steps.recv()
    return pipe.recv_message()


def run_message(message: Message, runner: ModelRunner, pipe: PipelineLinks | None, unsent: Any = None) -> Any:
    """Pass `message` on to the next stage, and run it if it is a step; the runner's output is
    returned. Under PP the last stage's sampling rank answers rank 0 one message late: it
    launches a step before it waits for the sampled ids of the one before (`unsent`, sent
    now), so its device goes from one micro-batch to the next while its host prepares the
    next; it returns what it has not sent yet. Rank 0 sends a NoopMessage before it waits for
    a step that no later one follows (PipelineOutput.get), so no answer is held for long."""
    if pipe is not None:
        pipe.forward_message(message)
    answers = pipe is not None and runner.is_driver
    output = None
    if isinstance(message, StepMessage):
        output = runner.execute_model(message.scheduler_output, non_block=answers)
    elif isinstance(message, AddLoraMessage):
        runner.add_lora(message.lora)
    elif isinstance(message, RemoveLoraMessage):
        runner.remove_lora(message.lora_int_id)
    answer(pipe, unsent)
    return output


def answer(pipe: PipelineLinks, unsent: Any, only_if_ready: bool = False) -> Any:
    """Send the last stage's output of a step to rank 0 (after waiting for the device, unless
    `only_if_ready`: then only if the device is done with it). Returns what is still unsent."""
    if unsent is None or only_if_ready and not (isinstance(unsent, ModelRunnerOutput) or unsent.ready()):
        return unsent
    pipe.send_output(unsent if isinstance(unsent, ModelRunnerOutput) else unsent.get())
    return None


def broadcast_message(message: Message | None, group: Any) -> Message:
    """Rank 0 sends `message`; every rank returns it (pickled: size, then bytes)."""
    box = [message if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class StepChannel:
    """Where the step messages travel after start-up: rank 0's shared-memory queue when it made
    one (every rank on its machine), else broadcast_message over the step group; a message too
    large for the queue's slot goes through the group too."""

    def __init__(self, group: Any, queue: ShmMessageQueue | None = None) -> None:
        self.group, self.queue = group, queue

    def send(self, message: Message, alive: Callable[[], None] = lambda: None, timeout_s: float = 600.0) -> None:
        """Rank 0: publish `message`. `alive` raises if a rank died (called while the queue is full)."""
        if self.queue is None:
            broadcast_message(message, self.group)
        else:
            self.queue.send(message, lambda big: broadcast_message(big, self.group), alive, timeout_s)

    def recv(self) -> Message:
        if self.queue is None:
            return broadcast_message(None, self.group)
        return self.queue.recv(lambda: broadcast_message(None, self.group))


def build_runner(config: EngineConfig, device: torch.device,
                 before_all_reduce: Callable[[], None] | None = None,
                 pipe: PipelineLinks | None = None) -> tuple[ModelRunner, int]:
    """Load this rank's shard and size its KV cache: the block count is the minimum over
    ranks, so every rank can hold every block the scheduler hands out. `before_all_reduce`
    runs between the two (rank 0 waits there for every rank's LOADED, the others report it).
    On GPUs of one machine, the custom all-reduce is set up then (collectively)."""
    baseline = non_torch_memory(device)
    runner = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.weights, device)
    runner.pipeline = pipe
    runner.load_model()
    blocks = torch.tensor([num_kv_blocks(config, runner, baseline)], dtype=torch.int64, device=device)
    if before_all_reduce is not None:
        before_all_reduce()
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
    num_blocks = int(blocks.item())
    check_kv_fits(config, num_blocks)
    parallel = config.parallel
    # Not under PP: the symmetric-memory all-reduce rendezvouses on the world group, while a
    # stage's TP group is a subgroup (layers/parallel.py); NCCL on that group takes every tensor.
    if device.type == "cuda" and parallel.custom_all_reduce_bytes > 0 and parallel.distributed_init == "spawn" \
            and parallel.pipeline_parallel_size == 1:
        # before the CUDA graphs are captured (they hold its kernels), after every rank loaded
        set_custom_all_reduce(init_symm_mem_all_reduce(device, parallel.custom_all_reduce_bytes,
                                                       parallel.custom_all_reduce_kind))
    runner.init_kv_cache(num_blocks)
    host_blocks = num_host_blocks(config, runner)
    if parallel.pipeline_parallel_size > 1:
        # a stage's blocks are as large as its layers: the scheduler's host block ids must fit
        # every stage's tier (TP ranks of one stage hold equal shards)
        count = torch.tensor([host_blocks], dtype=torch.int64, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        host_blocks = int(count.item())
    runner.init_host_cache(host_blocks)
    runner.finish_setup()
    return runner, num_blocks


def worker_device(config: EngineConfig, rank: int) -> torch.device:
    if not str(config.device.device).startswith("cuda"):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    return device


def serve_rank(init: RankInit, report: Callable[[bytes], None] = lambda milestone: None) -> None:
    """Everything a non-zero rank does, from joining the group to a clean exit. `report` tells
    rank 0 the start-up milestones (worker/rank_process.py) when rank 0 started this rank."""
    report(JOINING)
    control = init_distributed(init)
    start = broadcast_message(None, control)
    config = start.config
    device = worker_device(config, init.rank)
    pipe = setup_parallel(config, init.rank, control, device)
    runner, _ = build_runner(config, device, lambda: report(LOADED), pipe)
    queue = start.step_queue.attach(init.rank - 1) if start.step_queue is not None else None
    steps = StepChannel(step_group(init, control, config), queue)
    logger.info("rank %d/%d ready", init.rank, init.world_size)
    unsent = None   # under PP, the last stage's step not answered yet (run_message)
    while True:
        unsent = answer(pipe, unsent, only_if_ready=True)   # done already: rank 0 need not wait for a message
        message = receive_message(steps, pipe)
        output = run_message(message, runner, pipe, unsent)
        unsent = output if pipe is not None and runner.is_driver else None
        if isinstance(message, ShutdownMessage):
            break
    if pipe is not None:
        pipe.wait_sent()
    if init.backend == "nccl":
        # Seen on an H200x2 machine: tearing NCCL down at shutdown hung until killed. Rank 0
        # stops using the group right after the shutdown message; exit without the teardown.
        os._exit(0)
    dist.destroy_process_group()


def _exit_when_stdin_closes() -> None:
    """Rank 0 holds our stdin open; EOF means rank 0 is gone, so go too."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    os._exit(0)


def _run_spawned(args: argparse.Namespace) -> None:
    """A rank that rank 0 started on this machine (worker/rank_process.py)."""
    for signum in (signal.SIGINT, signal.SIGTERM):   # Ctrl-C or a group SIGTERM is rank 0's: it shuts us down
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_when_stdin_closes, daemon=True, name="parent-watch").start()
    status = os.fdopen(args.status_fd, "wb", buffering=0)

    def report(milestone: bytes) -> None:
        status.write(milestone)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [tp rank " + str(args.rank)
                        + "] %(name)s: %(message)s")
    _run_or_die(RankInit(args.rank, args.world_size, args.init_method, args.backend, args.timeout_s), report)
    # Done: leave without finalizing the interpreter, which aborted ranks (exit -6, "Fatal Python
    # error: _enter_buffered_busy") when it met the parent-watch thread inside a stdin read
    # (a 2-core machine, TP=4 on CPU: two engines in three)
    sys.stderr.flush()
    os._exit(0)


def _run_or_die(init: RankInit, report: Callable[[bytes], None] = lambda milestone: None) -> None:
    try:
        serve_rank(init, report)
    except BaseException:   # a failed rank must end, so rank 0 sees it and never waits on it
        logger.exception("tp rank %d failed", init.rank)
        sys.stderr.flush()
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    """`python -m pagedserve.worker`: one rank on another machine (env:// rendezvous), or one that
    rank 0 started (--spawned)."""
    parser = argparse.ArgumentParser(description="Run one pagedserve tensor-parallel rank (env:// rendezvous: "
                                                 "MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK).")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="must match rank 0's device kind (NCCL on cuda, gloo on cpu)")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    # set by rank 0 when it starts this rank itself (worker/rank_process.py)
    parser.add_argument("--spawned", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("--rank", int), ("--world-size", int), ("--init-method", str), ("--backend", str),
                       ("--status-fd", int)):
        parser.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spawned:
        _run_spawned(args)
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK") if k not in os.environ]
    if missing:
        parser.error(f"set {', '.join(missing)} in the environment")
    rank = int(os.environ["RANK"])
    if rank == 0:
        parser.error("RANK=0 is the server (pagedserve serve ... --tensor-parallel-size N)")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO)
    _run_or_die(RankInit(rank, int(os.environ["WORLD_SIZE"]), "env://", "nccl" if use_cuda else "gloo",
                         args.timeout_s))


if __name__ == "__main__":
    # run the canonical module, not this __main__ copy: the messages rank 0 pickles are
    # instances of pagedserve.worker.tp_worker's classes (prefer `python -m pagedserve.worker`)
    from pagedserve.worker.tp_worker import main as canonical_main
    canonical_main()
