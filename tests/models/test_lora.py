"""LoRA adapters (layers/lora.py, core/lora_slots.py, models/lora_adapter.py) against transformers:
each request's greedy ids equal those of transformers' model with that request's adapter merged
into its weights, with adapters of different ranks and targets and the base model mixed in one
batch; with fewer device slots than adapters (slots reloaded); the same prompt under the base
model and an adapter (the prefix cache keeps them apart); Phi-3's fused projections; n > 1 and
preemption; and what is refused, naming lora_request. An adapter is read once, when registered,
off the engine thread: files deleted or corrupted after that change nothing (under TP too), and a
corrupt adapter fails its registration alone."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading

import pytest
import torch

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.errors import ValidationError
from tests.helpers import TEST_DEVICE, hf_greedy, random_prompts, write_lora_adapter

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints, tmp_path_factory):
    """Three adapters of the tiny Llama: every projection at rank 8, q / v only at rank 4 with
    rsLoRA scaling, and the MLP only at rank 16; with their merged references."""
    base = tiny_checkpoints["llama"]
    root = tmp_path_factory.mktemp("lora")
    specs = [("all", dict(seed=1)), ("qv", dict(seed=2, rank=4, targets=("q_proj", "v_proj"), use_rslora=True)),
             ("mlp", dict(seed=3, rank=16, alpha=8, targets=("gate_proj", "up_proj", "down_proj")))]
    made = {}
    for i, (name, spec) in enumerate(specs, start=1):
        merged = write_lora_adapter(base, str(root / name), **spec)
        made[name] = (LoRARequest(name, i, str(root / name)), merged)
    return base, made


def _check(llm: LLM, prompts: list[list[int]], loras: list, references: dict, params=GREEDY) -> None:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras, use_tqdm=False)
    for prompt, lora, output in zip(prompts, loras, outputs):
        want = hf_greedy(references[lora], prompt, params.max_tokens)
        assert [list(c.token_ids) for c in output.outputs] == [want] * params.n, (lora and lora.lora_name, prompt)


def test_mixed_adapters_and_base_in_one_batch(adapters) -> None:
    from transformers import AutoModelForCausalLM
    base, made = adapters
    references = {None: AutoModelForCausalLM.from_pretrained(base).eval()} | {lora: m for lora, m in made.values()}
    loras = [made["all"][0], made["qv"][0], None, made["mlp"][0], made["all"][0], None, made["qv"][0]]
    prompts = random_prompts(len(loras), 512, 3, 30, seed=4)
    # one prompt of two full KV blocks and more under two adapters and the base: no shared blocks
    prompts[1] = prompts[2] = prompts[4] = random_prompts(1, 512, 40, 40, seed=9)[0]
    llm = LLM(model=base, enable_lora=True, max_loras=3, skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32")
    try:
        _check(llm, prompts, loras, references)
        _check(llm, prompts, loras, references)   # again: the prefix cache now holds every prompt
    finally:
        llm.shutdown()


@pytest.mark.parametrize("steps", [1, 4])
def test_adapters_under_emulated_cuda_graphs(adapters, monkeypatch, steps) -> None:
    """The decode and prefill graphs with LoRA, emulated on the CPU (tests/unit/test_decode_staging):
    a capture records every delta whatever the step held, and a replay reruns it over its bucket's
    rows, reading the static masks the runner rewrote for that step (zero for the base model's
    tokens, the bucket's padding, and every row of a step without adapters). `steps` 4: decode
    windows (the offline LLM's default on CUDA), each step of a window setting its masks again."""
    from transformers import AutoModelForCausalLM

    from pagedserve.layers import lora as lora_layer
    from tests.unit.test_decode_staging import emulate_graphs
    base, made = adapters
    references = {None: AutoModelForCausalLM.from_pretrained(base).eval()} | {lora: m for lora, m in made.values()}
    replays = emulate_graphs(monkeypatch)
    monkeypatch.setattr(lora_layer, "_capturing", lambda mask: True)   # every forward is a graph's
    loras = [made["all"][0], None, made["qv"][0], made["mlp"][0], None]
    prompts = random_prompts(len(loras), 512, 3, 30, seed=8)
    llm = LLM(model=base, enable_lora=True, max_loras=3, skip_tokenizer_init=True, device="cpu", dtype="float32",
              block_size=4, num_kv_blocks=200, max_num_seqs=6, num_scheduler_steps=steps)
    try:
        assert llm.engine.core.executor.runner.graph_runner is not None
        _check(llm, prompts, loras, references)
        decode_replays = len(replays)
        _check(llm, prompts[1:2] + prompts[4:], [None, None], references)   # base only, after the adapters' steps
        assert decode_replays > 0 and len(replays) > decode_replays
    finally:
        llm.shutdown()


def test_fewer_slots_than_adapters_n_and_preemption(adapters) -> None:
    """One device slot: each step runs one adapter's requests (and the base model's); adapters
    are reloaded into the slot as the queue moves. A KV cache of 24 blocks of 4 preempts; n=2."""
    from transformers import AutoModelForCausalLM
    base, made = adapters
    references = {None: AutoModelForCausalLM.from_pretrained(base).eval()} | {lora: m for lora, m in made.values()}
    loras = [made["all"][0], made["qv"][0], None, made["mlp"][0], made["qv"][0], made["all"][0]]
    prompts = random_prompts(len(loras), 512, 10, 40, seed=5)
    llm = LLM(model=base, enable_lora=True, max_loras=1, max_cpu_loras=2, num_kv_blocks=24, block_size=4, max_model_len=48,
              skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32")
    try:
        _check(llm, prompts, loras, references, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=2))
        assert llm.engine.core.scheduler.stats.num_preemptions > 0
    finally:
        llm.shutdown()


def test_phi3_fused_projections(tiny_checkpoints, tmp_path) -> None:
    """Phi-3's checkpoints (and adapters) name qkv_proj and gate_up_proj: one A, B over the slices."""
    base = tiny_checkpoints["phi3"]
    merged = write_lora_adapter(base, str(tmp_path / "a"), seed=7, targets=("qkv_proj", "o_proj", "gate_up_proj"))
    lora = LoRARequest("phi", 1, str(tmp_path / "a"))
    prompts = random_prompts(3, 512, 4, 20, seed=6)
    llm = LLM(model=base, enable_lora=True, skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32")
    try:
        _check(llm, prompts, [lora] * 3, {lora: merged})
    finally:
        llm.shutdown()


def test_what_is_refused_names_lora_request(adapters, tiny_checkpoints, tmp_path) -> None:
    base, made = adapters
    lora = made["all"][0]
    plain = LLM(model=base, skip_tokenizer_init=True, num_kv_blocks=64)
    try:
        with pytest.raises(ValidationError) as error:
            plain.generate([[1, 2, 3]], GREEDY, lora_request=lora)
        assert error.value.param == "lora_request" and "enable_lora" in str(error.value)
    finally:
        plain.shutdown()
    llm = LLM(model=base, enable_lora=True, max_lora_rank=8, skip_tokenizer_init=True, num_kv_blocks=64)
    other = write_lora_adapter(tiny_checkpoints["qwen3"], str(tmp_path / "qwen3"), seed=1)   # another model's shapes
    del other
    head = tmp_path / "head"
    write_lora_adapter(base, str(head), seed=1, targets=("lm_head",))
    dora = tmp_path / "dora"
    write_lora_adapter(base, str(dora), seed=1, use_dora=True)
    try:
        cases = [(made["mlp"][0], "rank 16"), (LoRARequest("x", 9, str(tmp_path / "qwen3")), "do not fit"),
                 (LoRARequest("h", 10, str(head)), "lm_head"), (LoRARequest("d", 11, str(dora)), "DoRA"),
                 (LoRARequest("n", 12, str(tmp_path / "missing")), "adapter_config.json"),
                 (LoRARequest("again", 1, str(head)), "one id per adapter"), ("all", "LoRARequest")]
        llm.generate([[1, 2, 3]], GREEDY, lora_request=lora)   # id 1 is now this adapter
        for bad, words in cases:
            with pytest.raises(ValidationError) as error:
                llm.generate([[1, 2, 3]], GREEDY, lora_request=bad)
            assert error.value.param == "lora_request" and words in str(error.value), (bad, str(error.value))
        with pytest.raises(ValidationError) as error:
            LoRARequest("zero", 0, str(head))
        assert error.value.param == "lora_request"
        with pytest.raises(ValidationError) as error:
            llm.generate([[1, 2, 3], [4, 5]], GREEDY, lora_request=[lora])
        assert error.value.param == "lora_request"
    finally:
        llm.shutdown()
    with open(os.path.join(head, "adapter_config.json")) as f:
        assert json.load(f)["target_modules"] == ["lm_head"]


@pytest.mark.parametrize("split", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_tensor_and_pipeline_parallel(adapters, split) -> None:
    """TP=2: A whole and B split on the column-parallel layers, A split on the row-parallel ones
    (each rank's partial delta joins the all-reduce); PP=2: each stage loads its own layers."""
    from transformers import AutoModelForCausalLM
    base, made = adapters
    references = {None: AutoModelForCausalLM.from_pretrained(base).eval()} | {lora: m for lora, m in made.values()}
    loras = [made["all"][0], None, made["qv"][0], made["mlp"][0]]
    prompts = random_prompts(len(loras), 512, 3, 30, seed=8)
    llm = LLM(model=base, enable_lora=True, max_loras=2, skip_tokenizer_init=True, device="cpu", dtype="float32",
              max_model_len=128, **split)
    try:
        _check(llm, prompts, loras, references)
    finally:
        llm.shutdown()


def test_engine_stats_name_the_adapters_in_use(adapters) -> None:
    """vLLM's lora_requests_info comes from these: waiting adapters, then running ones (one slot:
    the second adapter waits while the first runs)."""
    base, made = adapters
    llm = LLM(model=base, enable_lora=True, max_loras=1, skip_tokenizer_init=True, device="cpu", dtype="float32",
              num_kv_blocks=64)
    try:
        engine = llm.engine
        for i, name in enumerate(("qv", "all", "qv")):
            engine.add_request(str(i), {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4),
                               lora_request=made[name][0])
        stats = engine.core.stats()
        assert (stats.running_loras, stats.waiting_loras) == ((), ("all", "qv"))
        engine.step()
        stats = engine.core.stats()
        assert (stats.running_loras, stats.waiting_loras) == (("qv",), ("all",))
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.core.stats().running_loras == ()
    finally:
        llm.shutdown()


def test_beam_search_with_an_adapter(adapters) -> None:
    """LLM.beam_search(lora_request=...): the adapter's beams are transformers' num_beams on the
    merged weights (no end-of-sequence token in these checkpoints)."""
    import torch

    from pagedserve import BeamSearchParams
    base, made = adapters
    lora, merged = made["qv"]
    prompt = random_prompts(1, 512, 6, 6, seed=11)[0]
    llm = LLM(model=base, enable_lora=True, skip_tokenizer_init=True, device="cpu", dtype="float32",
              num_kv_blocks=64)
    try:
        [result] = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=3, max_tokens=5),
                                   lora_request=lora)
    finally:
        llm.shutdown()
    with torch.no_grad():
        want = merged.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, max_new_tokens=5,
                               do_sample=False, early_stopping=True, length_penalty=1.0)
    assert [seq.tokens for seq in result.sequences] == want.tolist()


def _drain(engine) -> dict[str, list[int]]:
    """Step the engine until it is idle: each finished request's ids (a failed one's error)."""
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.error or list(output.outputs[0].token_ids)
    return done


def _nan_copy(path: str, to) -> str:
    """A copy of an adapter folder with one NaN in a lora_B factor."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(path, to)
    tensors = load_file(os.path.join(to, "adapter_model.safetensors"))
    tensors[next(key for key in sorted(tensors) if "lora_B" in key)][0, 0] = float("nan")
    save_file(tensors, os.path.join(to, "adapter_model.safetensors"))
    return str(to)


def test_files_deleted_after_registration_change_nothing(adapters, tmp_path) -> None:
    """Offline, an adapter is registered (read whole) by the first request naming it: with its
    folder deleted right after, that request and a later one still run it (exact ids)."""
    base, made = adapters
    lora, merged = made["all"]
    folder = tmp_path / "all"
    shutil.copytree(lora.lora_path, folder)
    copy = LoRARequest("copy", 7, str(folder))
    prompts = random_prompts(2, 512, 5, 20, seed=12)
    llm = LLM(model=base, enable_lora=True, skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32",
              num_kv_blocks=64)
    try:
        llm.engine.add_request("first", {"prompt_token_ids": prompts[0]}, GREEDY, lora_request=copy)
        shutil.rmtree(folder)
        assert _drain(llm.engine) == {"first": hf_greedy(merged, prompts[0], GREEDY.max_tokens)}
        _check(llm, prompts[1:], [copy], {copy: merged})
    finally:
        llm.shutdown()


def test_a_corrupt_adapter_fails_its_registration_alone(adapters, tmp_path) -> None:
    """A NaN in an adapter's factors (in a device slot it would turn every token of a step that
    runs any adapter into NaN: another slot's columns are masked by multiplying by zero) and an
    unreadable weights file are refused when the adapter is registered, naming lora_request and
    the adapter; a base-model request running meanwhile gets the ids it gets alone."""
    from transformers import AutoModelForCausalLM
    base, made = adapters
    good = made["all"][0].lora_path
    garbage = tmp_path / "garbage"
    shutil.copytree(good, garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    bad = [LoRARequest("nan", 20, _nan_copy(good, tmp_path / "nan")), LoRARequest("garbage", 21, str(garbage))]
    prompt = random_prompts(1, 512, 12, 12, seed=13)[0]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm = LLM(model=base, enable_lora=True, max_loras=2, skip_tokenizer_init=True, device=TEST_DEVICE,
              dtype="float32", num_kv_blocks=64)
    errors = []
    try:
        llm.engine.add_request("base", {"prompt_token_ids": prompt}, params)
        llm.engine.step()
        for lora in bad:
            try:
                llm.engine.add_request(lora.lora_name, {"prompt_token_ids": prompt}, params, lora_request=lora)
            except ValidationError as exc:
                errors.append(exc)
            llm.engine.step()
        outputs = _drain(llm.engine)
    finally:
        llm.shutdown()
    assert outputs["base"] == hf_greedy(AutoModelForCausalLM.from_pretrained(base).eval(), prompt, 16)
    assert [(e.param, f"LoRA adapter {lora.lora_name!r}" in str(e)) for e, lora in zip(errors, bad)] == \
        [("lora_request", True)] * 2, [str(e) for e in errors]
    assert "NaN or infinite" in str(errors[0]) and "cannot read" in str(errors[1])


def test_tensor_parallel_ranks_never_read_adapter_files(adapters, tmp_path) -> None:
    """TP=2: rank 0's frontend reads an adapter when it is registered and every rank gets its copy:
    the folder corrupted right after, the adapter still runs on both ranks, a registration of the
    corrupt folder is refused, and the engine goes on (no rank fails on the files)."""
    from transformers import AutoModelForCausalLM
    base, made = adapters
    lora, merged = made["qv"]
    folder = tmp_path / "qv"
    shutil.copytree(lora.lora_path, folder)
    prompts = random_prompts(2, 512, 5, 20, seed=14)
    llm = LLM(model=base, enable_lora=True, skip_tokenizer_init=True, device="cpu", dtype="float32",
              max_model_len=128, tensor_parallel_size=2)
    engine = llm.engine
    try:
        engine.add_request("lora", {"prompt_token_ids": prompts[0]}, GREEDY,
                           lora_request=LoRARequest("copy", 7, str(folder)))
        (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
        engine.add_request("base", {"prompt_token_ids": prompts[1]}, GREEDY)
        engine.step()   # the adapter goes into its device slot on both ranks
        with pytest.raises(ValidationError) as error:
            engine.add_request("bad", {"prompt_token_ids": prompts[1]}, GREEDY,
                               lora_request=LoRARequest("bad", 8, str(folder)))
        assert error.value.param == "lora_request" and "'bad'" in str(error.value)
        outputs = _drain(engine)
        assert engine.is_alive()
    finally:
        llm.shutdown()
    assert outputs == {"lora": hf_greedy(merged, prompts[0], GREEDY.max_tokens),
                       "base": hf_greedy(AutoModelForCausalLM.from_pretrained(base).eval(), prompts[1],
                                         GREEDY.max_tokens)}


@pytest.mark.parametrize("engine_process", [False, True])
def test_the_server_engine_reads_an_adapter_once_off_its_thread(adapters, monkeypatch, engine_process) -> None:
    """The AsyncEngine: an adapter's files are read once, in this process's input pool (never on
    the engine thread, nor in an engine-core process), for two requests one after the other."""
    from pagedserve.engine_args import EngineArgs
    from pagedserve.frontend.async_engine import AsyncEngine
    from pagedserve.frontend.llm_engine import LLMEngine
    from pagedserve.frontend.output_processor import OutputKind
    from pagedserve.models import lora_adapter
    base, made = adapters
    lora, merged = made["mlp"]
    reads, read = [], lora_adapter._read

    def spy(path: str, param: str, shapes_only: bool):
        if not shapes_only:
            reads.append((path, threading.current_thread().name))
        return read(path, param, shapes_only)
    monkeypatch.setattr(lora_adapter, "_read", spy)
    prompt = random_prompts(1, 512, 9, 9, seed=15)[0]
    engine = AsyncEngine(LLMEngine(EngineArgs(model=base, enable_lora=True, device="cpu", dtype="float32",
                                              num_kv_blocks=64, skip_tokenizer_init=True),
                                   engine_process=engine_process))

    async def run() -> list[list[int]]:
        ids = []
        for _ in range(2):
            async for output in engine.generate({"prompt_token_ids": prompt}, GREEDY, output_kind=OutputKind.FINAL_ONLY,
                                                lora_request=lora):
                final = output
            ids.append(list(final.outputs[0].token_ids))
        return ids
    try:
        ids = asyncio.run(run())
    finally:
        engine.shutdown()
    assert ids == [hf_greedy(merged, prompt, GREEDY.max_tokens)] * 2
    assert [(path, name.startswith("pagedserve-inputs")) for path, name in reads] == [(lora.lora_path, True)], reads


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the GGUF C++ kernels' batch invariance is the CPU's")
def test_an_adapters_rows_on_the_default_model_do_not_depend_on_the_batch(tmp_path) -> None:
    """On the default model (GGUF, the C++ kernels on the CPU, each row's arithmetic alike up to
    their row bound) a request with an adapter gets the same logprobs, to the bit, alone and in a
    batch of adapter and base requests: the deltas too are summed in one order whatever the rows
    (torch's matmul rounded them differently at one row and at several, and this adapter's large
    deltas carried that into other tokens)."""
    from pagedserve.layers.quantization import gguf_cpu
    from tests.server.test_lora_server import write_default_model_adapter
    if gguf_cpu.extension() is None:
        pytest.skip("no compiler for the GGUF C++ kernels")
    x, wt = torch.randn(7, 576), torch.randn(576, 48)
    rows = gguf_cpu.row_matmul(x, wt)
    assert torch.equal(rows[2:3], gguf_cpu.row_matmul(x[2:3], wt))
    assert torch.allclose(rows, x @ wt, rtol=1e-4, atol=1e-4)
    lora = LoRARequest("smol", 1, write_default_model_adapter(str(tmp_path / "a")))
    llm = LLM(enable_lora=True, max_model_len=512, num_kv_blocks=128)
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
    prompts = ["The capital of France is", "Once upon a time", "def fib(n):", "List three colours:"]
    loras = [lora, None, lora, lora]
    try:
        alone = [llm.generate(p, params, lora_request=r, use_tqdm=False)[0].outputs[0] for p, r in zip(prompts, loras)]
        batch = [o.outputs[0] for o in llm.generate(prompts, params, lora_request=loras, use_tqdm=False)]
        base = llm.generate(prompts[0], params, use_tqdm=False)[0].outputs[0]
    finally:
        llm.shutdown()

    def logprobs(out) -> list[float]:
        return [entry[token].logprob for token, entry in zip(out.token_ids, out.logprobs)]
    assert base.token_ids != alone[0].token_ids   # the adapter is on
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert [logprobs(o) for o in batch] == [logprobs(o) for o in alone]
