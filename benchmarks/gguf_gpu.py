"""Issue 19's GPU part (ggufgpu): the default model's GGUF blocks kept packed on CUDA
(triton_gguf: GEMV up to triton_gguf.GEMV_MAX_ROWS rows, dequantize + cuBLAS above;
PAGEDSERVE_GGUF_CUDA_PACKED=1) against the dequantized-once path (gguf.CUDA_PACKED = False, the
default since session 15), bf16, one child process per variant (each sets its module constants
before the engine loads):

  fp32      dtype=float32: every layer dequantized to fp32 (the exact path): the reference ids
  dequant   bf16, gguf.CUDA_PACKED = False: weights dequantized to bf16 at load (the default)
  packed    bf16, the blocks kept (Q4_1 layers, the Q8_0 embedding / tied LM head)
  packed64  as packed with triton_gguf.GEMV_MAX_ROWS = 64 (the batch only: does the GEMV beat
            dequantize + cuBLAS for 17-64 rows?)

Per variant: weight bytes (the runner's), how many layers keep blocks, greedy ids (test_default_
model's 10 prompts, 32 tokens), b1_decode (cpu_vs_llamacpp's: a 128-token prompt, 128 new
tokens, after the first) and its 64-prompt batch (input U[32,256], output U[16,128], one generate:
output tok/s). The summary: ids equal to fp32's (per prompt) for dequant and packed, tok/s side by side.

The model: the default model (SmolLM2-135M-Instruct Q4_1) as pagedserve materializes it (an HF
folder of raw blocks), cut to its first LAYERS layers so that it fits a device call's carry
(~40 MB; the whole one is 97 MB): `prepare` writes it here, the device run reads it.

Session 10 (ggk) adds, for the types without a real model here (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K):

  random    per type a random Llama (RANDOM_MODEL: 4 layers of a 1B-class shape) written on the
            machine itself as pagedserve materializes a GGUF (tests/kernels/test_gguf_triton.py's
            write_random_llama), loaded "dequant" and "packed" (bf16): b1_decode and its 128 ids
  tune      triton_gguf's GEMV per type at 1 and 4 rows on TUNE_SHAPES (one 1B-class layer's
            projections, TUNE_COPIES copies so that the weights do not sit in the 50 MB L2), the
            launch configs of TUNE_GRID against the default (ONE_ROW / FEW_ROWS) and cuBLAS on the
            weight dequantized to bf16, each a CUDA graph of the four products; `--warm` only
            launches each once (the compiles, run in parallel processes before the timed one)

Usage:
  python benchmarks/gguf_gpu.py prepare [--layers 4]      (here: writes .devcarry/gguf_model)
  python benchmarks/gguf_gpu.py tune [--types Q4_K,..] [--warm]   (GPU)
  python benchmarks/gguf_gpu.py random [--types Q4_K,..]           (GPU)
  python benchmarks/gguf_gpu.py run [--model DIR]          (GPU; bash benchmarks/gguf_gpu.sh)
  python benchmarks/gguf_gpu.py run --cpu-smoke            (the same on the CPU, a 1-layer cut with
        a 512-row vocabulary, token-id prompts, Triton's interpreter, float16 for bf16, tiny
        workloads: proves the script, measures nothing)
Writes gguf_gpu.json under $OUT."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CARRY = os.path.join(ROOT, ".devcarry", "gguf_model")
SMOKE_VOCAB = 512
VARIANTS = {   # name: (dtype, (gguf.CUDA_PACKED, triton_gguf.GEMV_MAX_ROWS), workloads)
    "fp32": ("float32", (True, 16), ("ids",)),
    "dequant": ("bfloat16", (False, 16), ("ids", "b1", "batch")),
    "packed": ("bfloat16", (True, 16), ("ids", "b1", "batch")),
    "packed64": ("bfloat16", (True, 64), ("batch",)),
    "packed0": ("bfloat16", (True, 16), ("b1", "batch")),   # packed with triton_gguf.CONFIGS = {}: untuned
    "packedall": ("bfloat16", (True, 16), ("ids", "b1", "batch")),   # no gguf.CUDA_PACKED_MAX_ELEMENTS: every layer
}


# random: 4 layers of a Llama-3.2-1B-like shape (hidden 2048, MLP 8192, 32 x 64 heads, 8 KV heads),
# the vocabulary of cpu_vs_llamacpp's prompt ids (< 40000)
RANDOM_MODEL = dict(hidden=2048, intermediate=8192, layers=4, vocab=40960, heads=32, kv_heads=8)
NEW_TYPES = ("Q4_K", "Q6_K", "Q5_K", "Q5_0", "Q5_1")   # the order `random` runs them in
ALL_TYPES = ("Q4_0", "Q4_1", "Q8_0") + NEW_TYPES
TUNE_SHAPES = ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192))   # (N, K): qkv, o, gate_up, down
TUNE_COPIES = 4
# (block_n, warps, programs per SM). Session 10's second run also tried 4-8 units' loads an
# iteration (Q6_K -1.6%, the rest slower) and was to try per-lane sums at one row: both deleted.
TUNE_GRID = {1: [(bn, w, p) for bn in (32, 64, 128) for w in (2, 4, 8) for p in (2, 4, 8)],
             4: [(bn, w, p) for bn in (32, 64, 128) for w in (4, 8) for p in (2, 4, 8)]}
RANDOM_TYPES = ("Q4_K", "Q4_1", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q8_0", "Q4_0")   # `random`'s order


def prepare(layers: int, out: str, vocab: int | None = None) -> None:
    """The materialized default model cut to `layers` layers: config.json's num_hidden_layers,
    the safetensors without the other layers, gguf_quant.json's types likewise, tokenizer.json
    gzipped (the run unpacks it). `vocab` (the CPU smoke run's): only the first rows of the
    embedding / LM head (prompts of token ids below it then)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from pagedserve.models.default_model import default_model_path
    from pagedserve.models.loader import materialize_gguf, resolve_model
    source = materialize_gguf(resolve_model(default_model_path()))
    src = source.directory
    keep = lambda name: not name.startswith("model.layers.") or int(name.split(".")[2]) < layers  # noqa: E731
    os.makedirs(out, exist_ok=True)
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    if vocab:
        tensors["model.embed_tokens.qweight"] = tensors["model.embed_tokens.qweight"][:vocab].contiguous()
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = layers
    if vocab:
        config["vocab_size"] = vocab
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(src, "gguf_quant.json")) as f:
        quant = json.load(f)
    quant["tensor_types"] = {k: v for k, v in quant["tensor_types"].items() if keep(k)}
    with open(os.path.join(out, "gguf_quant.json"), "w") as f:
        json.dump(quant, f)
    for name in os.listdir(src):
        if name == "tokenizer.json":
            with open(os.path.join(src, name), "rb") as f, gzip.open(os.path.join(out, name + ".gz"), "wb") as g:
                shutil.copyfileobj(f, g)
        elif name not in ("model.safetensors", "config.json", "gguf_quant.json"):
            shutil.copy(os.path.join(src, name), out)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"{out}: {layers} of the default model's layers, {size / 1e6:.1f} MB")


def unpacked(model: str) -> str:
    """A folder the engine loads: `model` itself, or a copy under /tmp with tokenizer.json unpacked."""
    if os.path.isfile(os.path.join(model, "tokenizer.json")):
        return model
    dst = os.path.join("/tmp", os.path.basename(os.path.abspath(model)) + "_unpacked")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(model):
        if name == "tokenizer.json.gz":
            with gzip.open(os.path.join(model, name), "rb") as f, open(os.path.join(dst, "tokenizer.json"), "wb") as g:
                shutil.copyfileobj(f, g)
        elif not os.path.exists(os.path.join(dst, name)):
            os.symlink(os.path.abspath(os.path.join(model, name)), os.path.join(dst, name))
    return dst


def child(variant: str, model: str, smoke: bool, random_model: bool = False) -> dict:
    from pagedserve.layers.quantization import gguf, triton_gguf
    gguf.CUDA_PACKED, triton_gguf.GEMV_MAX_ROWS = VARIANTS[variant][1]
    gguf.CUDA_PACKED_TYPES = tuple(triton_gguf.TYPE_IDS)   # every type the kernels take, default or not
    if variant == "packedall":
        gguf.CUDA_PACKED_MAX_ELEMENTS = None
    if variant == "packed0":
        triton_gguf.CONFIGS = {}
    elif os.path.isfile(os.environ.get("GGUF_TUNED", "")):   # this run's tune: its best launches
        triton_gguf.CONFIGS = tuned_configs(os.environ["GGUF_TUNED"])
    if smoke:   # the CPU has no CUDA: force triton_gguf's path on it (the interpreter)
        gguf._cuda_packed = lambda device, fmt, int4: gguf.CUDA_PACKED and int4 and fmt in gguf.CUDA_PACKED_TYPES
    if random_model:
        return random_child(variant, model, smoke)
    from pagedserve import LLM, SamplingParams
    sys.path.insert(0, HERE)
    from cpu_vs_llamacpp import prompts
    from tests.models.test_default_model import PROMPTS, NEW_TOKENS
    dtype, _, workloads = VARIANTS[variant]
    if smoke and dtype == "bfloat16":
        dtype = "float16"   # the interpreter mishandles bf16
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, device="cpu" if smoke else "cuda", max_model_len=1024, seed=0)
    res = dict(variant=variant, dtype=dtype, ready_s=round(time.perf_counter() - t0, 1))
    runner = llm.engine.core.executor.runner
    res["weight_bytes"] = runner.weight_bytes
    res["packed_layers"] = sum(bool(getattr(m, "gguf_triton", False)) for m in runner.model.modules())
    res["gemv_max_rows"] = triton_gguf.GEMV_MAX_ROWS

    def gen(items):
        return llm.generate([{"prompt_token_ids": ids} for ids, _ in items],
                            [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
                             for _, n in items], use_tqdm=False)

    p = prompts()
    if smoke:   # the smoke model's vocabulary is SMOKE_VOCAB ids
        p = {k: [x % SMOKE_VOCAB for x in v] if k == "b1" else v for k, v in p.items()}
        p["batch"] = [([x % SMOKE_VOCAB for x in ids[:3]], 2) for ids, _ in p["batch"][:2]]
    if "ids" in workloads:
        texts = [{"prompt_token_ids": p["b1"][:3]}, {"prompt_token_ids": p["b1"][3:5]}] if smoke else PROMPTS
        outs = llm.generate(texts, SamplingParams(max_tokens=2 if smoke else NEW_TOKENS, temperature=0.0),
                            use_tqdm=False)
        res["ids"] = [list(o.outputs[0].token_ids) for o in outs]
    b1_prompt, b1_new = (p["b1"][:4], 2) if smoke else (p["b1"], 128)
    batch = p["batch"]
    if "b1" in workloads:
        gen([(b1_prompt, 2 if smoke else 8)])   # warm-up
        t0 = time.perf_counter()
        gen([(b1_prompt, 1)])
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = gen([(b1_prompt, b1_new)])
        t_all = time.perf_counter() - t0
        assert len(out[0].outputs[0].token_ids) == b1_new
        res["b1_decode_tok_s"] = round((b1_new - 1) / (t_all - t_first), 2)
    if "batch" in workloads:
        if not smoke:
            gen(batch[:4])   # warm-up (graphs of more rows, prefill shapes)
        t0 = time.perf_counter()
        outs = gen(batch)
        wall = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        res.update(batch_prompts=len(batch), batch_out_tok_s=round(n_out / wall, 1), batch_wall_s=round(wall, 3))
    return res


def random_child(variant: str, model: str, smoke: bool) -> dict:
    """A random model (no tokenizer): weight bytes, packed layers, b1_decode and its ids."""
    from pagedserve import LLM, SamplingParams
    sys.path.insert(0, HERE)
    from cpu_vs_llamacpp import prompts
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float16" if smoke else "bfloat16", device="cpu" if smoke else "cuda",
              max_model_len=1024, seed=0, skip_tokenizer_init=True)
    res = dict(variant=variant, ready_s=round(time.perf_counter() - t0, 1))
    runner = llm.engine.core.executor.runner
    res["weight_bytes"] = runner.weight_bytes
    res["packed_layers"] = sum(bool(getattr(m, "gguf_triton", False)) for m in runner.model.modules())
    prompt, new = ([x % SMOKE_VOCAB for x in prompts()["b1"][:4]], 3) if smoke else (prompts()["b1"], 128)

    def gen(n):
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=n, ignore_eos=True,
                           temperature=0.0, detokenize=False), use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    gen(2 if smoke else 8)   # warm-up
    rates = []
    for _ in range(1 if smoke else 3):   # best of 3 (one run varied +-20% between equal models)
        t0 = time.perf_counter()
        gen(1)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        res["ids"] = gen(new)
        rates.append(round((new - 1) / (time.perf_counter() - t0 - t_first), 2))
    res["b1_decode_tok_s"], res["b1_runs"] = max(rates), rates
    return res


def random_model(fmt: str, smoke: bool) -> str:
    """The random model of `fmt` under /tmp (written once)."""
    sys.path.insert(0, ROOT)
    from tests.kernels.test_gguf_triton import write_random_llama
    path = f"/tmp/gguf_random_{fmt}" + ("_smoke" if smoke else "")
    if not os.path.isfile(os.path.join(path, "gguf_quant.json")):
        shape = dict(hidden=256, intermediate=256, layers=1, vocab=SMOKE_VOCAB, heads=4, kv_heads=2) if smoke \
            else RANDOM_MODEL
        write_random_llama(path + ".tmp", fmt, **shape)
        os.rename(path + ".tmp", path)
    return path


def run_random(types: list[str], smoke: bool, timeout: float, deadline: float, write_only: bool = False,
               variants: tuple[str, ...] = ("dequant", "packed")) -> None:
    """Per type: a random model written here, then dequant and packed (child processes) while
    time is left before `deadline` (time.time()); `write_only`: the models only (run in the
    background of the tests)."""
    if write_only:
        for fmt in types:
            random_model(fmt, smoke)
        return
    env = _child_env(smoke)
    results = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "shape": RANDOM_MODEL, "types": {}}
    need = 0.75 * len(variants) * timeout   # a type's loads and runs; then the last type's time, and a margin
    for fmt in types:
        if time.time() + need > deadline:
            print(f"{fmt}: skipped (time)", flush=True)
            continue
        t_type = time.time()
        model = random_model(fmt, smoke)
        row = results["types"][fmt] = {}
        for variant in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "child", variant, "--model", model, "--random"] + \
                (["--cpu-smoke"] if smoke else [])
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                res = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-2000:]}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {timeout} s"}
            row[variant] = res
        need = 1.1 * (time.time() - t_type) + 3
        d, p = row["dequant"], row["packed"]
        if "error" in d or "error" in p:
            print(f"{fmt}: ERROR " + (d.get("error") or p.get("error"))[-800:], flush=True)
            continue
        same = next((i for i, (a, b) in enumerate(zip(d["ids"], p["ids"])) if a != b), len(p["ids"]))
        print(f"{fmt}: b1_decode tok/s dequant {d['b1_decode_tok_s']} packed {p['b1_decode_tok_s']} "
              f"({p['b1_decode_tok_s'] / d['b1_decode_tok_s'] - 1:+.1%}); weights {d['weight_bytes'] / 1e6:.1f} -> "
              f"{p['weight_bytes'] / 1e6:.1f} MB; packed layers {p['packed_layers']}; ready_s {d['ready_s']} / "
              f"{p['ready_s']}; ids equal for the first {same} of {len(p['ids'])}"
              + (f"; untuned packed0 {row['packed0'].get('b1_decode_tok_s')}" if "packed0" in row else ""), flush=True)
    _write("gguf_random.json", results)


def _write(name: str, results: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), "w") as f:
            json.dump(results, f, indent=1)


def _launch(key: str, rows: int):
    from pagedserve.layers.quantization.triton_w4a16_gemv import GemvConfig
    bn, warps, pps = (int(v) for v in key.split("/"))
    return GemvConfig(block_n=bn, num_warps=warps, num_stages=3, programs_per_sm=pps, dot=rows > 1, block_m=16)


def tuned_configs(path: str) -> dict:
    """gguf_tune.json -> triton_gguf.CONFIGS: per type (best at one row, best at 4 rows)."""
    with open(path) as f:
        types = json.load(f)["types"]
    return {fmt: (_launch(r["1"]["best"], 1), _launch(r["4"]["best"], 4)) for fmt, r in types.items()
            if "best" in r.get("1", {}) and "best" in r.get("4", {})}


def _blocks_on(device, fmt: str, n: int, k: int, gen):
    """Random raw blocks made on `device` (fast at 1B-class sizes) with the tests' sane scales."""
    import torch
    from pagedserve.layers.quantization.gguf_kernels import FORMATS
    from tests.kernels.test_gguf_triton import FP16_FIELDS, values_per_block
    kb = k // values_per_block(fmt)
    raw = torch.randint(0, 256, (n, kb, FORMATS[fmt].nbytes), generator=gen, dtype=torch.uint8,
                        device=device)
    scale = 0.02 / (32 if fmt.endswith("_K") else 8)
    for at in FP16_FIELDS[fmt]:
        d = (torch.rand(n, kb, 1, generator=gen, device=device) * scale + scale / 20).half()
        raw[..., at:at + 2] = d.view(torch.uint8)
    return raw


def _graph_us(fn) -> float:
    """Median microseconds of one fn() replayed in a CUDA graph (triton.testing's; the CPU smoke
    run: wall time of one call)."""
    import torch
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=10, return_mode="median") * 1e3


def tune(types: list[str], warm: bool, smoke: bool) -> None:
    """triton_gguf.gemv per type, rows 1 and 4, over TUNE_GRID (see the module docstring): checks
    each config's output against the default's first, then times; prints the best per type."""
    import torch
    from pagedserve.layers.quantization import triton_gguf
    sys.path.insert(0, ROOT)
    device = "cpu" if smoke else "cuda"
    shapes = ((64, 256), (32, 512)) if smoke else TUNE_SHAPES
    copies = 1 if smoke else TUNE_COPIES
    grid = {1: [(32, 2, 4), (64, 4, 4)], 4: [(64, 4, 2), (64, 4, 4)]} if smoke else TUNE_GRID
    gen = torch.Generator(device=device).manual_seed(0)
    results = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "shapes": shapes, "copies": copies,
               "types": {}}
    for fmt in types:
        weights = [[_blocks_on(device, fmt, n, k, gen) for n, k in shapes] for _ in range(copies)]
        row = results["types"][fmt] = {}
        for m, configs in grid.items():
            xs = [torch.randn(m, k, generator=gen, device=device).to(torch.float16 if smoke else torch.bfloat16)
                  for _, k in shapes]
            default = triton_gguf.ONE_ROW if m == 1 else triton_gguf.FEW_ROWS
            ref = [triton_gguf.gemv(x, w, fmt, default) for x, w in zip(xs, weights[0])]

            def products(config):
                return lambda: [triton_gguf.gemv(x, w, fmt, config) for ws in weights for x, w in zip(xs, ws)]

            timed = {}
            for bn, warps, pps in configs:
                key = f"{bn}/{warps}/{pps}"
                config = _launch(key, m)
                try:
                    outs = [triton_gguf.gemv(x, w, fmt, config) for x, w in zip(xs, weights[0])]
                    bad = max(((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
                              for o, r in zip(outs, ref))
                    us = None if warm else round(_graph_us(products(config)) / copies, 2)
                except Exception as exc:   # a launch that does not compile: noted, the grid goes on
                    print(f"TUNE {fmt} rows={m} {key}: {type(exc).__name__} {str(exc)[:300]}", flush=True)
                    continue
                timed[key] = dict(rel_err=bad) if warm else dict(us=us, rel_err=bad)
            if warm:
                row[m] = timed
                continue
            dense = [[triton_gguf.dequantize(w, fmt, xs[0].dtype) for w in ws] for ws in weights]
            cublas = _graph_us(lambda: [x @ w.t() for ws in dense for x, w in zip(xs, ws)]) / copies
            d_key = f"{default.block_n}/{default.num_warps}/{default.programs_per_sm}"
            best = min(timed, key=lambda key: timed[key]["us"])
            worst_err = max(v["rel_err"] for v in timed.values())
            gb = sum(w.numel() for w in weights[0]) / 1e3   # bytes of one copy / 1e3: GB/s from us
            row[m] = dict(configs=timed, default=d_key, best=best, cublas_bf16_us=round(cublas, 2),
                          best_gb_s=round(gb / timed[best]["us"], 1))
            print(f"TUNE {fmt} rows={m}: default {d_key} {timed[d_key]['us']:.2f} us, best {best} {timed[best]['us']:.2f} us "
                  f"({timed[best]['us'] / timed[d_key]['us'] - 1:+.1%}, {gb / timed[best]['us']:.0f} GB/s), "
                  f"cuBLAS bf16 dequantized {cublas:.2f} us; "
                  f"max rel. diff to default {worst_err:.2e}", flush=True)
        torch.cuda.empty_cache()
        if not warm:   # after each type: a timed-out run keeps the types it finished
            _write("gguf_tune.json", results)
    print("TUNE done" + (" (warm)" if warm else ""), flush=True)


def _child_env(smoke: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               PAGEDSERVE_COMPILE_AHEAD_STRICT="1", TOKENIZERS_PARALLELISM="false")
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    return env


def run(model: str, smoke: bool, variants: list[str], timeout: float) -> None:
    model = unpacked(model)
    env = _child_env(smoke)
    results = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "model": model, "variants": {}}
    for variant in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "child", variant, "--model", model] + (["--cpu-smoke"] if smoke else [])
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-2000:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {timeout} s"}
        res["wall_s"] = round(time.time() - t0, 1)
        results["variants"][variant] = res
        print(f"{variant}: " + (f"ERROR {res['error'][-600:]}" if "error" in res else
                                ", ".join(f"{k}={v}" for k, v in res.items() if k != "ids")), flush=True)
    summary(results)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gguf_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)


def summary(results: dict) -> None:
    v = results["variants"]
    ref = v.get("fp32", {}).get("ids")
    print("SUMMARY")
    for name in ("dequant", "packed"):
        ids = v.get(name, {}).get("ids")
        if ref and ids:
            same = sum(a == b for a, b in zip(ids, ref))
            print(f"  greedy ids of {name} equal to fp32's: {same}/{len(ref)} prompts")
    if v.get("dequant", {}).get("ids") and v.get("packed", {}).get("ids"):
        same = sum(a == b for a, b in zip(v["dequant"]["ids"], v["packed"]["ids"]))
        print(f"  greedy ids packed == dequant: {same}/{len(v['packed']['ids'])} prompts")
    for key in ("weight_bytes", "packed_layers", "b1_decode_tok_s", "batch_out_tok_s"):
        row = {name: r[key] for name, r in v.items() if key in r}
        print(f"  {key}: " + ", ".join(f"{name} {val}" for name, val in row.items()))
    bad = [name for name, r in v.items() if "error" in r]
    print("  RESULT " + ("FAILED: " + ", ".join(bad) if bad else "all variants ran"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("prepare", "run", "child", "random", "tune"))
    ap.add_argument("variant", nargs="?")
    ap.add_argument("--model", default=CARRY)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variants", default=None, help="run: default fp32,dequant,packed,packed64; "
                    "random: dequant,packed (packed0: packed without triton_gguf.CONFIGS)")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--random", action="store_true", help="child: a random model (no tokenizer)")
    ap.add_argument("--types", default=None)
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--budget", type=float, default=110, help="random: seconds for all types")
    args = ap.parse_args()
    if args.what == "prepare":
        prepare(args.layers, args.model)
    elif args.what == "child":
        print("RESULT " + json.dumps(child(args.variant, args.model, args.cpu_smoke, args.random)), flush=True)
    elif args.what == "tune":
        tune(args.types.split(",") if args.types else list(ALL_TYPES), args.warm, args.cpu_smoke)
    elif args.what == "random":
        run_random(args.types.split(",") if args.types else list(NEW_TYPES), args.cpu_smoke,
                   args.timeout * (5 if args.cpu_smoke else 1), time.time() + args.budget * (20 if args.cpu_smoke else 1),
                   args.warm, tuple((args.variants or "dequant,packed").split(",")))
    else:
        model = args.model
        if args.cpu_smoke and model == CARRY:   # a 1-layer cut of its own
            model = "/tmp/gguf_gpu_smoke_model"
            if not os.path.isdir(model):
                prepare(1, model, SMOKE_VOCAB)
        run(model, args.cpu_smoke, (args.variants or "fp32,dequant,packed,packed64").split(","),
            args.timeout * (10 if args.cpu_smoke else 1))


if __name__ == "__main__":
    main()
