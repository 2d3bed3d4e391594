"""A mixture-of-experts checkpoint's tensor names (Mixtral, Qwen2-MoE, Qwen3-MoE): the router, the
experts' projections and the shared expert, routed to their decoder layer (models/llama.py's
load_weights; the model names its templates: moe_router, moe_experts, moe_shared, moe_shared_gate)."""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from pagedserve.layers.linear import default_weight_loader


class MoeNames:
    """Routes a mixture-of-experts checkpoint's router and expert tensors to their layer: the
    router is a plain parameter, an expert projection goes into the stacked expert weights
    (SparseMoE.load_expert); those count as loaded once every expert's three are in."""

    def __init__(self, model: nn.Module) -> None:
        layer = r"model\.layers\.(\d+)\."
        self.router = re.compile(layer + re.escape(model.moe_router) + r"\.weight$")
        self.experts = [(kind, re.compile(layer + re.escape(template).replace(r"\{e\}", r"(\d+)") + r"\.weight$"))
                        for kind, template in zip(("gate", "up", "down"), model.moe_experts)]
        self.shared = [(kind, re.compile(layer + re.escape(name) + r"\.weight$"))
                       for kind, name in zip(("gate", "up", "down"), model.moe_shared)]
        self.shared_gate = re.compile(layer + re.escape(model.moe_shared_gate) + r"\.weight$")
        self.layers = model.model.layers
        self.count: dict[int, int] = {}
        self.needed = 3 * model.config.num_experts + (3 if model.config.shared_expert_intermediate_size else 0)

    def load(self, name: str, tensor: Any, params: dict[str, nn.Parameter], loaded: set[str]) -> bool:
        for pattern, target in ((self.router, "mlp.gate.weight"), (self.shared_gate, "mlp.shared_expert_gate.weight")):
            match = pattern.match(name)
            if match:
                target = f"model.layers.{match.group(1)}.{target}"
                if target in params:
                    default_weight_loader(params[target], tensor)
                    loaded.add(target)
                return True
        for kind, pattern in self.experts + self.shared:
            match = pattern.match(name)
            if match:
                index = int(match.group(1))
                expert = int(match.group(2)) if pattern.groups == 2 else None   # None: the shared expert
                layer = self.layers[index]
                if not isinstance(layer, nn.Identity):   # on this pipeline stage
                    layer.mlp.load_expert(expert, kind, tensor)   # it slices its rank's part (lazily, from a file)
                    self.count[index] = self.count.get(index, 0) + 1
                    if self.count[index] == self.needed:
                        loaded.update(f"model.layers.{index}.mlp.{p}" for p in ("w13", "w2", "shared_w13", "shared_w2")
                                      if f"model.layers.{index}.mlp.{p}" in params)
                return True
        return False
