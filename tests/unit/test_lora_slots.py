"""LoRA slots in the scheduler (core/lora_slots.py): exact slots and loads; a request whose adapter
finds no free slot is passed over (the next one runs) and comes first once one frees; a slot no
running request holds takes the next adapter, least recently used first; the KV prefix cache keys
on the adapter (exact block ids)."""
from __future__ import annotations

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.request import RequestStatus
from pagedserve.lora_request import LoRARequest
from tests.unit.test_scheduler import B, req, run_step

A1, A2, A3 = (LoRARequest(f"a{i}", i, f"/adapters/a{i}") for i in (1, 2, 3))


def make(max_loras: int) -> Scheduler:
    return Scheduler(KVCacheManager(64, B), 8, 64, 64, max_loras=max_loras)


def with_lora(rid: str, lora: LoRARequest | None, prompt_len: int = 4, max_tokens: int = 2, start: int = 0):
    request = req(rid, prompt_len, max_tokens, start)
    request.lora_request = lora
    return request


def test_slots_loads_and_passing_over() -> None:
    s = make(2)
    for rid, lora in (("a", A1), ("b", A2), ("c", A3), ("d", None), ("e", A1)):
        s.add_request(with_lora(rid, lora, start=len(rid) * 10))
    out, _ = run_step(s)
    # c's adapter finds no slot (a and b hold both): passed over, d and e run
    assert list(out.num_scheduled_tokens) == ["a", "b", "d", "e"]
    assert out.lora_loads == [(0, A1), (1, A2)]
    assert [(n.req_id, n.lora_slot) for n in out.new_requests] == [("a", 0), ("b", 1), ("d", -1), ("e", 0)]
    assert [r.request_id for r in s.waiting] == ["c"]
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)   # slot 1 is free now
    out, _ = run_step(s)
    assert out.lora_loads == [(1, A3)] and [(n.req_id, n.lora_slot) for n in out.new_requests] == [("c", 1)]
    while s.has_unfinished():
        run_step(s)
    # every slot is idle: A2 takes the least recently used one (A1's, slot 0)
    s.add_request(with_lora("f", A2))
    out, _ = run_step(s)
    assert out.lora_loads == [(0, A2)] and out.new_requests[0].lora_slot == 0
    s.add_request(with_lora("g", A3))   # still in slot 1: no load
    out, _ = run_step(s)
    assert out.lora_loads == [] and out.new_requests[0].lora_slot == 1


def test_forks_hold_the_parents_slot_and_release_it() -> None:
    s = make(1)
    parent, child = with_lora("p-0", A1), with_lora("p-1", A1)
    s.add_request(parent, [child])
    s.add_request(with_lora("q", A2))
    out, _ = run_step(s)
    assert [f.req_id for f in out.forked_requests] == ["p-1"] and child.lora_slot == 0
    assert "q" not in out.num_scheduled_tokens   # the one slot is A1's while p's sequences run
    s.finish_requests(["p-0"], RequestStatus.FINISHED_ABORTED)
    out, _ = run_step(s)
    assert "q" not in out.num_scheduled_tokens   # the fork still holds it
    s.finish_requests(["p-1"], RequestStatus.FINISHED_ABORTED)
    out, _ = run_step(s)
    assert out.lora_loads == [(0, A2)] and out.num_scheduled_tokens == {"q": 4}


def test_prefix_cache_keys_on_the_adapter() -> None:
    s = make(2)
    for rid, lora in (("base", None), ("a1", A1)):
        s.add_request(with_lora(rid, lora, prompt_len=9, max_tokens=1))
        while s.has_unfinished():
            run_step(s)
    s.add_request(with_lora("base-again", None, prompt_len=9, max_tokens=1))
    s.add_request(with_lora("a1-again", A1, prompt_len=9, max_tokens=1))
    s.add_request(with_lora("a2", A2, prompt_len=9, max_tokens=1))
    out, _ = run_step(s)
    # two full blocks of 4 cached for each of base and A1; A2 has none of its own
    assert out.num_scheduled_tokens == {"base-again": 1, "a1-again": 1, "a2": 9}
    blocks = {n.req_id: n.block_ids for n in out.new_requests}
    assert blocks["base-again"][:2] == [0, 1] and blocks["a1-again"][:2] == [3, 4]
    assert not set(blocks["a2"]) & {0, 1, 3, 4}
