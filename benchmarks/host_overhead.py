"""Host-side cost per engine step, measured on CPU with a tiny model so that the model's
own compute is negligible: what every step pays in Python (scheduler, input building,
sampling inputs, output processing) before a GPU sees any work.
Usage: python benchmarks/host_overhead.py [num_requests] [output_len]"""
import cProfile
import io
import pstats
import sys
import tempfile
import time

sys.path.insert(0, ".")
from pagedserve import LLM, SamplingParams  # noqa: E402
from tests.helpers import random_prompts, write_tiny_checkpoint  # noqa: E402

num, out_len = (int(a) for a in (sys.argv[1:] + ["256", "64"])[:2])
path = write_tiny_checkpoint(tempfile.mkdtemp(), "llama")
llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=256, skip_tokenizer_init=True, async_scheduling=True)
prompts = [{"prompt_token_ids": p} for p in random_prompts(num, 512, 32, 96)]
sp = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0, detokenize=False)
llm.generate(prompts[:4], sp, use_tqdm=False)
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
llm.generate(prompts, sp, use_tqdm=False)
prof.disable()
dt = time.perf_counter() - t0
steps = out_len + 1
print(f"{num} requests x {out_len} tokens: {dt:.2f} s, ~{dt / steps * 1e3:.1f} ms per step (under cProfile)")
s = io.StringIO()
pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(40)
print(s.getvalue()[:9000])
