"""Engine-side hardening (issue 16): load errors in one line, max_model_len against the
model's positions, n / best_of against max_num_seqs (validation and admission), logprobs
against max_logprobs whatever else is missing, a request's chat template under bounds,
and executor liveness."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from pagedserve import LLM, ModelLoadError, SamplingParams, ValidationError
from pagedserve.frontend.input_processor import InputProcessor
from tests.unit.test_scheduler import make, req


def _copy_config(src: str, dst) -> str:
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst)
    return str(dst)


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", max_model_len=128, skip_tokenizer_init=True, **kw)


def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, tiny_checkpoints):
    path = _copy_config(tiny_checkpoints["llama"], tmp_path / "trunc")
    data = open(os.path.join(tiny_checkpoints["llama"], "model.safetensors"), "rb").read()
    open(os.path.join(path, "model.safetensors"), "wb").write(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        _llm(path)
    message = str(err.value)
    assert "model.safetensors" in message and "truncated" in message and "\n" not in message


def test_truncated_bin_is_one_line_naming_the_file(tmp_path, tiny_checkpoints):
    from safetensors.torch import load_file
    path = _copy_config(tiny_checkpoints["llama"], tmp_path / "bin")
    full = tmp_path / "full.bin"
    torch.save(load_file(os.path.join(tiny_checkpoints["llama"], "model.safetensors")), full)
    data = full.read_bytes()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError) as err:
        _llm(path)
    assert "pytorch_model.bin" in str(err.value) and "\n" not in str(err.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_malicious_pickle_is_refused_in_one_line(tmp_path, tiny_checkpoints, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _copy_config(tiny_checkpoints["llama"], tmp_path / "evil")
    torch.save({"model.embed_tokens.weight": _Payload()}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ModelLoadError) as err:
        _llm(path)
    assert "pytorch_model.bin" in str(err.value) and "malicious" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_cli_load_error_exits_2_with_one_line(tmp_path, tiny_checkpoints):
    path = _copy_config(tiny_checkpoints["llama"], tmp_path / "cli")
    open(os.path.join(path, "model.safetensors"), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    done = subprocess.run([sys.executable, "-m", "pagedserve.cli", "generate", "hi", "--model", path, "--device", "cpu",
                           "--skip-tokenizer-init", "--max-model-len", "64"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.safetensors" in done.stderr and "Traceback" not in done.stderr


def test_max_model_len_beyond_positions_is_refused_unless_allowed(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    import json
    positions = json.load(open(os.path.join(path, "config.json")))["max_position_embeddings"]
    with pytest.raises(ValidationError) as err:
        LLM(model=path, device="cpu", dtype="float32", max_model_len=positions * 2, skip_tokenizer_init=True)
    assert err.value.param == "max_model_len"
    assert str(positions * 2) in str(err.value) and f"max_position_embeddings={positions}" in str(err.value)
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=positions * 2, skip_tokenizer_init=True,
              allow_long_max_model_len=True, num_kv_blocks=64, block_size=16)
    assert llm.engine.max_model_len == positions * 2


def _processor(**kw) -> InputProcessor:
    return InputProcessor(None, vocab_size=100, max_model_len=64, eos_token_ids=(0,), **kw)


@pytest.mark.parametrize("params, field", [
    (SamplingParams(max_tokens=None, logprobs=50), "logprobs"),
    (SamplingParams(max_tokens=None, prompt_logprobs=50), "prompt_logprobs"),
    (SamplingParams(max_tokens=None, logprobs=-1), "logprobs"),            # the whole vocabulary (100) > 20
    (SamplingParams(max_tokens=None, logit_bias={100: 1.0}), "logit_bias"),
    (SamplingParams(max_tokens=None, stop_token_ids=[5000]), "stop_token_ids"),
    (SamplingParams(max_tokens=None, n=9), "n"),
    (SamplingParams(max_tokens=None, n=2, best_of=30000), "best_of"),
])
def test_every_check_runs_without_max_tokens(params, field):
    with pytest.raises(ValidationError) as err:
        _processor(max_num_seqs=8).check_params(params, num_prompt_tokens=4)
    assert err.value.param == field


def test_whole_vocabulary_logprobs_when_the_cap_allows():
    processor = _processor(max_logprobs=-1)
    assert processor.check_params(SamplingParams(max_tokens=None, logprobs=-1, prompt_logprobs=-1), 4) == 60
    resolved = processor.resolve_params(SamplingParams(logprobs=-1, prompt_logprobs=-1))
    assert (resolved.logprobs, resolved.prompt_logprobs) == (100, 100)
    assert processor.check_params(SamplingParams(logprobs=100), 4) == 16


def test_seeds_of_forks_stay_in_torch_range():
    parent, forks = _processor().make_requests("r", _prompt(), SamplingParams(n=3, seed=2**64 - 1))
    seeds = [parent.sampling_params.seed] + [f.sampling_params.seed for f in forks]
    assert seeds == [2**64 - 1, 0, 1]
    for seed in seeds:
        torch.Generator().manual_seed(seed)


def _prompt():
    from pagedserve.frontend.input_processor import ProcessedPrompt
    return ProcessedPrompt(None, [1, 2, 3])


def test_parallel_samples_count_against_max_num_seqs():
    s = make(max_seqs=4)
    s.add_request(req("a", 4))
    first = s.schedule()
    assert set(first.num_scheduled_tokens) == {"a"}
    parent = req("p", 4, start=20)
    forks = [req(f"p-{i}", 4, start=20) for i in range(1, 4)]   # 4 sequences: do not fit beside "a"
    s.add_request(parent, forks)
    assert "p" not in s.schedule().num_scheduled_tokens and len(s.running) == 1
    s.finish_requests(["a"], s.requests["a"].status.FINISHED_ABORTED)
    out = s.schedule()
    assert set(out.num_scheduled_tokens) == {"p", "p-1", "p-2", "p-3"} and len(s.running) == 4


def test_request_chat_template_bounds():
    from pagedserve.frontend.chat_template import render_untrusted_template
    conversation = [{"role": "user", "content": "hi"}]
    for template, words in (("{% for i in range(10**7) %}x{% endfor %}", "range"),
                            ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                             "longer than"),
                            ("{{ 'x' * 10**9 }}", "too large"),
                            ("{% for i in range(99999) %}{{ 'y' * 999 }}{% endfor %}", "characters")):
        with pytest.raises(ValidationError) as err:
            render_untrusted_template(template, conversation, True, False, {}, deadline_s=0.5)
        assert err.value.param == "chat_template" and words in str(err.value)
    assert render_untrusted_template("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                                     conversation, True, False, {"bos_token": "<s>"}) == "<s>hi"
