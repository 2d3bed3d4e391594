"""Issue 19's GPU part (ggufgpu): the default model's GGUF blocks kept packed on CUDA
(triton_gguf: GEMV up to triton_gguf.GEMV_MAX_ROWS rows, dequantize + cuBLAS above) against
the dequantized-once path it replaces (gguf.CUDA_PACKED = False), bf16, one child process
per variant (each sets its module constants before the engine loads):

  fp32      dtype=float32: every layer dequantized to fp32 (the exact path): the reference ids
  dequant   bf16, gguf.CUDA_PACKED = False: weights dequantized to bf16 at load (main's path)
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

Usage:
  python benchmarks/gguf_gpu.py prepare [--layers 4]      (here: writes .devcarry/gguf_model)
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
}


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


def child(variant: str, model: str, smoke: bool) -> dict:
    from pagedserve.layers.quantization import gguf, triton_gguf
    gguf.CUDA_PACKED, triton_gguf.GEMV_MAX_ROWS = VARIANTS[variant][1]
    if smoke:   # the CPU has no CUDA: force triton_gguf's path on it (the interpreter)
        gguf._cuda_packed = lambda device, fmt, int4: gguf.CUDA_PACKED and int4 and fmt in gguf.CUDA_PACKED_TYPES
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


def run(model: str, smoke: bool, variants: list[str], timeout: float) -> None:
    model = unpacked(model)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               PAGEDSERVE_COMPILE_AHEAD_STRICT="1", TOKENIZERS_PARALLELISM="false")
    if smoke:
        env["TRITON_INTERPRET"] = "1"
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
    ap.add_argument("what", choices=("prepare", "run", "child"))
    ap.add_argument("variant", nargs="?")
    ap.add_argument("--model", default=CARRY)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    if args.what == "prepare":
        prepare(args.layers, args.model)
    elif args.what == "child":
        print("RESULT " + json.dumps(child(args.variant, args.model, args.cpu_smoke)), flush=True)
    else:
        model = args.model
        if args.cpu_smoke and model == CARRY:   # a 1-layer cut of its own
            model = "/tmp/gguf_gpu_smoke_model"
            if not os.path.isdir(model):
                prepare(1, model, SMOKE_VOCAB)
        run(model, args.cpu_smoke, args.variants.split(","), args.timeout * (10 if args.cpu_smoke else 1))


if __name__ == "__main__":
    main()
