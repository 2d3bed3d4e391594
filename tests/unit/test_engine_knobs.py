"""The engine knobs are kept once, as EngineArgs fields: each has help text, a flag on
`pagedserve serve` (and on `generate`, but --seed, which is the sampling seed there), and
is taken by LLM(...) unchanged; unknown or unsupported knobs still raise ValidationError
naming them."""
from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

import pagedserve.llm
from pagedserve import LLM, ValidationError
from pagedserve.cli import build_parser
from pagedserve.engine_args import EngineArgs
from pagedserve.server.engine_flags import flag_of
from pagedserve.server.serve import engine_args_from, make_parser

NAMES = [f.name for f in fields(EngineArgs)]

# A value other than the default for every field, of the field's type.
NON_DEFAULTS = {"model": "some/model", "tokenizer": "some/tokenizer", "dtype": "bfloat16", "max_model_len": 333,
                "block_size": 32, "max_num_seqs": 7, "max_num_batched_tokens": 99, "num_scheduler_steps": 6, "enable_prefix_caching": False,
                "seed": 5, "load_format": "dummy", "skip_tokenizer_init": True, "device": "cpu",
                "gpu_memory_utilization": 0.5, "enforce_eager": True, "disable_cascade_attn": True, "async_scheduling": False,
                "tensor_parallel_size": 2, "disable_custom_all_reduce": True, "kv_cache_memory_gb": 1.5,
                "num_kv_blocks": 12,
                "scheduling_policy": "static", "trust_remote_code": True, "max_logprobs": 5,
                "allow_long_max_model_len": True, "pipeline_parallel_size": 2,
                "distributed_executor_backend": "ray", "swap_space": 2.5, "kv_offloading_size": 8.0,
                "preemption_mode": "recompute", "kv_cache_dtype": "fp8", "quantization": "fp8", "runner": "generate",
                "task": "generate",
                "enable_lora": True, "max_loras": 3, "max_lora_rank": 64, "max_cpu_loras": 4,
                "hf_overrides": '{"rope_scaling": {"rope_type": "yarn"}}', "grammar_compile_timeout": 7.5}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _subparser(name: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def test_every_field_has_help_and_a_test_value() -> None:
    assert set(NON_DEFAULTS) == set(NAMES), "a new EngineArgs field: add a value for it here"
    for f in fields(EngineArgs):
        assert f.metadata.get("help"), f"EngineArgs.{f.name} has no help text"
        assert NON_DEFAULTS[f.name] != f.default


def test_every_field_has_a_flag() -> None:
    serve = _options(make_parser())
    assert _options(_subparser("serve")) == serve
    generate = _options(_subparser("generate"))
    for name in NAMES:
        assert flag_of(name) in serve, name
        if name != "seed":   # generate's --seed is the sampling seed
            assert flag_of(name) in generate, name
    assert {"-tp", "-pp", "--no-enable-prefix-caching", "--no-async-scheduling"} <= serve


def _argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(flag_of(name) if value else flag_of(name).replace("--", "--no-"))
        else:
            argv += [flag_of(name), str(value)]
    return argv


def test_serve_flags_build_engine_args() -> None:
    args = make_parser().parse_args(_argv(NON_DEFAULTS))
    assert engine_args_from(args) == EngineArgs(**NON_DEFAULTS)
    defaults = make_parser().parse_args([])
    assert engine_args_from(defaults) == EngineArgs()   # dtype and TP fall back as without the environment
    assert engine_args_from(make_parser().parse_args(["m", "-tp", "3"])) == EngineArgs(model="m",
                                                                                       tensor_parallel_size=3)


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_shutdown_timeout_takes_seconds_and_names_itself(value, capsys) -> None:
    assert make_parser().parse_args([]).shutdown_timeout == 3.0
    assert make_parser().parse_args(["--shutdown-timeout", "0"]).shutdown_timeout == 0.0
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--shutdown-timeout", value])
    assert f"--shutdown-timeout: must be a number of seconds >= 0, got '{value}'" in capsys.readouterr().err


class _RecordedEngine:
    """Stands in for LLMEngine: records the EngineArgs it was built with."""

    built: list[EngineArgs] = []
    offline: list[bool] = []

    def __init__(self, args: EngineArgs, offline: bool = False) -> None:
        self.built.append(args)
        self.offline.append(offline)

    def shutdown(self) -> None:
        pass


def test_llm_takes_exactly_the_engine_args(monkeypatch) -> None:
    built = _RecordedEngine.built = []
    offline = _RecordedEngine.offline = []
    monkeypatch.setattr(pagedserve.llm, "LLMEngine", _RecordedEngine)
    LLM(**NON_DEFAULTS)
    assert built == [EngineArgs(**NON_DEFAULTS)]
    assert offline == [True]   # the offline defaults (default_max_num_batched_tokens)
    LLM("positional/model", speculative_config=None)   # an unsupported knob at its default is fine
    assert built[-1] == EngineArgs(model="positional/model")


@pytest.mark.parametrize("kwargs,param", [(dict(no_such_knob=1), "no_such_knob"),
                                          (dict(speculative_config={"method": "ngram"}), "speculative_config")])
def test_unknown_and_unsupported_knobs_name_themselves(monkeypatch, kwargs, param) -> None:
    monkeypatch.setattr(pagedserve.llm, "LLMEngine", lambda args: None)
    with pytest.raises(ValidationError) as err:
        LLM(**kwargs)
    assert err.value.param == param and param in str(err.value)


def test_max_cpu_loras_below_max_loras_names_itself() -> None:
    """vLLM's rule: the host keeps at least the adapters the device slots hold."""
    with pytest.raises(ValidationError) as err:
        EngineArgs(enable_lora=True, max_loras=2, max_cpu_loras=1).validate()
    assert err.value.param == "max_cpu_loras" and "max_loras (2)" in str(err.value)
    EngineArgs(enable_lora=True, max_loras=2, max_cpu_loras=2).validate()


def test_a_kv_cache_smaller_than_max_model_len_names_it(tiny_checkpoints) -> None:
    """Said before the host tier and the graphs are built on it: 0 blocks (a GPU whose
    gpu_memory_utilization share the forward already takes) once crashed in the host tier."""
    for blocks in (0, 3):
        with pytest.raises(ValidationError) as err:
            LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", skip_tokenizer_init=True,
                max_model_len=64, block_size=16, num_kv_blocks=blocks, swap_space=1)
        assert err.value.param == "max_model_len"
        assert f"holds {blocks * 16} tokens ({blocks} blocks of 16), fewer than max_model_len=64" in str(err.value)


@pytest.mark.parametrize("name,gib,offline,expected", [
    ("NVIDIA H200", 141, True, 16384), ("NVIDIA H200", 141, False, 8192),
    ("NVIDIA H100 80GB HBM3", 80, True, 16384), ("NVIDIA A100-SXM4-80GB", 80, True, 8192),
    ("NVIDIA L4", 22, True, 8192), ("NVIDIA L4", 22, False, 8192)])
def test_default_token_budget_follows_vllm(monkeypatch, name, gib, offline, expected) -> None:
    """vLLM's LLM-class budget on 70 GiB+ GPUs (A100 excepted) for the offline engine; 8192 for
    the server and smaller GPUs; on CPU 1024 offline and 512 for the server. The larger concurrency default follows the same line."""
    import types

    import torch

    from pagedserve.engine_args import default_max_num_batched_tokens, default_max_num_seqs
    props = types.SimpleNamespace(name=name, total_memory=gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda", 0)
    assert default_max_num_batched_tokens(cuda, offline) == expected
    assert default_max_num_seqs(cuda) == (1024 if gib >= 70 and "A100" not in name else 256)
    assert default_max_num_batched_tokens(torch.device("cpu"), offline) == (1024 if offline else 512)
