"""Quantization on the GPU machine, in one script (issue 18). Two stages:

  check   every quantization kernel against the torch dequantized reference, natively:
          W4A16 (GEMV / GEMM / dequantize + cuBLAS, with and without act-order g_idx, bf16
          and fp16), per-token int8 / FP8 activation quantization (bit-exact), the FP8
          torch._scaled_mm path and the W8A8 torch._int_mm path (M <= 16 padded and > 16),
          FP8 block and bitsandbytes LLM.int8 layers; then every tiny fixture of
          tests/fixtures/quant on CUDA against the CPU reference's greedy ids.
          Prints `CHECK {json}` lines and `CHECK_SUMMARY failed=N`.
          FP8 fixtures that differ from the reference are told apart from a bug by the
          fp32 reference's logit margin where they diverge, and by a second reference:
          the same dequantized model in bf16 on the GPU.
  time    llama-8b dummy weights (config only, as /work/shared/bench/peers.py) for one of
          bf16 | w4a16 (compressed-tensors pack-quantized, symmetric, group 128) | fp8
          (compressed-tensors FP8, per-channel weights, dynamic per-token activations):
          b1_decode, thr512, ttft1024, KV tokens at gpu_memory_utilization 0.85, weight bytes.
          Prints `RESULT {json}` lines.

    python benchmarks/quant_gpu.py check
    python benchmarks/quant_gpu.py time w4a16 [N]     (N requests for thrN, default 512)
    bash benchmarks/quant_gpu.sh checks | quant | bf16 | all   (each part fits a 10-minute command)

The W4A16 GEMV sweep is benchmarks/w4_gpu.py's.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import torch
os.environ.setdefault("PAGEDSERVE_COMPILE_AHEAD_STRICT", "1")   # a failed compile-ahead fails the run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=False)
QUANT_CONFIGS = {
    "bf16": None,
    "w4a16": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                  "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True,
                  "dynamic": False}}}},
    "fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}}},
}


def emit(kind: str, **kw) -> None:
    print(f"{kind} " + json.dumps(kw), flush=True)


# ---- check -------------------------------------------------------------------------------
FAILED = []


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def _report(name: str, err: float, tol: float, **kw) -> None:
    ok = err <= tol
    if not ok:
        FAILED.append(name)
    emit("CHECK", name=name, rel_err=err, tol=tol, ok=ok, **kw)


def check_w4a16() -> None:
    from pagedserve.layers.quantization.int4 import dequantize_int4, pack_int32
    from pagedserve.layers.quantization.triton_w4a16 import w4a16_matmul
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, n in ((4096, 6144), (14336, 4096), (4096, 28672)):
        for dtype in (torch.bfloat16, torch.float16):
            for act_order in (False, True):
                group = 128
                q = torch.randint(0, 16, (k, n), device="cuda", generator=g)
                qweight = pack_int32(q, 0)
                scales = (torch.rand(k // group, n, device="cuda", generator=g) * 2e-3 + 1e-4).to(dtype)
                zeros = torch.randint(0, 16, (k // group, n), device="cuda", generator=g).to(dtype)
                g_idx = (torch.randperm(k, device="cuda", generator=g) // group).to(torch.int32) if act_order else None
                weight = dequantize_int4(qweight, scales, zeros, group, g_idx, dtype)
                for m in (1, 7, 16, 17, 100, 256, 1024):
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
                    ref = x.float() @ weight.float()
                    for path in ("gemv", "gemm", "dequant", "auto"):
                        if path == "gemv" and m > 16:
                            continue
                        out = w4a16_matmul(x, qweight, scales, zeros, group, g_idx, path)
                        _report(f"w4a16 {path} m={m} k={k} n={n} {str(dtype)[6:]} act_order={act_order}",
                                _rel(out, ref), 1e-2)
                del q, qweight, weight
                torch.cuda.empty_cache()


def check_act_quant() -> None:
    from pagedserve.layers.quantization.act_quant import FP8, quantize_per_token_torch
    from pagedserve.layers.quantization.triton_act_quant import quantize_per_token_triton
    for m, k in ((1, 4096), (33, 14336), (512, 4096)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 4
        for dtype, qmax in ((torch.int8, 127.0), (FP8, 448.0)):
            q, s = quantize_per_token_triton(x, dtype, qmax, 1e-12)
            rq, rs = quantize_per_token_torch(x, dtype)
            exact = torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
            mismatches = int((q.float() != rq.float()).sum())
            _report(f"per-token quant {str(dtype)[6:]} m={m} k={k}", 0.0 if exact else 1.0, 0.0,
                    mismatched_values=mismatches, scale_max_diff=float((s - rs).abs().max()))


class _Layer(torch.nn.Module):
    pass


def _scaled_layer(method, n: int, k: int, dtype: torch.dtype):
    """A layer holding `method`'s post-load tensors for a random float weight."""
    from pagedserve.layers.quantization.scaled import quantize_weight
    w = torch.randn(n, k, device="cuda") * 0.02
    layer = _Layer()
    layer.weight, scale = quantize_weight(w, method.weight_dtype, "channel", [n])
    layer.weight_scale = scale
    return layer


def check_scaled() -> None:
    from pagedserve.layers.quantization.act_quant import FP8, quantize_per_token_torch
    from pagedserve.layers.quantization.scaled import ScaledLinearMethod
    for wdtype in (FP8, torch.int8):
        method = ScaledLinearMethod(wdtype, "channel", "token")
        for n, k in ((6144, 4096), (4096, 14336)):
            layer = _scaled_layer(method, n, k, torch.bfloat16)
            deq = layer.weight.float() * layer.weight_scale[:, None]
            for m in (1, 16, 17, 100, 1024):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                xq, xs = quantize_per_token_torch(x, wdtype)
                ref = (xq.float() * xs) @ deq.t()
                out = method.apply(layer, x)
                path = "_scaled_mm" if wdtype == FP8 else "_int_mm"
                _report(f"{path} m={m} n={n} k={k}", _rel(out, ref), 1e-2)


def check_block_and_bnb() -> None:
    from pagedserve.layers.quantization.act_quant import FP8
    from pagedserve.layers.quantization.bitsandbytes import BitsAndBytesInt8Method
    from pagedserve.layers.quantization.scaled import ScaledLinearMethod
    from tests.quant_reference import dequant_scaled, fake_quant_per_group, llm_int8_linear
    n, k = 1024, 2048
    w = torch.randn(n, k, device="cuda") * 0.02
    layer = _Layer()
    scale = w.reshape(n // 128, 128, k // 128, 128).abs().amax((1, 3)) / 448
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    layer.weight, layer.weight_scale = (w / full).to(FP8), scale
    method = ScaledLinearMethod(FP8, "block", "group", (128, 128))
    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(fake_quant_per_group(x.float(), 128), dequant_scaled(layer.weight, scale))
    _report("fp8 block (emulated) m=64", _rel(method.apply(layer, x), ref), 1e-2)
    bnb = BitsAndBytesInt8Method(6.0, True)
    layer = _Layer()
    layer.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    bnb.process_weights_after_loading(layer)
    x = torch.randn(40, k, device="cuda", dtype=torch.bfloat16) * 3
    ref = llm_int8_linear(x.float().cpu(), layer.weight.cpu(), layer.SCB.cpu(), 6.0)
    _report("bitsandbytes LLM.int8 m=40", _rel(bnb.apply(layer, x).cpu(), ref), 1e-2,
            outliers=int((x.abs() >= 6).sum()))


def _greedy(model, prompt: list[int], steps: int, device: str) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _margins(reference, prompts, got, expected) -> list[float]:
    """Where pagedserve's ids first leave the fp32 reference's: the reference's logit of its
    own choice minus its logit of pagedserve's (0 = an exact tie; a bug shows as large gaps)."""
    out = []
    for prompt, g, e in zip(prompts, got, expected):
        t = next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), None)
        if t is None:
            continue
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + e[:t]])).logits[0, -1].float()
        out.append(round(float(logits[e[t]] - logits[g[t]]), 5))
    return out


def _bf16_reference(path: str, device: str, act_quant: bool):
    """The fixture's reference in bf16 on `device`: the projections with emulated activation
    quantization stay fp32 (the emulation's own math; act_quant=False drops it: plain bf16
    F.linear with the dequantized weights), everything else runs in bf16."""
    from tests.quant_reference import reference_model
    model = reference_model(path).to(device=device, dtype=torch.bfloat16)
    for module in model.modules():
        hooked = module.__dict__.get("forward")
        if hooked is None:
            continue
        if act_quant:
            module.float()
            module.forward = lambda x, f=hooked: f(x.float()).to(torch.bfloat16)
        else:
            del module.forward
    return model


def check_fixtures(device: str = "cuda", only: list[str] | None = None) -> None:
    """The tiny fixtures on `device` (fp32, so the reference's ids are expected; FP8 runs
    through _scaled_mm's bf16 output, so a near-tie may legitimately differ). For a fixture
    that differs: the fp32 reference's logit margins at the divergences, and the greedy ids
    of the same reference in bf16 on `device`, whose own agreement with the fp32 one is the
    noise floor of bf16 rounding on these flat-logit models."""
    from pagedserve import LLM, SamplingParams
    from tests.quant_reference import reference_model
    from tests.helpers import random_prompts
    root = os.path.join(REPO, "tests", "fixtures", "quant")
    prompts = random_prompts(4, 512, 3, 40, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for name in only or sorted(os.listdir(root)):   # `only`: these fixtures, in this order
        path = os.path.join(root, name)
        if name == "float" or not os.path.isfile(os.path.join(path, "config.json")):
            continue
        reference = reference_model(path)
        expected = [_greedy(reference, p, 10, "cpu") for p in prompts]
        llm = LLM(model=path, device=device, dtype="float32", skip_tokenizer_init=True, max_model_len=128,
                  max_num_batched_tokens=32, gpu_memory_utilization=0.3, max_num_seqs=8, enforce_eager=True)
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]
        llm.shutdown()
        del llm
        same = sum(a == b for ga, ea in zip(got, expected) for a, b in zip(ga, ea))
        ok = got == expected
        extra = {}
        if not ok:
            try:
                extra["fp32_ref_margins_at_divergence"] = _margins(reference, prompts, got, expected)
                for act_quant in (True, False):
                    ref16 = [_greedy(_bf16_reference(path, device, act_quant), p, 10, device) for p in prompts]
                    tag = "bf16_ref" if act_quant else "bf16_ref_no_act_quant"
                    extra[f"{tag}_vs_fp32_ref_same"] = sum(a == b for x, y in zip(ref16, expected) for a, b in zip(x, y))
                    extra[f"ours_vs_{tag}_same"] = sum(a == b for x, y in zip(got, ref16) for a, b in zip(x, y))
            except Exception as exc:   # the diagnosis must not hide the remaining fixtures
                extra["diagnosis_error"] = f"{type(exc).__name__}: {exc}"[:500]
        if not ok and not name.startswith(("ct-fp8", "fp8")):
            FAILED.append(f"fixture {name}")
        emit("CHECK", name=f"fixture {name} on {device}", ok=ok, same_tokens=same, of=10 * len(prompts), **extra)
        del reference
        if device == "cuda":
            torch.cuda.empty_cache()


def run_checks() -> None:
    emit("CHECK_ENV", torch=torch.__version__, device=torch.cuda.get_device_name(),
         capability=list(torch.cuda.get_device_capability()))
    for stage in (check_act_quant, check_w4a16, check_scaled, check_block_and_bnb, check_fixtures):
        try:
            stage()
        except Exception as exc:   # one broken stage must not hide the others' results
            FAILED.append(stage.__name__)
            emit("CHECK", name=stage.__name__, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    print(f"CHECK_SUMMARY failed={len(FAILED)} {FAILED[:20]}", flush=True)


# ---- time --------------------------------------------------------------------------------
def make_model_dir(variant: str, shape: dict | None = None, vocab_size: int = 128256) -> str:
    """A config-only llama-8b (or `shape`) directory for load_format="dummy"."""
    directory = f"/tmp/models/llama-{'8b' if shape is None else 'tiny'}-{variant}"
    os.makedirs(directory, exist_ok=True)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size,
                  max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                  torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, **(shape or LLAMA_8B))
    if QUANT_CONFIGS[variant] is not None:
        config["quantization_config"] = QUANT_CONFIGS[variant]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(3, 32000) for _ in range(rng.randint(64, 1024))], rng.randint(16, 512)) for _ in range(n)]


def run_timing(variant: str, n: int, shape: dict | None = None, decode_tokens: int = 256,
               workloads: tuple[str, ...] = ("b1_decode", "ttft1024", "thr"), **llm_kwargs):
    """The timed workloads (a subset with `workloads`); `shape` / `llm_kwargs` shrink them for a
    CPU smoke run. Returns the LLM."""
    from pagedserve import LLM
    directory = make_model_dir(variant, shape, 128256 if shape is None else 32064)
    start = time.time()
    kwargs = dict(gpu_memory_utilization=0.85, max_model_len=2048)
    kwargs.update(llm_kwargs)
    llm = LLM(model=directory, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0, **kwargs)
    core = llm.engine.core
    emit("RESULT", variant=variant, startup_s=round(time.time() - start, 1),
         weight_gib=round(core.weight_bytes / 2**30, 3),
         kv_tokens=core.kv_cache_manager.pool.num_blocks * llm.engine.config.cache.block_size)
    greedy = dict(ignore_eos=True, temperature=0.0, detokenize=False)
    if "b1_decode" in workloads:
        _b1_decode(llm, variant, decode_tokens, greedy)
    if "ttft1024" in workloads:
        _ttft1024(llm, variant, greedy)
    if "thr" in workloads:
        _throughput(llm, variant, n, greedy)
    return llm


def _b1_decode(llm, variant: str, decode_tokens: int, greedy: dict) -> None:
    """batch-1 decode: 128-token prompt, `decode_tokens` output tokens (the second of two runs)."""
    from pagedserve import SamplingParams
    prompt = {"prompt_token_ids": list(range(100, 228))}
    params = SamplingParams(max_tokens=decode_tokens, **greedy)
    llm.generate([prompt], [params], use_tqdm=False)
    start = time.time()
    llm.generate([prompt], [params], use_tqdm=False)
    wall = time.time() - start
    emit("RESULT", variant=variant, workload="b1_decode", wall_s=round(wall, 3), tok_s=round(decode_tokens / wall, 1))


def _ttft1024(llm, variant: str, greedy: dict) -> None:
    """time to first token: a 1024-token prompt never seen before."""
    from pagedserve import SamplingParams
    params = SamplingParams(max_tokens=1, **greedy)
    llm.generate([{"prompt_token_ids": [(i * 7) % 32000 + 3 for i in range(1024)]}], [params], use_tqdm=False)
    start = time.time()
    llm.generate([{"prompt_token_ids": [(i * 11 + 5) % 32000 + 3 for i in range(1024)]}], [params], use_tqdm=False)
    emit("RESULT", variant=variant, workload="ttft1024", ms=round((time.time() - start) * 1e3, 1))


def _throughput(llm, variant: str, n: int, greedy: dict) -> None:
    """throughput: n requests, input U[64, 1024], output U[16, 512]."""
    from pagedserve import SamplingParams
    reqs = workload(n)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(max_tokens=o, **greedy) for _, o in reqs]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)
    start = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.time() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    total = generated + sum(len(p) for p, _ in reqs)
    emit("RESULT", variant=variant, workload=f"thr{n}", wall_s=round(wall, 2), req_s=round(n / wall, 2),
         out_tok_s=round(generated / wall, 1), total_tok_s=round(total / wall, 1))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("check", "time"):
        sys.exit(__doc__)
    if sys.argv[1] == "check":
        run_checks()
        sys.exit(1 if FAILED else 0)
    variant = sys.argv[2] if len(sys.argv) > 2 else "w4a16"
    if variant not in QUANT_CONFIGS:
        sys.exit(f"variant must be one of {', '.join(QUANT_CONFIGS)}")
    run_timing(variant, int(sys.argv[3]) if len(sys.argv) > 3 else 512)


if __name__ == "__main__":
    main()
