"""peers.py's thrN workload (input U[64,1024], output U[16,512], seed 0) driven through an
LLM; shared by profile_step.py and tp_gpu.py. Needs ../shared/bench/peers.py copied into the
git-ignored .devcarry/ (see gpu_check.sh)."""
import sys
import time

sys.path.insert(0, ".devcarry")
from peers import workload  # noqa: E402


def thr_requests(n: int = 512) -> tuple[list[dict], list]:
    from pagedserve import SamplingParams
    reqs = workload(n)
    return ([{"prompt_token_ids": p} for p, _ in reqs],
            [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs])


def run_thr(llm, n: int = 512) -> tuple[list, float]:
    """Warm up on 8 of the requests, then time all n: (outputs, seconds)."""
    prompts, sps = thr_requests(n)
    llm.generate(prompts[:8], sps[:8], use_tqdm=False)
    t0 = time.time()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    return outs, time.time() - t0
