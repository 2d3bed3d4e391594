"""kv_cache_dtype fp8 (vLLM's): the KV cache holds one byte a value, so the same memory holds
more tokens, and greedy ids equal transformers' with its keys (after rotary) and values rounded
to the same FP8 format, as the cache stores them (scale 1.0, saturating): the rounding is the
only difference from the model's own attention."""
from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ValidationError
from tests.helpers import TEST_DEVICE, hf_greedy, random_prompts

FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _rounded(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    bound = torch.finfo(fp8).max
    return x.clamp(-bound, bound).to(fp8).to(x.dtype)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_greedy_ids_equal_transformers_over_fp8_rounded_kv(tiny_checkpoints, monkeypatch, name) -> None:
    import transformers.models.llama.modeling_llama as modeling
    from transformers import AutoModelForCausalLM
    fp8, path = FORMATS[name], tiny_checkpoints["llama"]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rotary = modeling.apply_rotary_pos_emb

    def rotary_then_round(q, k, *args, **kwargs):
        q, k = rotary(q, k, *args, **kwargs)
        return q, _rounded(k, fp8)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rotary_then_round)
    for layer in reference.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda module, inputs, out: _rounded(out, fp8))
    prompts = random_prompts(6, 512, 3, 40, seed=21)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = LLM(model=path, kv_cache_dtype=name, skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32",
              block_size=4, num_kv_blocks=256)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        assert ids == [hf_greedy(reference, p, 12) for p in prompts]
        assert llm.engine.core.executor.runner.kv_cache.dtype == fp8
    finally:
        llm.shutdown()
    # the rounding shows: transformers' own attention gives other ids for some prompt
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rotary)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ids != [hf_greedy(plain, p, 12) for p in prompts]


def test_fp8_cache_holds_more_tokens_in_the_same_memory(tiny_checkpoints) -> None:
    """The same kv_cache_memory_gb: blocks of 1-byte values instead of the model's fp32, exactly
    (under TGI's name for E4M3)."""
    path = tiny_checkpoints["llama"]
    blocks = {}
    for name in ("auto", "fp8_e4m3fn"):
        llm = LLM(model=path, kv_cache_dtype=name, skip_tokenizer_init=True, device="cpu", dtype="float32",
                  kv_cache_memory_gb=0.01, swap_space=0)
        try:
            runner = llm.engine.core.executor.runner
            blocks[name] = (llm.engine.core.kv_cache_manager.num_blocks, runner.kv_bytes_per_block())
            assert runner.kv_cache.dtype == (torch.float32 if name == "auto" else torch.float8_e4m3fn)
        finally:
            llm.shutdown()
    assert blocks["auto"][1] == 4 * blocks["fp8_e4m3fn"][1]
    assert blocks["fp8_e4m3fn"][0] == int(0.01 * 2**30 // blocks["fp8_e4m3fn"][1]) and blocks["auto"][0] == int(
        0.01 * 2**30 // blocks["auto"][1])


def test_unknown_kv_cache_dtype_is_refused_by_name(tiny_checkpoints) -> None:
    with pytest.raises(ValidationError) as error:
        LLM(model=tiny_checkpoints["llama"], kv_cache_dtype="int4", skip_tokenizer_init=True)
    assert error.value.param == "kv_cache_dtype" and "fp8_e5m2" in str(error.value)


def test_fp8_blocks_swap_to_the_host_tier_and_back_exactly(tiny_checkpoints) -> None:
    """The host tier copies an FP8 cache's bytes: requests preempted by swap in a 24-block cache
    continue with the ids they get in a cache that never preempts."""
    path = tiny_checkpoints["llama"]
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, 512, 20, 40, seed=3)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ids, swaps = [], []
    for blocks in (24, 256):
        llm = LLM(model=path, kv_cache_dtype="fp8", skip_tokenizer_init=True, device="cpu", dtype="float32",
                  block_size=4, num_kv_blocks=blocks, max_model_len=64)
        try:
            ids.append([list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)])
            swaps.append(llm.engine.core.scheduler.stats.num_swap_preemptions)
        finally:
            llm.shutdown()
    assert swaps[0] > 0 and swaps[1] == 0
    assert ids[0] == ids[1]


def test_checkpoint_kv_scales(tiny_checkpoints, tmp_path, monkeypatch) -> None:
    """An FP8 checkpoint's per-layer KV scales (llm-compressor's self_attn.k_scale / v_scale; AutoFP8's
    k_proj.output_scale): the cache holds round(K / k_scale) and round(V / v_scale), so greedy ids equal
    transformers' with K and V rounded on that grid, and differ from the scale-1.0 rounding's."""
    import shutil

    import transformers.models.llama.modeling_llama as modeling
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    fp8, path = torch.float8_e4m3fn, str(tmp_path / "scaled")
    shutil.copytree(tiny_checkpoints["llama"], path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = len(reference.model.layers)
    k_scales, v_scales = [0.02 * (i + 1) for i in range(layers)], [0.01 + 0.005 * i for i in range(layers)]
    scales = {f"model.layers.{i}.self_attn.k_scale": torch.tensor(k) for i, k in enumerate(k_scales)}
    scales.update({f"model.layers.{i}.self_attn.v_proj.output_scale": torch.tensor([v]) for i, v in enumerate(v_scales)})
    save_file(scales, f"{path}/kv_scales.safetensors")
    layer_of = {id(layer.self_attn): i for i, layer in enumerate(reference.model.layers)}
    rotary, current = modeling.apply_rotary_pos_emb, []

    def rotary_then_round(q, k, *args, **kwargs):
        q, k = rotary(q, k, *args, **kwargs)
        scale = k_scales[current[-1]]
        return q, _rounded(k / scale, fp8) * scale
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rotary_then_round)
    for layer in reference.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda module, args: current.append(layer_of[id(module)]))
        index = layer_of[id(layer.self_attn)]
        layer.self_attn.v_proj.register_forward_hook(
            lambda module, inputs, out, s=v_scales[index]: _rounded(out / s, fp8) * s)
    prompts = random_prompts(5, 512, 3, 40, seed=22)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ids = {}
    for name, folder in (("scaled", path), ("unit", tiny_checkpoints["llama"])):
        llm = LLM(model=folder, kv_cache_dtype="fp8", skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32",
                  block_size=4, num_kv_blocks=256)
        try:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            ids[name] = [list(o.outputs[0].token_ids) for o in outputs]
        finally:
            llm.shutdown()
    assert ids["scaled"] == [hf_greedy(reference, p, 12) for p in prompts]
    assert ids["scaled"] != ids["unit"]


def test_start_up_dry_runs_take_the_fp8_cache(tiny_checkpoints) -> None:
    """profile_run's scratch cache (whose forwards the compile-ahead dry runs take) has the KV
    cache's element type: with a bf16 scratch cache the FP8 decode launches of mixed steps
    compiled at their first real launch (1.1-1.5 s stalls on an H100)."""
    from pagedserve.worker.profile_run import profile_run
    llm = LLM(model=tiny_checkpoints["llama"], kv_cache_dtype="fp8", skip_tokenizer_init=True, device="cpu",
              dtype="float32", num_kv_blocks=64, swap_space=0)
    try:
        runner = llm.engine.core.executor.runner
        profile_run(runner, 16)
        layers = runner.model.attention_layers()
        assert all(layer.k_cache.dtype == layer.v_cache.dtype == torch.float8_e4m3fn for layer in layers)
    finally:
        llm.shutdown()
