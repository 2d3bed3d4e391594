"""The sparse mixture-of-experts MLP of Mixtral, Qwen2-MoE and Qwen3-MoE: a router (one linear layer, then a
float32 softmax) picks top_k of num_experts SwiGLU experts per token, their outputs are summed
with the picked probabilities (renormalised to sum to 1 where the model says so), as
transformers computes it, expert by expert in expert order; Qwen2-MoE adds a shared expert
gated by sigmoid(shared_expert_gate(x)).

Under tensor parallelism each rank holds every expert's slice of the intermediate dimension
(gate and up by rows, down by columns, as MergedColumnParallelLinear / RowParallelLinear shard
a dense MLP) and the summed output is all-reduced once. The experts run one after another on
the tokens routed to them (a host sync per layer to learn which experts were hit): no CUDA
graphs for these models (engine_args turns them off), and no fused MoE kernel yet."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.parallel import all_reduce, tp_rank, tp_world_size

# checkpoint expert projection -> (w13 half or w2, is the gate)
_GATE, _UP, _DOWN = "gate", "up", "down"


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        for size in (intermediate_size, shared_intermediate_size):
            if size % self.tp_size:
                raise ValueError(f"the experts' intermediate size {size} does not split over "
                                 f"tensor_parallel_size={self.tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.local_size = intermediate_size // self.tp_size
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype)   # the router, on every rank
        self.gate.weight.requires_grad_(False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local_size, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_size, dtype=dtype),
                               requires_grad=False)
        # Qwen2-MoE: a shared expert every token takes, scaled by sigmoid(shared_expert_gate(x))
        self.shared_local = shared_intermediate_size // self.tp_size
        if shared_intermediate_size:
            self.shared_w13 = nn.Parameter(torch.empty(2 * self.shared_local, hidden_size, dtype=dtype),
                                           requires_grad=False)
            self.shared_w2 = nn.Parameter(torch.empty(hidden_size, self.shared_local, dtype=dtype),
                                          requires_grad=False)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
            self.shared_expert_gate.weight.requires_grad_(False)

    def load_expert(self, expert: int | None, which: str, tensor: torch.Tensor) -> None:
        """One expert's gate / up ([I, H]) or down ([H, I]) projection from the checkpoint
        (expert None: the shared expert's): this rank's slice of the intermediate dimension."""
        size = self.local_size if expert is not None else self.shared_local
        w13 = self.w13.data[expert] if expert is not None else self.shared_w13.data
        w2 = self.w2.data[expert] if expert is not None else self.shared_w2.data
        start = self.tp_rank * size
        if which == _DOWN:
            w2.copy_(tensor[:, start:start + size])
        else:
            offset = 0 if which == _GATE else size
            w13[offset:offset + size].copy_(tensor[start:start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        routed = F.one_hot(experts, self.num_experts)   # [T, top_k, E]
        for expert in routed.sum(dim=(0, 1)).nonzero().flatten().tolist():
            token, slot = torch.where(routed[..., expert])
            gate, up = F.linear(x[token], self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self.shared_local:
            gate, up = F.linear(x, self.shared_w13).chunk(2, dim=-1)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * F.linear(F.silu(gate) * up, self.shared_w2)
        return all_reduce(out) if self.tp_size > 1 else out
