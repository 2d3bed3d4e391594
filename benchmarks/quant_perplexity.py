"""Perplexity of the default model (SmolLM2-135M-Instruct) over a fixed English text (this
repository's README.md) with each quantization, on CPU or CUDA (issue 18).

    python benchmarks/quant_perplexity.py [--window 512] [--dtype float32] [--device cpu|cuda]

Variants: the float model; online fp8 (per-tensor), fp8-per-channel and bitsandbytes
(LLM.int8) through quantization=...; W8A8 int8 (per-channel weights, dynamic per-token
activations) and W4A16 (group 64, symmetric / asymmetric; 576 input features do not split
in groups of 128) written as compressed-tensors checkpoints by round-to-nearest packers
here (no calibration: GPTQ or AWQ would do better than RTN at 4 bits). The text is cut into
windows of `--window` tokens scored independently (prompt_logprobs); perplexity =
exp(mean negative log-likelihood). Prints one `RESULT {json}` per variant (a variant that
fails prints its error and the others go on). On CUDA each variant runs eagerly with a fixed
KV pool, and is shut down before the next.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.layers.quantization.int4 import pack_int32  # noqa: E402
from pagedserve.models.loader import load_tokenizer, materialize_gguf, resolve_model  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def float_folder() -> str:
    """The default model dequantized to fp32 as a plain HF folder, through transformers' own GGUF
    loader (pagedserve's converted folder keeps llama.cpp's packed blocks since issue 19), cached
    under the temp dir."""
    from transformers import AutoModelForCausalLM
    gguf = resolve_model(None)
    out = os.path.join(tempfile.gettempdir(), "pagedserve-default-fp32")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        from safetensors.torch import save_file
        model = AutoModelForCausalLM.from_pretrained(gguf.directory, gguf_file=gguf.gguf_file, dtype=torch.float32)
        os.makedirs(out, exist_ok=True)
        model.config.__dict__.pop("quantization_config", None)   # transformers refuses to save a "gguf-quantized" model
        model.config.save_pretrained(out)
        tied = model.config.tie_word_embeddings
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
                  os.path.join(out, "model.safetensors"))
        load_tokenizer(resolve_model(materialize_gguf(gguf).directory)).save_pretrained(out)
    return out


def write_compressed_tensors(source: str, target: str, scheme: str) -> str:
    """A compressed-tensors checkpoint of `source`'s float weights: "w8a8" (int8 per channel,
    dynamic per-token activations) or "w4a16-g64-sym" / "w4a16-g64-asym" (pack-quantized)."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(source, "model.safetensors"))
    out = {}
    for name, value in tensors.items():
        if not any(f".{p}.weight" in name for p in PROJECTIONS):
            out[name] = value
            continue
        base, w = name[:-len(".weight")], value.float()
        if scheme == "w8a8":
            scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
            out[base + ".weight"] = (w / scale).round().clamp(-128, 127).to(torch.int8)
            out[base + ".weight_scale"] = scale
            continue
        n, k = w.shape
        grouped = w.reshape(n, k // 64, 64)
        if scheme.endswith("-sym"):
            scale = (grouped.abs().amax(-1) / 7.5).clamp(min=1e-12)     # compressed-tensors' symmetric range
            zero = torch.zeros_like(scale)
        else:
            lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            zero = (-8 - lo / scale).round().clamp(-8, 7)
        q = (grouped / scale[..., None] + zero[..., None]).round().clamp(-8, 7).reshape(n, k)
        out[base + ".weight_packed"] = pack_int32((q + 8).to(torch.int32), 1)
        out[base + ".weight_scale"] = scale
        out[base + ".weight_shape"] = torch.tensor([n, k])
        if scheme.endswith("-asym"):
            out[base + ".weight_zero_point"] = pack_int32((zero + 8).to(torch.int32), 0)
    os.makedirs(target, exist_ok=True)
    save_file(out, os.path.join(target, "model.safetensors"))
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    if scheme == "w8a8":
        group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel",
                                                    "symmetric": True, "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                                       "dynamic": True}}
        fmt = "int-quantized"
    else:
        group = {"targets": ["Linear"], "input_activations": None,
                 "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64,
                             "symmetric": scheme.endswith("-sym"), "dynamic": False}}
        fmt = "pack-quantized"
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
                                     "config_groups": {"group_0": group}}
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    return target


def perplexity(path: str, windows: list[list[int]], dtype: str, quantization: str | None,
               device: str = "cpu") -> float:
    max_len = max(len(w) for w in windows) + 1
    extra = {} if device == "cpu" else dict(enforce_eager=True, num_kv_blocks=len(windows) * (max_len // 16 + 2))
    llm = LLM(model=path, device=device, dtype=dtype, skip_tokenizer_init=True, quantization=quantization,
              max_model_len=max_len, max_logprobs=-1, **extra)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    try:
        outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    nll, count = 0.0, 0
    for window, out in zip(windows, outs):
        for token, entry in zip(window[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            count += 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (the float model always "
                                                              "runs: it is the baseline)")
    args = parser.parse_args()
    source = float_folder()
    tokenizer = load_tokenizer(resolve_model(source))
    with open(os.path.join(REPO, "README.md")) as f:
        ids = tokenizer(f.read())["input_ids"]
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - 1, args.window) if len(ids[i:i + args.window]) > 1]
    tmp = tempfile.mkdtemp(prefix="quant-ppl-")
    variants = [("float", source, None), ("fp8", source, "fp8"), ("fp8-per-channel", source, "fp8-per-channel"),
                ("bitsandbytes-8bit", source, "bitsandbytes")]
    for scheme in ("w8a8", "w4a16-g64-sym", "w4a16-g64-asym"):
        variants.append((f"compressed-tensors {scheme}", (source, scheme), None))
    base = None
    for name, path, quantization in variants:
        if args.only is not None and name != "float" and name not in args.only:
            continue
        if isinstance(path, tuple):
            path = write_compressed_tensors(path[0], os.path.join(tmp, path[1]), path[1])
        try:
            ppl = perplexity(path, windows, args.dtype, quantization, args.device)
        except Exception as exc:   # one variant's failure leaves the others' figures
            print("RESULT " + json.dumps({"variant": name, "device": args.device, "dtype": args.dtype,
                                          "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
            continue
        base = base or ppl
        print("RESULT " + json.dumps({"variant": name, "device": args.device, "dtype": args.dtype, "tokens": len(ids),
                                      "window": args.window, "perplexity": round(ppl, 4),
                                      "loss_vs_float_pct": round((ppl / base - 1) * 100, 2)}), flush=True)


if __name__ == "__main__":
    main()
