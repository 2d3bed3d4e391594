"""A/B of one CPU attention change in one process on one engine, old and new alternating (session 58), on the
embedded default model at the offline budget given. CHANGE:

- chunk_attention: prefill chunks' two flash calls with no mask, merged by their log-sum-exp, against the one masked
  call they replaced (old: torch_ref.cpu_flash_with_lse reporting no op). Workloads: a 6,000-token prompt (1 token
  out), a 2,000-token prompt, 16 prompts of 200-1,000 tokens with 16 out.
- mixed_decodes: a mixed step's decodes through the C++ decode kernel, against the plan's masked decode group (old:
  TorchBackend.decode declining mixed steps). Workloads: 16 prompts of 200-1,000 tokens with 16 out, 32 with 64 out.
- fp32_decode_kernel (session 59): a safetensors model's fp32 decodes through the C++ decode kernel, against torch's
  SDPA over the plan's padded groups (old: the backends' decode_kernel None). The model: the default model's weights
  as an fp32 safetensors folder (quant_perplexity.float_folder, cached under the temp dir). Workloads: one 500-token
  prompt with 128 out, and the two batches of mixed_decodes.

Run one process at a time on a quiet machine:

    for b in 1024 512 2048; do .venv/bin/python benchmarks/cpu_ab.py chunk_attention $b 3; done
    for b in 512 1024; do .venv/bin/python benchmarks/cpu_ab.py mixed_decodes $b 3; done
    .venv/bin/python benchmarks/cpu_ab.py fp32_decode_kernel 1024 3
"""
from __future__ import annotations

import sys
import time

import pagedserve.attention.torch_ref as torch_ref
from cpu_budget import warm_engine   # benchmarks/ is the script's directory
from pagedserve.attention.backend import TorchBackend
from pagedserve.layers.quantization import gguf_cpu
from quant_perplexity import float_folder

BACKENDS: list[TorchBackend] = []   # fp32_decode_kernel: every TorchBackend made (TorchBackend.__init__ wrapped)


def switch(change: str):
    """old / new setter for the change."""
    if change == "fp32_decode_kernel":
        def use(side: str) -> None:
            for backend in BACKENDS:
                backend.decode_kernel = gguf_cpu.decode_attention if side == "new" else None
        return use
    if change == "chunk_attention":
        flash = torch_ref.cpu_flash_with_lse

        def use(side: str) -> None:
            torch_ref.cpu_flash_with_lse = flash if side == "new" else (lambda: None)
        return use
    decode = TorchBackend.decode

    def all_decode_only(self, q, k, v, k_cache, v_cache, meta, scale, rotary):
        return decode(self, q, k, v, k_cache, v_cache, meta, scale, rotary) if meta.num_decodes == meta.num_seqs \
            else None

    def use(side: str) -> None:
        TorchBackend.decode = decode if side == "new" else all_decode_only
    return use


def main(change: str, budget: int, rounds: int) -> None:
    engine_args = {}
    if change == "fp32_decode_kernel":
        init = TorchBackend.__init__

        def register(self, decode_kernel=None):
            init(self, decode_kernel)
            BACKENDS.append(self)
        TorchBackend.__init__ = register
        engine_args["model"] = float_folder()
    llm, rng, prompt, params = warm_engine(budget, **engine_args)
    assert change != "fp32_decode_kernel" or BACKENDS and BACKENDS[0].decode_kernel is not None
    use = switch(change)
    singles = {"chunk_attention": (("long6000_s", 6000, 1), ("p2000_s", 2000, 1)),
               "fp32_decode_kernel": (("p500x128_s", 500, 128),)}.get(change, ())
    batches = (("batch16_s", 16, 16),) + ((("batch32x64_s", 32, 64),) if change != "chunk_attention" else ())
    results: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            use(side)
            out = {}
            for name, n, new_tokens in singles:
                t = time.time()
                llm.generate([prompt(n)], [params(new_tokens)], use_tqdm=False)
                out[name] = round(time.time() - t, 2)
            for name, count, new_tokens in batches:
                prompts = [prompt(rng.randint(200, 1000)) for _ in range(count)]
                t = time.time()
                llm.generate(prompts, [params(new_tokens)] * count, use_tqdm=False)
                out[name] = round(time.time() - t, 2)
            results[side].append(out)
            print(change, "budget", budget, side, out, flush=True)
    use("new")
    for side, runs in results.items():
        means = {key: round(sum(run[key] for run in runs) / len(runs), 2) for key in runs[0]}
        mins = {key: min(run[key] for run in runs) for key in runs[0]}
        print(change, "budget", budget, side, "mean", means, "min", mins, flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
