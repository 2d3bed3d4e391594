"""Ranks 1..N-1 as Ray actors (`distributed_executor_backend="ray"`): placed by a placement
group on an existing Ray cluster (`ray start --head` here and `ray start --address=...` on
the other machines, or RAY_ADDRESS), or on a local Ray instance when none runs. One bundle
per rank ({"GPU": 1} on CUDA, {"CPU": 1} on CPU), packed; the bundle on this machine is rank
0's, which stays this process (the engine), as with the "mp" backend.

Each actor runs tp_worker.serve_rank in a thread (a threaded actor, so it also answers
`milestones()` while it serves). A RayRank stands for one actor with RankProcess's face, so
the executor watches Ray ranks as it watches spawned processes: start-up milestones reach
rank 0 through a local pipe that a poller thread feeds, `exitcode` turns non-None when the
actor's serve call ends or the actor dies, stop() kills the actor.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from pagedserve.errors import EngineDeadError
from pagedserve.worker.rank_process import LOADED, TAIL_LINES, RankProcess

logger = logging.getLogger(__name__)

_ACTOR_DIED = -9   # exit code reported for an actor that died without returning


class _RankActor:
    """The body of one rank's Ray actor."""

    def __init__(self) -> None:
        self._milestones = b""

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        import ray
        return ray.util.get_node_ip_address()

    def gpu_id(self) -> int:
        import ray
        return int(ray.get_gpu_ids()[0])

    def milestones(self) -> bytes:
        return self._milestones

    def serve(self, init: Any) -> tuple[int, str]:
        """Run the rank until it is told to stop: (0, "") or (1, the traceback)."""
        import logging as _logging
        from pagedserve.worker.tp_worker import serve_rank
        _logging.basicConfig(level=_logging.INFO, format=f"%(levelname)s [rank {init.rank}] %(name)s: %(message)s")

        def report(milestone: bytes) -> None:
            self._milestones += milestone
        try:
            serve_rank(init, report)
            return 0, ""
        except BaseException:
            return 1, traceback.format_exc()


class RayRank(RankProcess):
    """One Ray actor rank, watched like a spawned process (see the module docstring)."""

    def __init__(self, rank: int, actor: Any, init: Any) -> None:   # no super().__init__: nothing is spawned
        import ray
        self.rank = rank
        self.milestones: set[bytes] = set()
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._actor = actor
        self._pid = ray.get(actor.pid.remote())
        self._node_ip = ray.get(actor.node_ip.remote())
        self._status_read, self._status_write = os.pipe()
        self._done = actor.serve.remote(init)
        self._code: int | None = None
        self._poller = threading.Thread(target=self._poll_milestones, name=f"pagedserve-ray-rank{rank}", daemon=True)
        self._poller.start()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def exitcode(self) -> int | None:
        if self._code is None:
            import ray
            ready, _ = ray.wait([self._done], timeout=0)
            if ready:
                try:
                    self._code, text = ray.get(self._done)
                except Exception as exc:   # RayActorError: the actor process is gone
                    self._code, text = _ACTOR_DIED, str(exc)
                self._tail.extend(text.strip().splitlines())
        return self._code

    def _poll_milestones(self) -> None:
        """Copy the actor's milestones into our pipe until it reported the last one or ended."""
        import ray
        sent = b""
        while LOADED not in sent and self.exitcode is None:
            try:
                now = ray.get(self._actor.milestones.remote(), timeout=5.0)
            except Exception:
                return
            if len(now) > len(sent):
                try:
                    os.write(self._status_write, now[len(sent):])
                except OSError:
                    return
                sent = now
            time.sleep(0.05)

    def failure(self, when: str = "") -> str:
        code = self.exitcode
        how = "died" if code == _ACTOR_DIED else f"exited with code {code}"
        text = f"rank {self.rank} (Ray actor on {self._node_ip}, pid {self.pid}) {how}{when}"
        tail = [line for line in self._tail if line.strip()]
        if tail:
            text += "; its last output:\n  " + "\n  ".join(tail[-10:])
        return text

    def stop(self, timeout: float = 5.0) -> None:
        import ray
        try:
            ray.kill(self._actor, no_restart=True)
        except Exception:
            logger.debug("killing the Ray actor of rank %d failed", self.rank, exc_info=True)
        for fd in (self._status_read, self._status_write):
            try:
                os.close(fd)
            except OSError:
                pass


def connect() -> Any:
    """The Ray cluster: the one this process is connected to, else an existing one (RAY_ADDRESS,
    or `ray start` on this machine), else a new local instance."""
    import ray
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=True)
    return ray


@dataclass
class RayPlacement:
    """The placement group of an engine; `gpu`: the GPU Ray gave rank 0 (None on CPU), held by
    `holder`, an idle actor in rank 0's bundle."""

    group: Any
    gpu: int | None = None
    holder: Any = None

    def remove(self) -> None:
        """Free the bundles (Ray ends the actors in them)."""
        import ray
        try:
            ray.util.remove_placement_group(self.group)
        except Exception:
            logger.debug("removing the placement group failed", exc_info=True)


def start_ray_ranks(init: Any, use_gpu: bool, timeout_s: float) -> tuple[list[RayRank], RayPlacement]:
    """Reserve one bundle per rank, keep this machine's for rank 0 and start ranks 1..N-1 in
    the others (init.init_method must be reachable from every node: this node's IP)."""
    ray = connect()
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    resource = "GPU" if use_gpu else "CPU"
    group = placement_group([{resource: 1}] * init.world_size, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=min(timeout_s, 60.0))
    if not ready:
        ray.util.remove_placement_group(group)
        raise EngineDeadError(f"the Ray cluster cannot place {init.world_size} ranks of one {resource} each "
                              f"(available: {ray.available_resources().get(resource, 0)} {resource})")
    here = ray.get_runtime_context().get_node_id()
    nodes = placement_group_table(group)["bundles_to_node_id"]
    local = [index for index, node in nodes.items() if node == here]
    if not local:
        ray.util.remove_placement_group(group)
        raise EngineDeadError(f"no {resource} of the Ray cluster is on this machine (rank 0 runs here); start the "
                              "engine on a machine that has one")
    rank0_bundle = local[0]
    # ranks in node order, this node first: a TP group (consecutive ranks) stays on one node
    others = sorted((index for index in nodes if index != rank0_bundle),
                    key=lambda index: (nodes[index] != here, nodes[index], index))
    # the actors import pagedserve as installed on their node (or from the PYTHONPATH their
    # raylet was started with), as ranks started by hand do
    options = dict(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0, max_concurrency=2)
    actor_class = ray.remote(_RankActor)
    placement = RayPlacement(group)
    if use_gpu:   # hold rank 0's GPU in its bundle so no actor on this machine gets it
        placement.holder = actor_class.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=rank0_bundle)).remote()
        placement.gpu = ray.get(placement.holder.gpu_id.remote())
    ranks = []
    try:
        for rank, bundle in enumerate(others, start=1):
            actor = actor_class.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=bundle)).remote()
            ranks.append(RayRank(rank, actor, _replace_rank(init, rank)))
    except BaseException:
        placement.remove()
        raise
    return ranks, placement


def node_ip() -> str:
    """This node's address as the Ray cluster knows it (where the other ranks reach rank 0)."""
    return connect().util.get_node_ip_address()


def _replace_rank(init: Any, rank: int) -> Any:
    import dataclasses
    return dataclasses.replace(init, rank=rank)
