"""The Llama family: Llama 2/3 (rope_scaling "llama3", tied embeddings), Mistral, Qwen2
(QKV bias), Qwen3 (per-head q/k RMSNorm), Phi-3 / Phi-4 (fused checkpoint tensors), and
Mixtral / Qwen2-MoE / Qwen3-MoE (sparse mixture-of-experts MLPs, layers/moe.py). One implementation; the
differences are ModelConfig fields (attention_bias, qk_norm, rope_scaling, tie_word_embeddings,
moe_layers).

Inputs are one flat ragged batch: input_ids [T], positions [T]. Under pipeline parallelism a
stage builds only its decoder layers (the others are empty placeholders, so checkpoint names
keep their indices), the first stage the embedding, the last the final norm and the LM head;
a stage that is not the last returns its (hidden, residual) for the next one, which takes
them as `intermediate`."""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.config import ModelConfig
from pagedserve.layers.lora import LoraStep
from pagedserve.layers.attention import Attention
from pagedserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                      as_tensor, default_weight_loader)
from pagedserve.layers.linear_ops import norm_chain
from pagedserve.layers.moe import SparseMoE
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.parallel import is_first_stage, is_last_stage, pp_rank, pp_world_size, stage_layers
from pagedserve.layers.quantization.gguf import cpu_decode_stack, cpu_final_norm
from pagedserve.layers.quantization import (CheckpointTensor, LinearMethod, QuantizationConfig, UnquantizedLinearMethod,
                                            embedding_method, get_quantization_config)
from pagedserve.layers.rotary import RotaryEmbedding
from pagedserve.models.lora_adapter import factors_by_linear, lora_linears
from pagedserve.models.moe_names import MoeNames


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        dtype = config.dtype
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads,
                                          config.num_kv_heads, bias=config.attention_bias, dtype=dtype,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, dtype=dtype,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary = rotary
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.qk_norm = config.qk_norm
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """qkv: this layer's qkv_proj output (the decoder layer fuses the norm before it)."""
        return self.o_proj(self.attend(positions, qkv, meta))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The attention output before o_proj [T, heads * head_dim]."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = qkv.shape[0]
        unnormed = getattr(qkv, "w4a16_unnormed", None)   # a W4A16 hand-off: the norm's rsqrt still to apply
        if unnormed is not None:
            unnormed = (*unnormed, self.o_proj.params_dtype)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return self.attn(q, k, v, meta, rotary=(self.rotary, positions), unnormed=unnormed)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       dtype=config.dtype, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, dtype=config.dtype,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: gate_up_proj's output (the decoder layer fuses the norm before it)."""
        return self.down_proj.forward_silu_and_mul(gate_up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", index: int = 0) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, quant_config, f"{prefix}.self_attn")
        self.moe = index in config.moe_layers   # a sparse mixture-of-experts MLP (layers/moe.py)
        if self.moe:
            if quant_config is not None:
                raise ValueError("quantized mixture-of-experts checkpoints are not supported")
            self.mlp = SparseMoE(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                                 config.num_experts_per_tok, config.norm_topk_prob, config.dtype,
                                 config.shared_expert_intermediate_size)
        else:
            self.mlp = LlamaMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # each norm with the projection after it: one launch where a quantized layer fuses them
        qkv, residual = self.self_attn.qkv_proj.forward_normed(hidden, residual, self.input_layernorm)
        hidden = self.self_attn(positions, qkv, meta)
        if self.moe:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        gate_up, residual = self.mlp.gate_up_proj.forward_normed(hidden, residual, self.post_attention_layernorm)
        return self.mlp(gate_up), residual

    def forward_chained(self, positions: torch.Tensor, qkv: torch.Tensor, residual: torch.Tensor,
                        meta: AttentionMetadata, sums: torch.Tensor, nxt: "LlamaDecoderLayer | None"
                        ) -> torch.Tensor | None:
        """One row through this layer with its norms chained through the gemvs (LlamaModel.
        plan_norm_chain): qkv is this layer's qkv_proj output; o_proj and down_proj add into
        `residual` in place and sum its squares into sums[0] / sums[1] (zero before), which
        gate_up's and the next layer's (`nxt`) qkv prologue read. Returns that layer's qkv (None
        for the last layer)."""
        from pagedserve.layers.triton_gemv import add_gemv, rms_norm_gemv
        attn, mlp, norm = self.self_attn, self.mlp, self.post_attention_layernorm
        # o is placed while the decode attention runs (programmatic dependent launches, sm_90+)
        add_gemv(attn.attend(positions, qkv, meta), attn.o_proj.weight, residual, sums[0:1], wait_inputs=True)
        # silu(gate) * up in gate_up's epilogue: down reads I values, not 2 I through a SiLU prologue
        act = rms_norm_gemv(residual, norm.weight, norm.eps, sums[0:1], mlp.gate_up_proj.weight, silu_out=True)
        add_gemv(act, mlp.down_proj.weight, residual, sums[1:2])
        if nxt is None:
            return None
        norm = nxt.input_layernorm
        # the decode attention after it is placed as it starts (a programmatic dependent launch)
        return rms_norm_gemv(residual, norm.weight, norm.eps, sums[1:2], nxt.self_attn.qkv_proj.weight,
                             launch_dependents=True)


Intermediate = tuple[torch.Tensor, torch.Tensor]   # (hidden, residual) between pipeline stages


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.first, self.last = is_first_stage(), is_last_stage()
        self.stage = stage_layers(config.num_layers, pp_world_size(), pp_rank())
        if self.first:
            embed_method = embedding_method(quant_config, "model.embed_tokens")
            # a packed embedding also serves as the tied LM head: it is one (ParallelLMHead)
            embed_cls = ParallelLMHead if embed_method is not None else VocabParallelEmbedding
            self.embed_tokens = embed_cls(config.vocab_size, config.hidden_size, config.dtype, embed_method)
        rotary = RotaryEmbedding(config.head_dim, max(config.max_position_embeddings, config.max_model_len),
                                 config.rope_theta, config.rope_scaling_dict, config.dtype)
        self.quant_config = quant_config
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary, quant_config, f"model.layers.{i}", i)
                                    if i in self.stage else nn.Identity() for i in range(config.num_layers))
        # this stage's layers as a plain list: slicing the ModuleList per step built a new one
        # (30 add_module calls, ~150 us of a ~10 ms CPU decode step)
        self.own_layers = list(self.layers)[self.stage.start:self.stage.stop]
        if self.last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.lora = False   # LoRA adapters on (LlamaForCausalLM.enable_lora): no path that skips a linear's forward
        self.handoff: torch.Tensor | None = None   # w4a16_handoff's workspace (plan_handoffs)
        self.norm_sums: torch.Tensor | None = None   # the norm chain's fp64 sums (plan_norm_chain)

    def plan_norm_chain(self) -> None:
        """Whether a one-row forward chains its norms through the gemvs (LlamaDecoderLayer.
        forward_chained): on CUDA, one pipeline stage, no tensor parallelism (a row-parallel
        output is all-reduced before the add), a float embedding, every linear float bf16 / fp16
        without a bias. The embedded row's sum of squares and each layer's two live in one fp64
        buffer, which the embedding launch sets (triton_ops.embed_row)."""
        from pagedserve.layers import linear_ops
        from pagedserve.layers.parallel import tp_world_size
        self.norm_sums = None
        layers = self.own_layers
        if not (self.first and self.last and layers and tp_world_size() == 1
                and self.embed_tokens.quant_method is None) or any(layer.moe for layer in layers):
            return
        linears = [lin for layer in layers for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                       layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        if all(type(lin.quant_method) is UnquantizedLinearMethod and lin.bias is None
               and (lin.weight.is_cuda or linear_ops.NORM_CHAIN_ON_CPU)
               and lin.weight.dtype in (torch.bfloat16, torch.float16) and lin.weight.stride(1) == 1
               for lin in linears):
            self.norm_sums = torch.zeros(2 * len(layers) + 1, dtype=torch.float64, device=linears[0].weight.device)

    def _forward_chained(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
                         ) -> torch.Tensor:
        """One row with the norms chained through the gemvs: one launch embeds the row, sets its
        sum of squares (sums[0]) and zeroes the layers' sums; the final norm stays a norm launch."""
        from pagedserve.layers.triton_gemv import rms_norm_gemv
        from pagedserve.layers.triton_ops import embed_row
        layers, sums = self.own_layers, self.norm_sums
        residual = embed_row(input_ids, self.embed_tokens.weight, sums)
        norm, first = layers[0].input_layernorm, layers[0].self_attn.qkv_proj
        qkv = rms_norm_gemv(residual, norm.weight, norm.eps, sums[0:1], first.weight, launch_dependents=True)
        for i, layer in enumerate(layers):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            qkv = layer.forward_chained(positions, qkv, residual, meta, sums[2 * i + 1:2 * i + 3], nxt)
        return self.norm(residual)

    def plan_handoffs(self) -> None:
        """The one-row W4A16 hand-offs between this stage's linears (w4a16_handoff.py); the
        stage's last down_proj rounds its output (for the final norm or the next stage)."""
        from pagedserve.layers.quantization import w4a16_handoff
        layers = self.own_layers
        if any(layer.moe for layer in layers):   # float experts only: nothing to hand on
            self.handoff = None
            return
        self.handoff = w4a16_handoff.plan([w4a16_handoff.LayerLinears(
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj,
            down_hands_on=i + 1 < len(layers), qkv_hands_on=not layer.self_attn.qk_norm)
            for i, layer in enumerate(layers)])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        if self.norm_sums is not None and input_ids.shape[0] == 1 and norm_chain():
            return self._forward_chained(input_ids, positions, meta)
        if self.first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate
        layers, norm = self.own_layers, self.norm if self.last else None
        if self.handoff is not None and input_ids.shape[0] == 1:
            self.handoff.zero_()   # the one-row W4A16 launches add into it
        if not hidden.is_cuda and not self.lora and (out := cpu_decode_stack(layers, positions, hidden, residual, meta, norm)) is not None:
            # GGUF blocks on the CPU: an all-decode step's layers (and the final norm) in one C++ call
            return out[0] if self.last else out
        for layer in layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        if not self.last:
            return hidden, residual
        hidden, _ = (norm if hidden.is_cuda else cpu_final_norm(layers, norm))(hidden, residual)
        return hidden


# an FP8 checkpoint's per-layer KV cache scales, as the formats name them (compressed-tensors /
# llm-compressor: self_attn.k_scale; ModelOpt: self_attn.k_proj.k_scale; AutoFP8: k_proj.output_scale)
_KV_SCALE = re.compile(r"model\.layers\.(?P<layer>\d+)\.self_attn\.(?:(?:attn\.|[kv]_proj\.)?(?P<kv>[kv])_scale"
                       r"|(?P<proj>[kv])_proj\.output_scale)$")


class LlamaForCausalLM(nn.Module):
    # checkpoint suffix -> (our parameter suffix, shard id)
    stacked_params = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
                      (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]
    # a mixture-of-experts layer's checkpoint names (within model.layers.N.): the router, and
    # expert e's gate, up and down projections (Qwen3-MoE's; Mixtral's below)
    moe_router = "mlp.gate"
    moe_experts = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
    moe_shared = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
    moe_shared_gate = "mlp.shared_expert_gate"   # Qwen2-MoE's shared expert and its gate

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        quant_config = get_quantization_config(config.quantization)
        self.model = LlamaModel(config, quant_config)
        tied, first, last = config.tie_word_embeddings, self.model.first, self.model.last
        if last and tied and first and self.model.embed_tokens.quant_method is not None:
            self.lm_head = self.model.embed_tokens   # a packed embedding is its own tied head
        elif last:
            # tied on a later pipeline stage: the head holds the embedding's rows (loaded under its name)
            head_method = embedding_method(quant_config, "model.embed_tokens" if tied else "lm_head")
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, config.dtype, head_method)
            if tied and first:
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        """The last stage's final hidden states [T, H]; an earlier stage's (hidden, residual)."""
        return self.model(input_ids, positions, meta, intermediate)

    def after_weights_loaded(self) -> None:
        """Called by the loader once every linear's weights are in their kernel layout."""
        self.model.plan_handoffs()
        self.model.plan_norm_chain()

    def enable_lora(self, num_slots: int, max_rank: int, capacity: int, device: torch.device) -> None:
        """Room for `num_slots` LoRA adapters on this stage's attention and dense MLP linears
        (layers/lora.py; masks for steps of up to `capacity` tokens); the one-row paths that skip
        a linear's forward (the norm chain, the W4A16 hand-offs, the GGUF CPU decode stack) are
        off from now on."""
        model = self.model
        model.lora, model.norm_sums, model.handoff = True, None, None
        self.lora_step = LoraStep(num_slots, max_rank, capacity, device)   # the runner sets each step's slots here
        for i in model.stage:
            for linear in lora_linears(model.layers[i]).values():
                linear.enable_lora(self.lora_step, device)

    def set_lora(self, slot: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """An adapter's factors (models/lora_adapter.load_adapter: module -> (A, B scaled), the
        modules lora_module_shapes allows) into `slot` of this stage's layers."""
        for i in self.model.stage:
            by_linear = factors_by_linear(self.config, i, factors)
            for name, linear in lora_linears(self.model.layers[i]).items():
                linear.set_lora(slot, by_linear.get(name, {}), 1.0)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, H] -> [N, vocab] on rank 0 (None on other ranks)."""
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        """This stage's attention layers: its KV cache holds these only."""
        return [self.model.layers[i].self_attn.attn for i in self.model.stage]

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...] | CheckpointTensor]:
        """HF parameter name -> full (unsharded) shape: what a checkpoint of this config holds.
        Dummy weights are generated at these shapes so every TP size sees the same model.
        A linear layer's tensors are its LinearMethod's (packed weights and scales when
        quantized: CheckpointTensor carries their dtype)."""
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                              "model.norm.weight": (c.hidden_size,)}
        for i in range(c.num_layers):
            pre = f"model.layers.{i}."
            method = self._linear_methods(i)
            for name, fused, out, inp in (
                    ("self_attn.q_proj", "self_attn.qkv_proj", q, c.hidden_size),
                    ("self_attn.k_proj", "self_attn.qkv_proj", kv, c.hidden_size),
                    ("self_attn.v_proj", "self_attn.qkv_proj", kv, c.hidden_size),
                    ("self_attn.o_proj", "self_attn.o_proj", c.hidden_size, q),
                    ("mlp.gate_proj", "mlp.gate_up_proj", c.intermediate_size, c.hidden_size),
                    ("mlp.up_proj", "mlp.gate_up_proj", c.intermediate_size, c.hidden_size),
                    ("mlp.down_proj", "mlp.down_proj", c.hidden_size, c.intermediate_size)):
                if fused not in method:   # a mixture-of-experts layer's MLP: below
                    continue
                for suffix, tensor in method[fused].checkpoint_tensors(out, inp, c.dtype).items():
                    shapes[f"{pre}{name}.{suffix}"] = tensor.shape if tensor == CheckpointTensor(tensor.shape) else tensor
            shapes.update({pre + "input_layernorm.weight": (c.hidden_size,),
                           pre + "post_attention_layernorm.weight": (c.hidden_size,)})
            if c.attention_bias:
                shapes.update({pre + "self_attn.q_proj.bias": (q,), pre + "self_attn.k_proj.bias": (kv,),
                               pre + "self_attn.v_proj.bias": (kv,)})
            if c.qk_norm:
                shapes.update({pre + "self_attn.q_norm.weight": (c.head_dim,),
                               pre + "self_attn.k_norm.weight": (c.head_dim,)})
            if i in c.moe_layers:
                shapes[f"{pre}{self.moe_router}.weight"] = (c.num_experts, c.hidden_size)
                gate, up, down = self.moe_experts
                inner = c.moe_intermediate_size
                for e in range(c.num_experts):
                    shapes.update({f"{pre}{gate.format(e=e)}.weight": (inner, c.hidden_size),
                                   f"{pre}{up.format(e=e)}.weight": (inner, c.hidden_size),
                                   f"{pre}{down.format(e=e)}.weight": (c.hidden_size, inner)})
                if c.shared_expert_intermediate_size:
                    shared, (gate, up, down) = c.shared_expert_intermediate_size, self.moe_shared
                    shapes.update({f"{pre}{gate}.weight": (shared, c.hidden_size),
                                   f"{pre}{up}.weight": (shared, c.hidden_size),
                                   f"{pre}{down}.weight": (c.hidden_size, shared),
                                   f"{pre}{self.moe_shared_gate}.weight": (1, c.hidden_size)})
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        return shapes

    def _linear_methods(self, i: int) -> dict[str, LinearMethod]:
        """Layer i's linear methods by layer name: its own on this pipeline stage, else the ones
        the quantization config would give it (another stage holds it; dummy weights are still
        drawn for every layer, so every PP size sees the same model)."""
        names = ("self_attn.qkv_proj", "self_attn.o_proj") + \
            (() if i in self.config.moe_layers else ("mlp.gate_up_proj", "mlp.down_proj"))
        if i in self.model.stage:
            layer = self.model.layers[i]
            return {name: layer.get_submodule(name).quant_method for name in names}
        quant = self.model.quant_config
        return {name: (quant.get_linear_method(None, f"model.layers.{i}.{name}") if quant else None)
                or UnquantizedLinearMethod() for name in names}

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into parameters through their weight_loader.
        Returns the set of parameter names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        # a later pipeline stage holds a tied LM head without the embedding it shares
        tied_head_alone = self.config.tie_word_embeddings and self.model.last and not self.model.first
        moe = MoeNames(self) if self.config.is_moe else None
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if not name.startswith(("model.", "lm_head.")):   # a backbone's checkpoint (Qwen3-Embedding's)
                name = "model." + name
            if moe is not None and moe.load(name, tensor, params, loaded):
                continue
            if (kv_scale := _KV_SCALE.match(name)) is not None:   # an FP8 checkpoint's KV scales
                layer = self.model.layers[int(kv_scale["layer"])]
                if isinstance(layer, LlamaDecoderLayer):   # on this pipeline stage
                    kind = kv_scale["kv"] or kv_scale["proj"]
                    layer.self_attn.attn.set_kv_scales(**{f"{kind}_scale": float(as_tensor(tensor).float().max())})
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.startswith("model.embed_tokens.") and tied_head_alone:   # .weight, or .qweight (GGUF)
                name = "lm_head." + name.removeprefix("model.embed_tokens.")
            for param_suffix, ckpt_suffix, shard_id in self.stacked_params:
                if ckpt_suffix in name:
                    target = name.replace(ckpt_suffix, param_suffix)
                    param = params.get(target)
                    # None: a layer of another pipeline stage, or a checkpoint tensor the
                    # layer's method does not keep
                    if param is not None:
                        param.weight_loader(param, tensor, shard_id)
                        loaded.add(target)
                    break
            else:
                if name not in params:
                    continue
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    pass


class MixtralForCausalLM(LlamaForCausalLM):
    """Mistral's layers with a sparse mixture of experts (w1 gate, w3 up, w2 down) in every layer."""

    moe_router = "block_sparse_moe.gate"
    moe_experts = ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                   "block_sparse_moe.experts.{e}.w2")


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2's layers (QKV bias) with sparse mixture-of-experts MLPs and a gated shared expert."""


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3's layers (q/k norms) with sparse mixture-of-experts MLPs (dense where mlp_only_layers says)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 / Phi-4: Llama's layers; the checkpoint keeps q, k, v in one `qkv_proj` and gate,
    up in one `gate_up_proj`, split here into the parts Llama's loader shards per rank."""

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        parts = {"self_attn.qkv_proj.": (("self_attn.q_proj.", 0, q), ("self_attn.k_proj.", q, q + kv),
                                         ("self_attn.v_proj.", q + kv, q + 2 * kv)),
                 "mlp.gate_up_proj.": (("mlp.gate_proj.", 0, c.intermediate_size),
                                       ("mlp.up_proj.", c.intermediate_size, 2 * c.intermediate_size))}

        def split() -> Iterable[tuple[str, Any]]:
            for name, tensor in weights:
                fused = next((key for key in parts if key in name), None)
                if fused is None:
                    yield name, tensor
                    continue
                if c.quantization is not None:
                    raise ValueError(f"{name}: quantized Phi-3 checkpoints (fused qkv / gate_up) are not supported")
                for part, start, end in parts[fused]:
                    yield name.replace(fused, part), tensor[start:end]

        return super().load_weights(split())
