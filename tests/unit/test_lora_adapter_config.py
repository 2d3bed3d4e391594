"""models/lora_adapter.py on adapter folders it must refuse: every adapter_config.json field it
reads is checked (type, range, patterns that compile) and every factor (a floating-point matrix
of rank >= 1), each refusal a ValidationError naming the caller's parameter and the field, never
a TypeError / re.error / ZeroDivisionError; the frontend's check (inspect_adapter) and the
runner's read (load_adapter) refuse alike. And what a good config gives: each module's scaling."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from pagedserve.errors import ValidationError
from pagedserve.models.lora_adapter import inspect_adapter, load_adapter

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = {Q: (4, 6), V: (4, 2)}   # (in, out)


def _adapter(path, config: dict | str, rank: int = 2, factors: dict | None = None) -> str:
    os.makedirs(path)
    if factors is None:
        factors = {}
        for module, (inp, out) in SHAPES.items():
            factors[f"base_model.model.{module}.lora_A.weight"] = torch.ones(rank, inp)
            factors[f"base_model.model.{module}.lora_B.weight"] = torch.ones(out, rank)
    save_file(factors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps({"peft_type": "LORA", **config}))
    return str(path)


BAD_CONFIGS = [
    ({"lora_alpha": "16"}, "lora_alpha"), ({"lora_alpha": None}, "lora_alpha"), ({"lora_alpha": True}, "lora_alpha"),
    ('{"lora_alpha": NaN}', "lora_alpha"), ('{"lora_alpha": 1e999}', "lora_alpha"),
    ('{"lora_alpha": 1' + "0" * 400 + "}", "lora_alpha"),
    ({"alpha_pattern": {"(": 4}}, "alpha_pattern"), ({"alpha_pattern": {"q_proj": "4"}}, "alpha_pattern"),
    ({"alpha_pattern": [4]}, "alpha_pattern"),
    ({"r": 0}, "r"), ({"r": "8"}, "r"), ({"r": 2.5}, "r"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"), ({"rank_pattern": {"[": 2}}, "rank_pattern"),
    ({"use_rslora": "yes"}, "use_rslora"), ({"use_dora": "false"}, "use_dora"), ({"bias": 3}, "bias"),
    ({"target_modules": 5}, "target_modules"), ({"target_modules": ["q_proj", 3]}, "target_modules"),
    ({"target_modules": "("}, "target_modules"), ({"modules_to_save": 3}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type"), ("[1, 2]", "JSON object"), ("{", "adapter_config.json"),
]


@pytest.mark.parametrize("config, words", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_config_values_are_refused_naming_the_field(tmp_path, config, words) -> None:
    path = _adapter(tmp_path / "a", config)
    for read in (inspect_adapter, load_adapter):
        with pytest.raises(ValidationError) as error:
            read(path, SHAPES, 16, "lora_path")
        assert error.value.param == "lora_path" and words in str(error.value), str(error.value)


def _pair(a_shape, b_shape, dtype=torch.float32) -> dict:
    return {f"base_model.model.{Q}.lora_A.weight": torch.zeros(a_shape, dtype=dtype),
            f"base_model.model.{Q}.lora_B.weight": torch.zeros(b_shape, dtype=dtype)}


BAD_FACTORS = [
    (_pair((0, 4), (6, 0)), "rank 0"), (_pair((2, 4, 1), (6, 2)), "not a matrix"),
    (_pair((8,), (6, 2)), "not a matrix"),
    (_pair((2, 4), (6, 2), torch.int32), "dtype"),
    ({**_pair((2, 4), (6, 2)), f"base_model.model.{Q}.lora_A.default.weight": torch.zeros(2, 4)}, "twice"),
]


@pytest.mark.parametrize("factors, words", BAD_FACTORS, ids=[str(i) for i in range(len(BAD_FACTORS))])
def test_bad_factors_are_refused(tmp_path, factors, words) -> None:
    path = _adapter(tmp_path / "a", {"r": 2, "lora_alpha": 4}, factors=factors)
    for read in (inspect_adapter, load_adapter):
        with pytest.raises(ValidationError) as error:
            read(path, SHAPES, 16)
        assert error.value.param == "lora_request" and words in str(error.value), str(error.value)


def test_scaling_from_a_good_config(tmp_path) -> None:
    """lora_alpha / r, alpha_pattern per module (a float alpha too), rsLoRA's / sqrt(r); nulls
    where PEFT writes them mean the defaults; load_adapter folds the scaling into B."""
    plain = _adapter(tmp_path / "plain", {"r": 2, "lora_alpha": 16, "alpha_pattern": {"v_proj": 3.0},
                                          "rank_pattern": {}, "target_modules": ["q_proj", "v_proj"],
                                          "modules_to_save": None, "use_rslora": False, "bias": "none"})
    info = inspect_adapter(plain, SHAPES, 16)
    assert (info.max_rank, info.modules) == (2, {Q: (2, 4, 6, 8.0), V: (2, 4, 2, 1.5)})
    info2, factors = load_adapter(plain, SHAPES, 16)
    assert info2 == info and torch.equal(factors[Q][1], torch.full((6, 2), 8.0))
    rs = _adapter(tmp_path / "rs", {"lora_alpha": 8, "use_rslora": True, "target_modules": "q_proj|v_proj"}, rank=4)
    assert inspect_adapter(rs, SHAPES, 16).modules[Q][3] == 4.0
    default = _adapter(tmp_path / "default", {"alpha_pattern": None})   # PEFT's default lora_alpha, 8
    assert inspect_adapter(default, SHAPES, 16).modules[V][3] == 4.0


def test_a_weights_file_larger_than_any_adapter_is_refused_before_it_is_read(tmp_path, monkeypatch) -> None:
    """The weights file is read whole into memory: one larger than any adapter of the model can be
    (a sparse 8 GiB file here: a load route's 36 s and ~8 GB before) is refused from its size
    alone, naming the parameter; a good file of the same adapter still loads."""
    from pagedserve.models import lora_adapter
    good = _adapter(tmp_path / "good", {"r": 2, "lora_alpha": 2})
    assert set(load_adapter(good, SHAPES, 4)[1]) == set(SHAPES)
    big = _adapter(tmp_path / "big", {"r": 2, "lora_alpha": 2})
    with open(os.path.join(big, "adapter_model.safetensors"), "r+b") as f:
        f.truncate(8 << 30)
    monkeypatch.setattr(lora_adapter, "_read", lambda *a, **k: pytest.fail("the file was read"))
    with pytest.raises(ValidationError, match="bytes, more than any adapter") as refused:
        load_adapter(big, SHAPES, 4, param="lora_path")
    assert refused.value.param == "lora_path"
