"""A llama config.json read as plain JSON (models/loader.plain_config, which keeps transformers
out of start-up) gives exactly the ModelConfig that transformers' AutoConfig gives, for the
shapes llama configs come in; any other config still goes through AutoConfig."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from pagedserve.config import ModelConfig, resolve_dtype
from pagedserve.models.loader import ModelSource, load_hf_config, plain_config

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1000, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

LLAMA_CONFIGS = {
    # ../shared/bench/peers.py's make_model_dir
    "peers": dict(BASE, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                  hidden_act="silu", torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False),
    # Llama-3.1: llama3 rope scaling, several eos ids, explicit head_dim
    "llama31": dict(BASE, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    bos_token_id=128000, eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16"),
    # the bare minimum: every other key takes transformers' default
    "minimal": dict(BASE),
    # Llama-2 era: linear scaling spelled with "type", float16, tied embeddings, biases, no eos
    "llama2": dict(BASE, rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="float16",
                   tie_word_embeddings=True, attention_bias=True, eos_token_id=None),
    # transformers 5 spelling
    "rope_parameters": dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
                            dtype="bfloat16", max_position_embeddings=8192),
}


def write(tmp_path: Path, cfg: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_plain_llama_config_matches_autoconfig(tmp_path, name) -> None:
    directory = write(tmp_path, LLAMA_CONFIGS[name])
    plain, hf = plain_config(directory), AutoConfig.from_pretrained(directory)
    assert plain is not None and load_hf_config(ModelSource(directory)) is not None
    for max_model_len in (None, 64):
        assert ModelConfig.from_hf(plain, torch.float32, max_model_len) == \
            ModelConfig.from_hf(hf, torch.float32, max_model_len)

    def config_dtype(c):
        return getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
    assert resolve_dtype("auto", config_dtype(plain), "cuda") == resolve_dtype("auto", config_dtype(hf), "cuda")


@pytest.mark.parametrize("cfg", [dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
                                 dict(BASE, auto_map={"AutoConfig": "custom.Config"}),
                                 dict(BASE, model_type="mistral", architectures=["MistralForCausalLM"])])
def test_other_configs_go_through_transformers(tmp_path, cfg) -> None:
    directory = write(tmp_path, cfg)
    assert plain_config(directory) is None
    if "auto_map" not in cfg:
        assert type(load_hf_config(ModelSource(directory))).__module__.startswith("transformers")


def test_unreadable_config_is_not_plain(tmp_path) -> None:
    assert plain_config(str(tmp_path)) is None   # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert plain_config(str(tmp_path)) is None


def test_dummy_engine_start_imports_no_transformers(tmp_path) -> None:
    """The start-up of peers.py's benchmark (dummy weights, no tokenizer) never imports transformers."""
    directory = write(tmp_path, LLAMA_CONFIGS["peers"])
    code = ("import sys; from pagedserve import LLM; "
            f"llm = LLM(model={directory!r}, load_format='dummy', skip_tokenizer_init=True, device='cpu', "
            "max_model_len=64, num_kv_blocks=8); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
