"""Which LoRA adapter sits in which of the device's `max_loras` slots (vLLM's max_loras: the
adapters one step can mix). A running request holds its adapter's slot; a slot no running
request holds can take another adapter, the least recently used first. A request whose adapter
finds no slot waits (the scheduler passes over it to the next one)."""
from __future__ import annotations

from collections import OrderedDict

from pagedserve.core.request import Request
from pagedserve.lora_request import LoRARequest


class LoraSlots:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slot_of: OrderedDict[int, int] = OrderedDict()   # adapter id -> slot, least recently used first
        self._holders = [0] * max_loras                        # running requests holding each slot
        self._loads: list[tuple[int, LoRARequest]] = []        # for the runner, before this step's forward

    def acquire(self, request: Request) -> bool:
        """Give `request` its adapter's slot (loading the adapter there if needed); False when
        every slot is held by requests of other adapters. Requests without one always pass."""
        lora = request.lora_request
        if lora is None or request.lora_slot >= 0:
            return True
        slot = self._slot_of.get(lora.lora_int_id)
        if slot is None:
            used = set(self._slot_of.values())
            free = [s for s in range(self.max_loras) if s not in used]
            if free:
                slot = free[0]
            else:
                idle = next((adapter for adapter, s in self._slot_of.items() if not self._holders[s]), None)
                if idle is None:
                    return False
                slot = self._slot_of.pop(idle)
            self._slot_of[lora.lora_int_id] = slot
            self._loads.append((slot, lora))
        self._slot_of.move_to_end(lora.lora_int_id)
        self._holders[slot] += 1
        request.lora_slot = slot
        return True

    def release(self, request: Request) -> None:
        """The request stops holding its slot (finished, preempted, requeued); the adapter stays
        loaded there until another needs the slot."""
        if request.lora_slot >= 0:
            self._holders[request.lora_slot] -= 1
            request.lora_slot = -1

    def take_loads(self) -> list[tuple[int, LoRARequest]]:
        loads, self._loads = self._loads, []
        return loads
