"""Quantization on the GPU machine, in one script (issue 18). Two stages:

  check   every quantization kernel against the torch dequantized reference, natively:
          W4A16 (GEMV / GEMM / dequantize + cuBLAS, with and without act-order g_idx, bf16
          and fp16), per-token int8 / FP8 activation quantization (bit-exact), the FP8
          torch._scaled_mm path and the W8A8 torch._int_mm path (M <= 16 padded and > 16),
          FP8 block and bitsandbytes LLM.int8 layers; then every tiny fixture of
          tests/fixtures/quant on CUDA against the CPU reference's greedy ids.
          Prints `CHECK {json}` lines and `CHECK_SUMMARY failed=N`.
  sweep   the split-K W4A16 GEMV's launch configurations on llama-8b's decode shapes
          against bf16 (cuBLAS and the Triton gemv). Prints `SWEEP {json}` lines.
  time    llama-8b dummy weights (config only, as /work/shared/bench/peers.py) for one of
          bf16 | w4a16 (compressed-tensors pack-quantized, symmetric, group 128) | fp8
          (compressed-tensors FP8, per-channel weights, dynamic per-token activations):
          b1_decode, thr512, ttft1024, KV tokens at gpu_memory_utilization 0.85, weight bytes.
          Prints `RESULT {json}` lines.

    python benchmarks/quant_gpu.py check
    python benchmarks/quant_gpu.py sweep
    python benchmarks/quant_gpu.py time w4a16 [N]     (N requests for thrN, default 512)
    bash benchmarks/quant_gpu.sh checks | quant | bf16 | all   (each part fits a 10-minute command)
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import torch

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


def check_fixtures() -> None:
    """The tiny fixtures on CUDA (fp32, so the reference's ids are expected; FP8 runs
    through _scaled_mm's bf16 output, so a near-tie may legitimately differ)."""
    from pagedserve import LLM, SamplingParams
    from tests.helpers import hf_greedy, random_prompts
    from tests.quant_reference import reference_model
    root = os.path.join(REPO, "tests", "fixtures", "quant")
    prompts = random_prompts(4, 512, 3, 40, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name == "float" or not os.path.isfile(os.path.join(path, "config.json")):
            continue
        reference = reference_model(path)
        expected = [hf_greedy(reference, p, 10) for p in prompts]
        llm = LLM(model=path, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
                  max_num_batched_tokens=32, gpu_memory_utilization=0.3, max_num_seqs=8, enforce_eager=True)
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]
        same = sum(a == b for ga, ea in zip(got, expected) for a, b in zip(ga, ea))
        ok = got == expected
        if not ok and not name.startswith(("ct-fp8", "fp8")):
            FAILED.append(f"fixture {name}")
        emit("CHECK", name=f"fixture {name} on cuda", ok=ok, same_tokens=same, of=10 * len(prompts))
        llm.shutdown()
        del llm
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


# ---- sweep -------------------------------------------------------------------------------
def _time_ms(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters // 10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (iters // 10 * 10)


def run_sweep() -> None:
    """Decode-sized W4A16 matmuls of llama-8b (group 128) against bf16 cuBLAS and the bf16
    Triton gemv: time per call (CUDA graphs of 10 calls) and the weight bytes streamed per
    second, for a few GEMV launch configurations."""
    from pagedserve.layers.linear_ops import linear
    from pagedserve.layers.quantization.int4 import pack_int32
    from pagedserve.layers.quantization.triton_w4a16 import GemvConfig, w4a16_matmul
    configs = [GemvConfig(), GemvConfig(block_n=32), GemvConfig(block_n=128), GemvConfig(block_k=256),
               GemvConfig(programs_per_sm=8), GemvConfig(programs_per_sm=2), GemvConfig(num_warps=8),
               GemvConfig(num_stages=4), GemvConfig(block_n=32, block_k=256, programs_per_sm=8)]
    for name, k, n in (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)):
        qweight = pack_int32(torch.randint(0, 16, (k, n), device="cuda"), 0)
        scales = torch.rand(k // 128, n, device="cuda", dtype=torch.bfloat16) * 1e-3
        zeros = torch.full_like(scales, 8.0)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (1, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_ms = _time_ms(lambda: linear(x, dense))
            cublas_ms = _time_ms(lambda: torch.nn.functional.linear(x, dense))
            for config in configs:
                ms = _time_ms(lambda: w4a16_matmul(x, qweight, scales, zeros, 128, None, "gemv", config))
                emit("SWEEP", layer=name, m=m, config=config.__dict__, w4a16_us=round(ms * 1e3, 1),
                     bf16_us=round(bf16_ms * 1e3, 1), cublas_bf16_us=round(cublas_ms * 1e3, 1),
                     speedup=round(bf16_ms / ms, 2), w4_gb_s=round(k * n / 2 / ms / 1e6, 0))


# ---- time --------------------------------------------------------------------------------
def make_model_dir(variant: str) -> str:
    directory = f"/tmp/models/llama-8b-{variant}"
    os.makedirs(directory, exist_ok=True)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                  max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                  torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, **LLAMA_8B)
    if QUANT_CONFIGS[variant] is not None:
        config["quantization_config"] = QUANT_CONFIGS[variant]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(3, 32000) for _ in range(rng.randint(64, 1024))], rng.randint(16, 512)) for _ in range(n)]


def run_timing(variant: str, n: int) -> None:
    from pagedserve import LLM, SamplingParams
    directory = make_model_dir(variant)
    start = time.time()
    llm = LLM(model=directory, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048,
              gpu_memory_utilization=0.85, seed=0)
    core = llm.engine.core
    emit("RESULT", variant=variant, startup_s=round(time.time() - start, 1),
         weight_gib=round(core.weight_bytes / 2**30, 3),
         kv_tokens=core.kv_cache_manager.pool.num_blocks * llm.engine.config.cache.block_size)
    greedy = dict(ignore_eos=True, temperature=0.0, detokenize=False)
    # batch-1 decode: 128-token prompt, 256 output tokens
    prompt = {"prompt_token_ids": list(range(100, 228))}
    params = SamplingParams(max_tokens=256, **greedy)
    llm.generate([prompt], [params], use_tqdm=False)
    start = time.time()
    llm.generate([prompt], [params], use_tqdm=False)
    wall = time.time() - start
    emit("RESULT", variant=variant, workload="b1_decode", wall_s=round(wall, 3), tok_s=round(256 / wall, 1))
    # time to first token: a 1024-token prompt never seen before
    params = SamplingParams(max_tokens=1, **greedy)
    llm.generate([{"prompt_token_ids": [(i * 7) % 32000 + 3 for i in range(1024)]}], [params], use_tqdm=False)
    start = time.time()
    llm.generate([{"prompt_token_ids": [(i * 11 + 5) % 32000 + 3 for i in range(1024)]}], [params], use_tqdm=False)
    emit("RESULT", variant=variant, workload="ttft1024", ms=round((time.time() - start) * 1e3, 1))
    # throughput: n requests, input U[64, 1024], output U[16, 512]
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
    if len(sys.argv) < 2 or sys.argv[1] not in ("check", "sweep", "time"):
        sys.exit(__doc__)
    if sys.argv[1] == "check":
        run_checks()
        sys.exit(1 if FAILED else 0)
    if sys.argv[1] == "sweep":
        run_sweep()
        return
    variant = sys.argv[2] if len(sys.argv) > 2 else "w4a16"
    if variant not in QUANT_CONFIGS:
        sys.exit(f"variant must be one of {', '.join(QUANT_CONFIGS)}")
    run_timing(variant, int(sys.argv[3]) if len(sys.argv) > 3 else 512)


if __name__ == "__main__":
    main()
