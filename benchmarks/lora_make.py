"""A random PEFT LoRA adapter for a model folder's config.json alone (dummy-weight benchmarks):
every attention and MLP projection of every layer at rank R, A ~ N(0, 1/in), B ~ N(0, 0.01).

    python3 benchmarks/lora_make.py MODEL_DIR OUT_DIR [RANK]"""
from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file


def make_adapter(model_dir: str, out_dir: str, rank: int = 16) -> None:
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(c["num_hidden_layers"]):
        for module, (n_in, n_out) in shapes.items():
            name = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) / n_in ** 0.5).to(torch.bfloat16)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.01).to(torch.bfloat16)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
                   "target_modules": [m.split(".")[1] for m in shapes]}, f)


if __name__ == "__main__":
    make_adapter(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 16)
