"""TP>1: rank 0 is this process (scheduler + its own runner); ranks 1..N-1 are processes
spawned here (or, with env:// rendezvous, started on other machines; see tp_worker.py).

    rank 0 (engine thread)                     rank r (tp_worker.serve_rank)
    execute_model(so):                         loop:
      [workers alive?]                           message = broadcast(...)
      broadcast(StepMessage(so)) ------------->  runner.execute_model(so)
      runner.execute_model(so)  <- all-reduces ->   (returns None)
      -> ModelRunnerOutput                        ShutdownMessage -> exit

A heartbeat thread broadcasts NoopMessage() when no message went out for a while, so an idle
server never trips the collective timeout on the workers; every broadcast holds `_lock`, so
messages keep one order. A dead rank is found before a step (process sentinels), during one
(the collective fails, or times out after `timeout_s`), or in check_health; from then on the
executor is dead and execute_model / check_health raise EngineDeadError.

Step messages reach ranks on this machine through a shared-memory queue (worker/shm_queue.py;
PAGEDSERVE_TP_STEP_QUEUE=broadcast, ranks started by hand or Ray actors: the step group's
collective).

Async scheduling under TP (config.device.async_scheduling: max_concurrent_batches = 2): a
step scheduled while the previous one is in flight carries no token for that previous step, so
rank 0's runner broadcasts each step's sampled ids on the device and every worker's runner feeds
them to the next step as rank 0's does (model_runner.py, `share_sampled`). Lockstep otherwise:
the workers learn each step's input tokens from the SchedulerOutput (last_token_id).

Pipeline parallelism (PP > 1; world = TP x PP, worker/pipeline.py): rank 0 runs stage 0, sends
the step on to stage 1 and returns a pending output at once, which the last stage fills; up
to PP micro-batches are in flight (max_concurrent_batches = PP; the scheduler never puts a
request in two of them, core/scheduler.py). A step that fails under PP leaves the stages out
of step: the engine is dead. Under PP the step messages take PP's own path (a broadcast on
stage 0's gloo group, then point to point), never the shared-memory queue; no custom
all-reduce and no `share_sampled` (the last stage samples and sends the output back).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.engine_io import ModelRunnerOutput, SchedulerOutput
from pagedserve.errors import EngineDeadError
from pagedserve.layers.parallel import reset_model_parallel
from pagedserve.lora_request import LoadedLoRA
from pagedserve.worker.kv_budget import resolve_device
from pagedserve.worker.pending_output import PendingRunnerOutput
from pagedserve.worker.rank_process import JOINING, LOADED, RankProcess, first_exited, wait_for_milestone
from pagedserve.worker.shm_queue import ShmMessageQueue
from pagedserve.worker.tp_worker import (AddLoraMessage, Message, NoopMessage, RankInit, RemoveLoraMessage,
                                         ShutdownMessage, StartMessage, StepChannel, StepMessage, broadcast_message,
                                         build_runner, init_distributed, setup_parallel, step_group)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class MultiprocTPExecutor:
    def __init__(self, config: EngineConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        parallel = config.parallel
        self.world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        # see the module docstring: PP micro-batches in flight, else 2 with async TP
        self.max_concurrent_batches = parallel.pipeline_parallel_size if parallel.pipeline_parallel_size > 1 \
            else 2 if config.device.async_scheduling else 1
        self.tp = parallel.tensor_parallel_size
        self.external = config.parallel.distributed_init == "env"   # ranks 1..N-1 started by hand
        self.ray = config.parallel.distributed_init == "ray"        # ranks 1..N-1 are Ray actors
        self.timeout_s = timeout_s
        self.device = resolve_device(config.device.device)
        self.processes: list[RankProcess] = []
        self.pipe = None
        self._launches = 0   # steps launched down the pipeline
        self.placement = None   # distributed_init == "ray": the Ray placement group (worker/ray_ranks.py)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dead: EngineDeadError | None = None
        self._interrupted = False   # a step was left midway (Ctrl-C): the ranks wait in its collectives
        self._closed = False
        self._last_message = time.monotonic()
        self._queue: ShmMessageQueue | None = None
        init = self._rank_init()
        try:
            if parallel.distributed_init == "ray":
                self._start_ray_ranks(init)
            elif not self.external:
                self._spawn_workers(init)
            # each start-up collective is entered only once every rank got there (rank_process.py)
            wait_for_milestone(self.processes, JOINING, timeout_s)
            self.control = init_distributed(init)
            # ranks on this machine only; under PP the steps take PP's path (worker/pipeline.py)
            if parallel.step_queue == "shm" and not self.external and not self.ray \
                    and parallel.pipeline_parallel_size == 1:
                self._queue = _make_queue(self.world_size - 1)
            broadcast_message(StartMessage(config, self._queue.handle() if self._queue else None), self.control)
            if self.device.type == "cuda":
                import torch
                torch.cuda.set_device(self.device)
            self.pipe = setup_parallel(config, 0, self.control, self.device)
            self.runner, self.num_blocks = build_runner(
                config, self.device, lambda: wait_for_milestone(self.processes, LOADED, timeout_s), self.pipe)
            self.num_host_blocks = self.runner.num_host_blocks
            self.weight_bytes = self.runner.weight_bytes   # rank 0's shard
            self.steps = StepChannel(step_group(init, self.control, config), self._queue)
        except BaseException:
            self.shutdown()
            raise
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="pagedserve-tp-heartbeat", daemon=True)
        self._heartbeat.start()
        logger.info("tensor parallel %d x pipeline parallel %d: %d ranks (%s), %d KV blocks per rank",
                    parallel.tensor_parallel_size, parallel.pipeline_parallel_size, self.world_size, init.backend,
                    self.num_blocks)

    # ---- set-up -------------------------------------------------------------------------
    def _rank_init(self) -> RankInit:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.external:   # RANK=0 and WORLD_SIZE=tensor_parallel_size: checked in engine_args
            return RankInit(0, self.world_size, "env://", backend, self.timeout_s)
        if self.ray:        # the other ranks may be on other machines: this node's cluster address
            from pagedserve.worker.ray_ranks import node_ip
            return RankInit(0, self.world_size, f"tcp://{node_ip()}:{_free_port('')}", backend, self.timeout_s)
        return RankInit(0, self.world_size, f"tcp://127.0.0.1:{_free_port()}", backend, self.timeout_s)

    def _start_ray_ranks(self, init: RankInit) -> None:
        from pagedserve.worker.ray_ranks import start_ray_ranks
        self.processes, self.placement = start_ray_ranks(init, self.device.type == "cuda", self.timeout_s)
        if self.placement.gpu is not None:
            self.device = resolve_device(f"cuda:{self.placement.gpu}")

    def _spawn_workers(self, init: RankInit) -> None:
        for rank in range(1, self.world_size):
            self.processes.append(RankProcess(rank, [
                "--rank", str(rank), "--world-size", str(init.world_size), "--init-method", init.init_method,
                "--backend", init.backend, "--timeout-s", str(init.timeout_s)]))

    # ---- per step -----------------------------------------------------------------------
    def execute_model(self, so: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | PendingRunnerOutput | PipelineOutput:
        """Runs the step on every rank; `non_block` (async scheduling): rank 0's output is
        returned pending, as UniprocExecutor's; under PP a PipelineOutput."""
        if self.pipe is not None:
            pending = self._launch_pipelined(so)
            return pending if non_block else pending.get()
        self.check_health()
        with self._lock:
            try:
                self._send(StepMessage(so))
            except Exception as exc:
                raise self._mark_dead(f"sending the step to the workers failed: {exc}") from exc
            try:
                return self.runner.execute_model(so, non_block)
            except Exception as exc:
                # a failed collective (peer died or timed out) leaves the ranks out of step
                if isinstance(exc, dist.DistError) or self._dead_worker(wait_s=0.5):
                    raise self._mark_dead(f"a collective failed: {exc}") from exc
                raise
            except BaseException:   # KeyboardInterrupt midway: no message can reach the ranks now
                self._interrupted = True
                raise

    def _launch_pipelined(self, so: SchedulerOutput) -> "PipelineOutput":
        """Send the step down the pipeline and run stage 0; the last stage answers later."""
        self.check_health()
        with self._lock:
            try:
                self._send(StepMessage(so))
                self.runner.execute_model(so)
            except Exception as exc:   # the stages are out of step now
                raise self._mark_dead(f"a pipeline step failed on rank 0: {exc}") from exc
            except BaseException:
                self._interrupted = True
                raise
            self._launches += 1
        return PipelineOutput(self, self._launches)

    def add_lora(self, lora: LoadedLoRA) -> None:
        """Every rank's host cache gets the adapter's factors, as rank 0 holds them (one message;
        a large one goes through the step group's broadcast): the ranks never read its files."""
        self._to_every_rank(AddLoraMessage(lora))
        self.runner.add_lora(lora)

    def remove_lora(self, lora_int_id: int) -> None:
        self._to_every_rank(RemoveLoraMessage(lora_int_id))
        self.runner.remove_lora(lora_int_id)

    def _to_every_rank(self, message: Message) -> None:
        """A message between steps (in step order: under the lock); one that cannot be sent
        leaves the ranks out of step, so the executor is dead."""
        self.check_health()
        with self._lock:
            try:
                self._send(message)
            except Exception as exc:
                raise self._mark_dead(f"sending {type(message).__name__} to the workers failed: {exc}") from exc
            except BaseException:
                self._interrupted = True
                raise

    def _send(self, message: Message, timeout_s: float | None = None) -> None:
        """To every rank: the step channel (stage 0, if it has other ranks), then on down the
        pipeline. `timeout_s`: at most this long waiting for room in the shared-memory queue."""
        if self.pipe is None or self.tp > 1:
            self.steps.send(message, self._raise_if_dead_worker, self.timeout_s if timeout_s is None else timeout_s)
        if self.pipe is not None:
            self.pipe.forward_message(message)
        self._last_message = time.monotonic()

    def check_health(self) -> None:
        """Raises EngineDeadError if any rank is gone (or a collective failed earlier)."""
        if self._dead is None:
            dead = self._dead_worker(wait_s=0.0)
            if dead:
                self._mark_dead(dead)
        if self._dead is not None:
            raise self._dead

    def _raise_if_dead_worker(self) -> None:
        dead = self._dead_worker(wait_s=0.0)
        if dead:
            raise RuntimeError(dead)

    def _dead_worker(self, wait_s: float) -> str | None:
        """A line naming the first spawned rank that exited (waiting up to `wait_s`), else None."""
        process = first_exited(self.processes, wait_s)
        return None if process is None else process.failure()

    def _mark_dead(self, why: str) -> EngineDeadError:
        if self._dead is None:
            # a rank killed a moment ago breaks the connection before its exit is visible
            detail = self._dead_worker(wait_s=0.5)
            self._dead = EngineDeadError(f"{why}; {detail}" if detail and detail not in why else why)
            logger.error("tensor parallel group is dead: %s", self._dead)
        return self._dead

    def _send_shutdown(self, timeout_s: float) -> None:
        """Broadcast ShutdownMessage, waiting at most `timeout_s`: a wedged rank must not hold
        rank 0's exit (spawned ranks are stopped next anyway; ranks started by hand leave when
        their next collective fails)."""
        def send() -> None:
            try:
                self._send(ShutdownMessage(), timeout_s)
            except Exception:
                logger.warning("could not send shutdown to the workers", exc_info=True)
        sender = threading.Thread(target=send, name="pagedserve-tp-shutdown", daemon=True)
        sender.start()
        sender.join(timeout_s)
        if sender.is_alive():
            logger.warning("the workers did not take the shutdown message within %.0f s", timeout_s)
            self._interrupted = True

    def _heartbeat_loop(self) -> None:
        interval = max(self.timeout_s / 4, 0.1)
        while not self._stop.wait(interval / 2):
            if self._dead is not None:
                return
            dead = self._dead_worker(wait_s=0.0)
            if dead:
                self._mark_dead(dead)
                return
            if time.monotonic() - self._last_message < interval or not self._lock.acquire(blocking=False):
                continue
            try:
                if self._dead is None and not self._closed:
                    self._send(NoopMessage())
            except Exception as exc:
                self._mark_dead(f"heartbeat to the workers failed: {exc}")
            finally:
                self._lock.release()

    # ---- tear-down ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Tell the workers to stop, reap them (killed if they do not stop), and leave
        the process group. Idempotent; safe after a rank died or a failed set-up."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._dead is None and not self._interrupted and hasattr(self, "steps") \
                and not self._dead_worker(wait_s=0.0) and self._lock.acquire(timeout=5.0):
            try:
                self._send_shutdown(timeout_s=5.0)
            finally:
                self._lock.release()
        # last stage first: under TP x PP a rank stopped before its next stage got the shutdown
        # message from it left that rank's receive failing (a traceback in every TP=2 x PP=2 log)
        for process in reversed(self.processes):
            process.stop()
        if self._queue is not None:
            self._queue.close()
        if self.placement is not None:
            self.placement.remove()
        reset_model_parallel()   # a later engine in this process starts from no groups
        if self._interrupted:
            logger.debug("a collective was left midway: the process group is left to process exit")
        elif dist.is_initialized() and dist.get_backend() == "nccl":
            # NCCL teardown hung at shutdown on an H200x2 machine (the peer already exited);
            # the group is left to process exit, so an NCCL engine is one per process.
            logger.debug("leaving the NCCL group to process exit")
        elif dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                logger.warning("destroy_process_group failed", exc_info=True)


class PipelineOutput:
    """A step launched down the pipeline; get() waits for the last stage's ModelRunnerOutput.
    Steps answer in launch order, so get() is called in that order (EngineCore does). The last
    stage answers a step when the next message reaches it (tp_worker.run_message): if no step
    was launched after this one, get() sends a NoopMessage first."""

    def __init__(self, executor: MultiprocTPExecutor, seq: int) -> None:
        self.executor, self.seq = executor, seq

    def get(self) -> ModelRunnerOutput:
        executor = self.executor
        executor.check_health()
        try:
            if executor._launches == self.seq:
                with executor._lock:
                    executor._send(NoopMessage())
            return executor.pipe.recv_output()
        except Exception as exc:
            raise executor._mark_dead(f"the last pipeline stage did not answer: {exc}") from exc
        except BaseException:
            executor._interrupted = True
            raise


def _make_queue(num_readers: int) -> ShmMessageQueue | None:
    try:
        return ShmMessageQueue(num_readers)
    except OSError as exc:   # e.g. a small /dev/shm in a container: the step group's broadcast instead
        logger.warning("no shared-memory step queue (%s): step messages go through the process group", exc)
        return None


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
