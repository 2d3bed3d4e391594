"""The TP step-message queue in shared memory (worker/shm_queue.py) and the custom all-reduce's
dispatch and fallbacks (layers/parallel.py, layers/custom_all_reduce.py), on CPU."""
from __future__ import annotations

import pytest
import torch

from pagedserve.engine_io import RequestId
from pagedserve.layers import custom_all_reduce, parallel
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import CachedRequestState
from pagedserve.worker.shm_queue import ShmMessageQueue


@pytest.fixture
def queue(monkeypatch):
    # readers live in other processes in use; here the one resource tracker must keep the writer's entry
    from multiprocessing import resource_tracker
    monkeypatch.setattr(resource_tracker, "unregister", lambda name, rtype: None)
    writer = ShmMessageQueue(num_readers=2, num_slots=2, slot_bytes=64)
    readers = [writer.handle().attach(r) for r in range(2)]
    yield writer, readers
    for reader in readers:
        reader.close()
    writer.close()


def _never(*args):
    raise AssertionError("fallback used")


def test_messages_arrive_in_order_across_slot_reuse(queue):
    writer, readers = queue
    for n in range(5):
        writer.send({"step": n}, _never)
        assert [reader.recv(_never) for reader in readers] == [{"step": n}, {"step": n}]
    assert writer.count == 5 and list(writer.acks) == [5, 5]


def test_a_message_larger_than_a_slot_goes_through_the_fallback(queue):
    writer, readers = queue
    big = list(range(100))
    sent = []
    writer.send(big, sent.append)
    assert sent == [big]
    assert readers[0].recv(lambda: "from the group") == "from the group"
    writer.send("small", _never)
    assert readers[0].recv(_never) == "small" and readers[0].count == 2   # order kept after the fallback


def test_the_writer_waits_for_the_slowest_reader_and_notices_a_dead_one(queue):
    writer, readers = queue
    writer.send(1, _never)
    writer.send(2, _never)
    for reader in readers:
        assert reader.recv(_never) == 1
    writer.send(3, _never)   # slot of message 1 is free: both read it
    assert readers[0].recv(_never) == 2

    def dead():
        raise RuntimeError("rank 2 exited")
    with pytest.raises(RuntimeError, match="rank 2 exited"):
        writer.send(4, _never, alive=dead)   # reader 1 is still on message 1: slot of 2 not free


class _Doubler:
    def __init__(self) -> None:
        self.calls = 0

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() <= 4

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return tensor * 2


def test_all_reduce_uses_the_custom_reducer_only_for_what_it_takes(monkeypatch):
    reducer = _Doubler()
    monkeypatch.setattr(parallel, "tp_world_size", lambda: 2)
    nccl = []
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda t, group=None: nccl.append(t.numel()))
    parallel.set_custom_all_reduce(reducer)
    try:
        small = torch.ones(4)
        assert parallel.all_reduce(small).tolist() == [2.0] * 4 and small.tolist() == [1.0] * 4
        large = torch.ones(8)
        assert parallel.all_reduce(large) is large
    finally:
        parallel.set_custom_all_reduce(None)
    assert reducer.calls == 1 and nccl == [8]


def test_symm_mem_all_reduce_takes_bf16_or_fp32_cuda_tensors_that_fit():
    reducer = custom_all_reduce.SymmMemAllReduce(torch.empty(1024, dtype=torch.uint8), "0")
    assert reducer.max_bytes == 1024 and reducer.probe_ok()   # torch's op raises where a peer fails
    assert not reducer.can_reduce(torch.ones(8, dtype=torch.bfloat16))   # a CPU tensor
    assert custom_all_reduce.local_support(torch.device("cpu"), 2) == "not a CUDA device"


def test_a_worker_fills_its_placeholders_when_the_scheduler_learns_their_tokens():
    # async TP: a worker keeps rank 0's placeholders; SchedulerOutputs later carry the tokens
    state = CachedRequestState(RequestId("r"), [5, 6, -1, -1], 2, SamplingParams(), [0], 3)
    state.pending_pos = 3
    state.learn_token(2, 7)   # an older placeholder (already fed on the device)
    assert state.token_ids == [5, 6, 7, -1] and state.pending_pos == 3
    state.learn_token(3, 8)   # the pending one
    assert state.token_ids == [5, 6, 7, 8] and state.pending_pos == -1
    state.learn_token(4, 9)   # lockstep: a token the worker never saw
    state.learn_token(4, 1)   # known already: kept
    assert state.token_ids == [5, 6, 7, 8, 9]


def test_no_room_for_the_queue_means_steps_through_the_process_group(monkeypatch):
    from pagedserve.worker import tp_executor

    def full(num_readers):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tp_executor, "ShmMessageQueue", full)
    assert tp_executor._make_queue(1) is None


def test_the_custom_all_reduce_kernel_is_picked_at_start_up(tiny_checkpoints, monkeypatch):
    from pagedserve.engine_args import EngineArgs
    from pagedserve.errors import ValidationError

    def kind(tp: int = 2) -> tuple[str, int]:
        config, _, _ = EngineArgs(model=tiny_checkpoints["llama"], device="cpu", skip_tokenizer_init=True,
                                  tensor_parallel_size=tp).create_config()
        return config.parallel.custom_all_reduce_kind, config.parallel.custom_all_reduce_bytes >> 10
    assert kind() == ("push", 4096) and kind(tp=1) == kind(tp=4) == ("one_shot", 1024)   # push is for two ranks
    monkeypatch.setenv("PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND", "push")
    assert kind(tp=4) == ("one_shot", 1024)   # asked for at four ranks: the one-shot op at its own size
    monkeypatch.setenv("PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND", "one_shot")
    assert kind() == ("one_shot", 1024)
    monkeypatch.setenv("PAGEDSERVE_CUSTOM_ALL_REDUCE_MAX_KB", "512")
    assert kind() == ("one_shot", 512)
    monkeypatch.setenv("PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND", "two_shot")
    with pytest.raises(ValidationError, match="PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND must be one_shot or push"):
        kind()
    monkeypatch.setenv("PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND", "push")
    monkeypatch.setenv("PAGEDSERVE_TP_STEP_QUEUE", "pipe")
    with pytest.raises(ValidationError, match="PAGEDSERVE_TP_STEP_QUEUE must be shm or broadcast"):
        kind()
