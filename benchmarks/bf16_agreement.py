"""Issue 4 part 6: on the GPU, in bf16, on how many prompts of the default model do the first
32 greedy tokens of pagedserve equal transformers' bf16 output? Measured twice: the 40 prompts
in one batch (how a server runs them), and one at a time (batch 1, as transformers runs them).
Batching changes the GEMM shapes and so the bf16 rounding of each row (batch variance); on
CPU the one-at-a-time run is bit-identical to transformers.
Both sides load the same weights: the GGUF's tensors dequantized (transformers through its own
GGUF loader, `from_pretrained(dir, gguf_file=name)`), cast to bf16. transformers runs one prompt at a time (no
padding), pagedserve the whole batch.
Where the differences come from (`variants`): the same one-at-a-time run with the Triton
RMSNorm / SiLU / rotary kernels swapped for the torch ops, then the torch attention backend
too; and transformers' own eager attention against its SDPA, for scale.
With `unfused` the one-at-a-time run is repeated against the same transformers reference
with every decode fusion off (set_decode_fusion(False): SiLU-and-mul before the gemv, rotary
before the KV store, as separate kernels): the A/B of the fused kernels' rounding. The default
model is a GGUF: its layers keep the GGUF LinearMethod, so the gemv fusions do not apply to it;
the rotary fusion does.
With `packed` the one-at-a-time run is repeated with gguf.CUDA_PACKED on
(PAGEDSERVE_GGUF_CUDA_PACKED=1): the default model's layers (<= 4M weights) keep their blocks and a
step of up to 16 rows multiplies them with triton_gguf's GEMV (weights dequantized and rounded to
bf16 in the kernel) instead of the bf16 weights dequantized once at load (the default since
session 15). H200, session 15: one at a time 21/40 packed against 30/40 dequantized.
Usage: python3 benchmarks/bf16_agreement.py [out.json] [device] [variants] [unfused] [packed]"""
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.models.default_model import default_model_path  # noqa: E402
from pagedserve.models.loader import ModelSource, materialize_gguf  # noqa: E402

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
    "Water boils at", "My favorite food is", "In 1492, Columbus", "The largest planet in the solar system is",
    "Hello, my name is", "To make a cake, you need", "The best way to learn a language is",
    "Photosynthesis is the process", "import numpy as np\n", "The meaning of life is", "Dear Sir or Madam,",
    "The quick brown fox", "In the beginning", "A good night's sleep", "The stock market today",
    "Machine learning is", "The Eiffel Tower was built", "How do airplanes fly?", "List three fruits:",
    "The recipe for pancakes", "Translate to French: Good morning", "The theory of relativity states",
    "Write a haiku about the sea", "SELECT * FROM users WHERE", "The history of Rome", "Why is the sky blue?",
    "My dog likes to", "The first step in solving any problem", "Tomorrow I will", "The ocean is home to",
    "What is 12 times 12?", "A poem about autumn:", "The human heart has", "Python is a programming language that",
    "The Great Wall of China", "Explain gravity to a child.",
]
NEW = 32


def agreement(outs: list[list[int]], refs: list[list[int]]) -> dict:
    rows, equal, tokens_equal = [], 0, 0
    for prompt, ours, ref in zip(PROMPTS, outs, refs):
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        equal += ours == ref
        tokens_equal += sum(a == b for a, b in zip(ours, ref))
        rows.append(dict(prompt=prompt, first_diff=first_diff))
    return dict(identical=equal, identical_pct=round(100 * equal / len(refs), 1),
                tokens_equal_pct=round(100 * tokens_equal / (NEW * len(refs)), 1), rows=rows)


def hf_generate(gguf: str, device: str, prompt_ids: list[list[int]], eos: int, attn: str = "sdpa") -> list[list[int]]:
    # transformers' own GGUF loader: pagedserve's converted folder keeps packed blocks (qweight),
    # which transformers cannot read (it would start from random weights).
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.bfloat16, attn_implementation=attn).to(device).eval()
    refs = []
    for prompt in prompt_ids:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():   # EOS masked (min_new_tokens), as min_tokens on our side
            refs.append(hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                                    min_new_tokens=NEW, pad_token_id=eos)[0, ids.shape[1]:].tolist())
    del hf
    return refs


def torch_attention(steps: str) -> None:
    """Attention of prefill-only steps, of decode steps, of all steps or of none ("prefill",
    "decode", "all", "none") by the torch backend (SDPA); the rest by the Triton kernels."""
    from pagedserve.attention import backend
    from pagedserve.worker import model_runner

    class Hybrid(backend.TritonBackend):
        def attend(self, query, key, value, k_cache, v_cache, meta, scale):
            use_torch = steps == "all" or (steps == "prefill" and meta.num_decodes == 0) \
                or (steps == "decode" and meta.num_decodes > 0)
            if use_torch:
                return backend.TorchBackend().attend(query, key, value, k_cache, v_cache, meta, scale)
            return super().attend(query, key, value, k_cache, v_cache, meta, scale)
    model_runner.select_backend = lambda device: Hybrid()


def torch_ops(attention: bool) -> None:
    """Swap the fused Triton kernels (and optionally the Triton attention) for torch ops."""
    from pagedserve.layers import triton_ops
    from pagedserve.layers.rotary import RotaryEmbedding

    def rms_norm(x, w, eps, residual=None):
        if residual is not None:
            residual.copy_(x + residual)
            x = residual
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rotary(positions, q, k, cos_cache, sin_cache):
        cos, sin = cos_cache[positions].unsqueeze(1), sin_cache[positions].unsqueeze(1)
        for x in (q, k):
            x.copy_(x * cos + RotaryEmbedding._rotate_half(x) * sin)

    triton_ops.rms_norm = rms_norm
    triton_ops.silu_and_mul = lambda x: F.silu(x[:, :x.shape[1] // 2]) * x[:, x.shape[1] // 2:]
    triton_ops.rotary_in_place = rotary
    torch_attention("all" if attention else "none")


def run_ours(gguf: str, device: str, sp: SamplingParams, batched: bool, **kwargs) -> tuple[list[list[int]], list]:
    llm = LLM(model=gguf, device=device, dtype="bfloat16", seed=0, **kwargs)
    single = [llm.generate([p], sp, use_tqdm=False)[0] for p in PROMPTS]      # one at a time
    outs = llm.generate(PROMPTS, sp, use_tqdm=False) if batched else None      # all 40 in one batch
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    ids = lambda res: [list(o.outputs[0].token_ids) for o in res]   # noqa: E731
    return ids(single), (ids(outs) if outs is not None else None), single


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "bf16_agreement.json"
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    variants = "variants" in sys.argv[3:]
    unfused = "unfused" in sys.argv[3:]
    gguf = default_model_path()
    sp = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)
    small = dict(num_kv_blocks=4096) if device == "cuda" else {}
    single, batched, outs = run_ours(gguf, device, sp, True, **small)
    prompt_ids = [o.prompt_token_ids for o in outs]
    from transformers import AutoTokenizer
    t0 = time.time()
    folder = materialize_gguf(ModelSource(os.path.dirname(gguf), os.path.basename(gguf))).directory
    tok = AutoTokenizer.from_pretrained(folder)
    assert prompt_ids == [tok(p).input_ids for p in PROMPTS]
    refs = hf_generate(gguf, device, prompt_ids, tok.eos_token_id)
    print(f"transformers ({folder}) done in {time.time() - t0:.1f} s", flush=True)
    result = dict(prompts=len(PROMPTS), new_tokens=NEW, device=torch.cuda.get_device_name() if device == "cuda" else device,
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    for mode, ids in (("batched", batched), ("one_at_a_time", single)):
        result[mode] = agreement(ids, refs)
        print(f"{mode}: {result[mode]['identical']}/{len(PROMPTS)} identical; "
              f"first differences {[r['first_diff'] for r in result[mode]['rows']]}")
    packed = "packed" in sys.argv[3:]
    from pagedserve.layers import linear_ops
    from pagedserve.layers.quantization import gguf as gguf_method
    # each switch set explicitly, whatever the defaults, then put back: every decode fusion off;
    # the GGUF layers kept packed for triton_gguf's GEMV instead of dequantized to bf16 at load
    switches = [("one_at_a_time_unfused", linear_ops.FUSE_DECODE, linear_ops.set_decode_fusion, False)] \
        if unfused else []
    switches += [("one_at_a_time_packed", gguf_method.CUDA_PACKED,
                  lambda on: setattr(gguf_method, "CUDA_PACKED", on), True)] if packed else []
    for key, before, setter, value in switches:
        setter(value)
        try:
            result[key] = agreement(run_ours(gguf, device, sp, False, **small)[0], refs)
        finally:
            setter(before)
        print(f"{key}: {result[key]['identical']}/{len(PROMPTS)} identical; "
              f"first differences {[r['first_diff'] for r in result[key]['rows']]}")
    if variants:
        eager = hf_generate(gguf, device, prompt_ids, tok.eos_token_id, "eager")
        result["hf_eager_vs_sdpa"] = agreement(eager, refs)
        for steps in ("prefill", "decode"):   # Triton elementwise kernels, torch attention in some steps
            torch_attention(steps)
            result[f"torch_{steps}_attention"] = agreement(
                run_ours(gguf, device, sp, False, enforce_eager=steps == "decode", **small)[0], refs)
        torch_ops(attention=False)
        result["torch_elementwise"] = agreement(run_ours(gguf, device, sp, False, **small)[0], refs)
        torch_ops(attention=True)
        result["torch_elementwise_and_attention"] = agreement(
            run_ours(gguf, device, sp, False, enforce_eager=True, **small)[0], refs)
        for key in ("hf_eager_vs_sdpa", "torch_prefill_attention", "torch_decode_attention", "torch_elementwise",
                    "torch_elementwise_and_attention"):
            print(f"{key}: {result[key]['identical']}/{len(PROMPTS)} identical, {result[key]['tokens_equal_pct']}% tokens")
    print("RESULT " + json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if isinstance(v, dict) else v)
                                  for k, v in result.items()}))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
