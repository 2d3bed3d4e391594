"""Where a step's time goes on the GPU machine: cProfile of batch-1 decode (host side) and
the torch profiler's kernel table for one 1024-token prefill and one decode step.
Usage: python3 benchmarks/profile_step.py llama-1b|llama-8b"""
import cProfile
import io
import pstats
import sys
import time

import torch

sys.path.insert(0, ".devcarry")
from peers import make_model_dir  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "llama-1b"
llm = LLM(model=make_model_dir(name), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
          max_model_len=2048, gpu_memory_utilization=0.85, seed=0)
prompt = {"prompt_token_ids": list(range(100, 228))}
sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
llm.generate([prompt], [sp], use_tqdm=False)
prof = cProfile.Profile()
t0 = time.time()
prof.enable()
llm.generate([prompt], [sp], use_tqdm=False)
prof.disable()
print(f"b1 decode: {256 / (time.time() - t0):.1f} tok/s (under cProfile)")
s = io.StringIO()
pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
print(s.getvalue()[:6000])
runner = llm.engine.core.executor.runner
g = runner.graph_runner
if g is not None:
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(100):
        g.graphs[1].replay()
    torch.cuda.synchronize()
    print(f"graph replay bs=1: {(time.time() - t0) * 10:.3f} ms")
from torch.profiler import ProfilerActivity, profile  # noqa: E402
p1024 = {"prompt_token_ids": [(i * 13 + 7) % 32000 + 3 for i in range(1024)]}
one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
llm.generate([p1024], [one], use_tqdm=False)
p1024 = {"prompt_token_ids": [(i * 17 + 3) % 32000 + 3 for i in range(1024)]}
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
    t0 = time.time()
    llm.generate([p1024], [one], use_tqdm=False)
    torch.cuda.synchronize()
    print(f"ttft1024 under profiler: {(time.time() - t0) * 1e3:.1f} ms")
print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
