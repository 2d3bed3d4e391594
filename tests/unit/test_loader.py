"""Model loading: safetensors (single and sharded), *.bin with a warning, GGUF file or
folder, org/name from the local Hugging Face cache only, dummy weights, dtypes, and clear
errors for what cannot be loaded."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from pagedserve import LLM, ModelLoadError, SamplingParams, ValidationError
from pagedserve.models.default_model import default_model_path
from tests.helpers import random_prompts, write_tiny_checkpoint

PROMPTS = random_prompts(3, 512, 4, 20, seed=3)


def greedy(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def tiny_llm(path: str, **kw) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", max_model_len=128, skip_tokenizer_init=True, **kw)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    return greedy(tiny_llm(tiny_checkpoints["llama"]))


def test_sharded_safetensors(tmp_path, reference):
    path = write_tiny_checkpoint(str(tmp_path / "sharded"), "llama", max_shard_size="100KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    assert greedy(tiny_llm(path)) == reference


def test_bin_weights_with_warning(tmp_path, tiny_checkpoints, reference, caplog):
    from safetensors.torch import load_file
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(os.path.join(tiny_checkpoints["llama"], "config.json"), path)
    torch.save(load_file(os.path.join(tiny_checkpoints["llama"], "model.safetensors")), path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="pagedserve.models.loader"):
        assert greedy(tiny_llm(str(path))) == reference
    assert any("safetensors is preferred" in r.message for r in caplog.records)


def test_hf_cache_org_name(tmp_path, tiny_checkpoints, reference, monkeypatch):
    from huggingface_hub import constants
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_checkpoints["llama"], snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert greedy(tiny_llm("tiny-org/tiny-llama")) == reference
    with pytest.raises(ModelLoadError) as err:
        tiny_llm("tiny-org/not-there")
    assert "local Hugging Face cache" in str(err.value) and str(tmp_path / "hub") in str(err.value)


def test_unknown_path_says_where_it_looked(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        LLM(model=str(tmp_path / "nope"), device="cpu")
    assert str(tmp_path / "nope") in str(err.value)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError) as err:
        LLM(model=str(tmp_path), device="cpu", load_format="dummy")
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in message


def test_dummy_weights_from_config_alone(tmp_path, tiny_checkpoints):
    shutil.copy(os.path.join(tiny_checkpoints["llama"], "config.json"), tmp_path)
    with pytest.raises(ModelLoadError, match="no weights found"):
        tiny_llm(str(tmp_path))
    llm = tiny_llm(str(tmp_path), load_format="dummy", seed=5)
    first = greedy(llm)
    assert all(len(t) == 8 for t in first)
    assert greedy(tiny_llm(str(tmp_path), load_format="dummy", seed=5)) == first


def test_dtypes(tiny_checkpoints):
    llm = LLM(
        model=tiny_checkpoints["llama"], device="cpu", dtype="bfloat16", max_model_len=64, skip_tokenizer_init=True)
    assert llm.engine.config.model.dtype == torch.bfloat16
    assert all(len(t) == 8 for t in greedy(llm))
    auto = LLM(model=tiny_checkpoints["llama"], device="cpu", max_model_len=64, skip_tokenizer_init=True)
    assert auto.engine.config.model.dtype == torch.float32          # "auto" on CPU
    with pytest.raises(ValidationError) as err:
        LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float8")
    assert err.value.param == "dtype"


def test_gguf_file_and_folder(tmp_path):
    path = default_model_path()
    from_file = LLM(model=path, device="cpu", max_model_len=256)
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    os.symlink(path, folder / os.path.basename(path))
    from_folder = LLM(model=str(folder), device="cpu", max_model_len=256)
    params = SamplingParams(max_tokens=6, temperature=0)
    a = from_file.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids
    b = from_folder.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b and len(a) == 6
