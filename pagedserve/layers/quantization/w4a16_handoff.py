"""One-row W4A16 decode: outputs handed on in fp32 instead of rounded by a fix-up.

The one-row W4A16 GEMV splits K over programs and sums the splits with fp32 atomics; a tile's
last program then waits on the adds, a counter and a read-back before it rounds and stores
the output (~three dependent L2 round trips at the end of every launch; benchmarks/QUANT.md,
session 10). Where the consumer is the next W4A16 launch's prologue, that fix-up is not
needed: the programs add into a buffer that is zero, and the consumer reads the fp32 sums as
they are. Per decoder layer:

    qkv_proj -> fp32 sums before the norm's rsqrt (and the row's sum of squares), read by the
                rotary + KV-store launch, which applies the rsqrt and writes q rounded (QKV
                switch; not with q/k norms)
    o_proj   -> fp32 hidden, read by gate_up's RMSNorm + residual prologue
    gate_up  -> fp32 sums before the norm's rsqrt (and the row's sum of squares), read by
                down's SiLU prologue, which applies the rsqrt
    down     -> fp32 hidden, read by the next layer's qkv prologue (not the stage's last layer:
                the final norm / the next pipeline stage get the rounded output)

Every buffer is a view of one fp32 workspace per model, zeroed at the start of each one-row
forward (one memset, inside the decode graph); each layer has its own views, so nothing is
reused within a forward. Only for layers whose one-row launch is the FMA GEMV and without
tensor parallelism (a row-parallel output is all-reduced in the model dtype). The outputs
are not rounded where the other path rounds them: the same arithmetic up to bf16 rounding."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ENABLED = True    # measured on an H200 (benchmarks/QUANT.md, session 12): llama-8b W4A16 b1_decode 452 -> 475 tok/s
QKV = True        # qkv_proj too, into rotary + KV store: 475 -> 487 tok/s in the same A/B


@dataclass
class LayerLinears:
    """One decoder layer's linears; `down_hands_on`: down's output goes to another layer of this
    stage (not the final norm / the next stage); `qkv_hands_on`: its attention takes an unnormed
    q / k / v (no q/k norm)."""
    qkv: nn.Module
    o: nn.Module
    gate_up: nn.Module
    down: nn.Module
    down_hands_on: bool
    qkv_hands_on: bool


def _takes(linear: nn.Module) -> bool:
    """Whether `linear`'s one-row launch is the FMA GEMV that can add into a hand-off."""
    from pagedserve.layers.quantization.int4 import ONE_ROW_GEMV_ON_CPU, Int4LinearMethod
    from pagedserve.layers.quantization.triton_w4a16_gemv import fast_gemv_fits, gemv_config
    if not isinstance(linear.quant_method, Int4LinearMethod) or getattr(linear, "bias", None) is not None:
        return False
    if linear.act_order_perm is not None or linear.g_idx is not None or getattr(linear, "tp_size", 1) != 1:
        return False
    if not (linear.qweight.is_cuda or ONE_ROW_GEMV_ON_CPU):
        return False
    k, n = linear.qweight.shape[0] * 8, linear.qweight.shape[1]
    config = gemv_config(1, k, n)
    return config is not None and not config.dot and fast_gemv_fits(k, linear.kernel_group_size, None)


def plan(layers: list[LayerLinears]) -> torch.Tensor | None:
    """Give each layer whose o / gate_up / down take it their views (`w4a16_handoff`: [1, N];
    a norm launch's, gate_up's and qkv's, [1, N + 1]) of one workspace, returned (None where no
    layer does, or ENABLED is off). The caller zeroes it before each one-row forward."""
    views: list[tuple[nn.Module, int]] = []
    for layer in layers:
        for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
            linear.w4a16_handoff = None
        if not (ENABLED and all(_takes(linear) for linear in (layer.o, layer.gate_up, layer.down))):
            continue
        if QKV and layer.qkv_hands_on and _takes(layer.qkv):
            views.append((layer.qkv, layer.qkv.qweight.shape[1] + 1))
        views += [(layer.o, layer.o.qweight.shape[1]), (layer.gate_up, layer.gate_up.qweight.shape[1] + 1)]
        if layer.down_hands_on:
            views.append((layer.down, layer.down.qweight.shape[1]))
    if not views:
        return None
    align = 32   # 128-byte aligned views
    workspace = torch.zeros(sum(-(-size // align) * align for _, size in views), dtype=torch.float32,
                            device=views[0][0].qweight.device)
    start = 0
    for linear, size in views:
        linear.w4a16_handoff = workspace[start:start + size].view(1, size)
        start += -(-size // align) * align
    return workspace
