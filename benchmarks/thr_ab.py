"""thr512 of ../shared/bench/peers.py with async scheduling on or off, in one process each, so
that the two can be compared on the same machine; `profile` adds a cProfile run whose
Event.synchronize time is the device time the host did not hide.
Usage: python3 benchmarks/thr_ab.py llama-1b on|off [profile] [N]"""
import cProfile
import io
import json
import pstats
import sys
import time

sys.path.insert(0, ".devcarry")
from peers import make_model_dir, workload  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402

name, mode = sys.argv[1], sys.argv[2]
profile = "profile" in sys.argv[3:]
n = int(next((a for a in sys.argv[3:] if a.isdigit()), "512"))
llm = LLM(model=make_model_dir(name), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
          max_model_len=2048, gpu_memory_utilization=0.85, seed=0, async_scheduling=mode == "on")
reqs = workload(n)
prompts = [{"prompt_token_ids": p} for p, _ in reqs]
sps = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
llm.generate(prompts[:8], sps[:8], use_tqdm=False)
t0 = time.time()
outs = llm.generate(prompts, sps, use_tqdm=False)
dt = time.time() - t0
gen = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps(dict(model=name, async_scheduling=mode, workload=f"thr{n}", wall_s=round(dt, 2),
                                  out_tok_s=round(gen / dt, 1))), flush=True)
if profile:
    prof = cProfile.Profile()
    t0 = time.time()
    prof.enable()
    llm.generate(prompts, sps, use_tqdm=False)
    prof.disable()
    print(f"--- under cProfile: {time.time() - t0:.2f} s")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:7000])
