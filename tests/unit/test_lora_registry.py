"""frontend/lora_registry.py's host cache (no model: reads are counted, not made): max_cpu_loras
adapters kept, least recently used dropped first but never one a live request runs with; one
dropped is read again when named; the ranks' caches (the core) get each adapter once before its
first request and drop it once it is dropped here and no request runs it."""
from __future__ import annotations

import pytest

from pagedserve.config import LoRAConfig
from pagedserve.errors import ValidationError
from pagedserve.frontend import lora_registry
from pagedserve.frontend.lora_registry import LoraRegistry
from pagedserve.lora_request import LoadedLoRA, LoRARequest


class Core:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def add_lora(self, lora: LoadedLoRA) -> None:
        self.calls.append(("add", lora.lora_int_id))

    def remove_lora(self, lora_int_id: int) -> None:
        self.calls.append(("remove", lora_int_id))


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    made: list[int] = []

    def read(self, lora_request: LoRARequest) -> LoadedLoRA:
        made.append(lora_request.lora_int_id)
        return LoadedLoRA(lora_request, {})
    monkeypatch.setattr(lora_registry.LoraRegistry, "_read", read)
    return made


def test_least_recently_used_out_unless_in_use(reads) -> None:
    registry, core = LoraRegistry(None, LoRAConfig(max_loras=1, max_cpu_loras=2)), Core()
    a, b, c = (LoRARequest(name, i, f"/adapters/{name}") for i, name in enumerate("abc", start=1))
    for lora in (a, b, c, b):
        registry.get(lora)
    assert reads == [1, 2, 3]   # a dropped (least recently used); b from the cache
    registry.install(registry.get(a), core)   # read again: c is dropped now
    registry.hold("r1", 1)
    registry.install(registry.get(b), core)
    registry.hold("r2", 2)
    assert reads == [1, 2, 3, 1] and core.calls == [("add", 1), ("add", 2)]
    assert registry.get(c).lora_int_id == 3 and reads[-1] == 3   # a and b run: all three kept while they do
    registry.release("r1", core)   # a ends: the least recently used, dropped here and from the ranks
    assert core.calls == [("add", 1), ("add", 2), ("remove", 1)]
    registry.install(registry.get(b), core)   # b's second request: the ranks have it
    registry.hold("r3", 2)
    for request_id in ("r2", "r3", "unknown"):
        registry.release(request_id, core)
    registry.get(c)
    assert core.calls == [("add", 1), ("add", 2), ("remove", 1)] and reads == [1, 2, 3, 1, 3]   # b, c kept


def test_one_id_per_adapter_and_enable_lora(reads) -> None:
    registry = LoraRegistry(None, LoRAConfig())
    registry.get(LoRARequest("a", 1, "/adapters/a"))
    with pytest.raises(ValidationError) as error:
        registry.get(LoRARequest("other", 1, "/adapters/other"))
    assert error.value.param == "lora_request" and "one id per adapter" in str(error.value)
    with pytest.raises(ValidationError) as error:
        LoraRegistry(None, None).get(LoRARequest("a", 1, "/adapters/a"))
    assert error.value.param == "lora_request" and "enable_lora" in str(error.value)
    assert LoraRegistry(None, None).get(None) is None and reads == [1]
