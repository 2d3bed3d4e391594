"""The one-row W4A16 hand-offs (layers/quantization/w4a16_handoff.py) through a whole model:
a W4A16 llama (dummy weights, group 128) decodes one sequence with the FMA GEMV (under
Triton's interpreter on CPU; natively, in CUDA graphs, on a GPU), its o / gate_up / down
outputs handed on in fp32, against the same launches rounding every output (fp32 model: the
two differ only in the order of the adds)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.layers.quantization import int4, w4a16_handoff

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "quant" / "ct-w4a16-asym"
PROMPT = [5, 17, 301, 42, 7, 99]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def w4a16_dir(tmp_path) -> str:
    shutil.copy(FIXTURE / "config.json", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _decode(path: str, enabled: bool, monkeypatch, qkv: bool = False) -> tuple[list[int], list[float], LLM]:
    monkeypatch.setattr(int4, "ONE_ROW_GEMV_ON_CPU", True)
    monkeypatch.setattr(w4a16_handoff, "ENABLED", enabled)
    monkeypatch.setattr(w4a16_handoff, "QKV", qkv)
    llm = LLM(model=path, device=DEVICE, dtype="float32", skip_tokenizer_init=True, load_format="dummy",
              max_model_len=64, max_logprobs=-1, num_kv_blocks=16)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=-1)
    out = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), [step[t].logprob for step, t in zip(out.logprobs, out.token_ids)], llm


@pytest.mark.parametrize("qkv", [False, True])
def test_handed_on_decode_equals_the_rounded_launches(w4a16_dir, monkeypatch, qkv):
    ids, logprobs, llm = _decode(w4a16_dir, True, monkeypatch, qkv)
    model = llm.engine.core.executor.runner.model.model
    assert model.handoff is not None
    layers = model.own_layers
    # each layer's o and gate_up hand on; the last layer's down rounds for the final norm
    assert all(layer.self_attn.o_proj.w4a16_handoff is not None for layer in layers)
    assert [layer.mlp.gate_up_proj.w4a16_handoff.shape for layer in layers] == [(1, 513)] * len(layers)
    assert [layer.mlp.down_proj.w4a16_handoff is not None for layer in layers] == [True] * (len(layers) - 1) + [False]
    qkv_views = [layer.self_attn.qkv_proj.w4a16_handoff for layer in layers]   # [q | k | v] and the squares
    assert [None if view is None else view.shape for view in qkv_views] == [(1, 257) if qkv else None] * len(layers)
    # the last decode step's sums are still in the workspace (it is zeroed before a one-row forward)
    o_out = layers[0].self_attn.o_proj.w4a16_handoff
    assert o_out.abs().sum() > 0
    llm.shutdown()
    ref_ids, ref_logprobs, ref_llm = _decode(w4a16_dir, False, monkeypatch)
    assert ref_llm.engine.core.executor.runner.model.model.handoff is None
    ref_llm.shutdown()
    assert ids == ref_ids
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
