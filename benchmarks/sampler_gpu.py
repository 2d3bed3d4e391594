"""The sampler alone on the GPU, at decode batch sizes and Llama-3's vocabulary: ms a call (CUDA
events, median of 20 after 3 warm-ups; the host's time inside the call included) of
sampling_inputs.sample over bf16 logits, for the sampling settings clients send, with the
nucleus kernel (sampler.NUCLEUS_SAMPLING) on and off; and the sort-based path's pieces alone.
Usage (device): [SETTINGS=top_p,top_k_top_p] [PARTS=0] [PROFILE=1] [CPROFILE=1] python3 benchmarks/sampler_gpu.py [rows ...]
PROFILE=1: after each timed setting, torch.profiler's table over 5 more calls (the kernel on only);
CPROFILE=1: cProfile's functions by own time over 50 more calls (the host's side)."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.environ.get("TREE", os.getcwd()))   # run from the repository root (TREE: another tree)
import torch  # noqa: E402

sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from cuda_events import median_ms  # noqa: E402

from pagedserve.layers import sampler as sampler_module  # noqa: E402
from pagedserve.layers.sampler import Sampler  # noqa: E402
from pagedserve.sampling_params import SamplingParams  # noqa: E402
from pagedserve.worker.input_batch import CachedRequestState  # noqa: E402
from pagedserve.worker.output_history import OutputHistory  # noqa: E402
from pagedserve.worker.sampling_inputs import sample  # noqa: E402

VOCAB = 128256
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.8, top_p=0.95),
    "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.95),
    "min_p": dict(temperature=0.8, min_p=0.05),
    "penalties": dict(temperature=0.0, frequency_penalty=0.5, repetition_penalty=1.1),
    "logprobs": dict(temperature=0.0, logprobs=5),
}


def parts(rows: int, dev: torch.device) -> None:
    """The top-p path's pieces alone on [rows, VOCAB] fp32 (ms, median of 20)."""
    x = torch.randn(rows, VOCAB, device=dev) * 3
    pieces = {"float copy": lambda: x.bfloat16().float(), "sort": lambda: x.sort(dim=-1),
              "softmax": lambda: x.softmax(dim=-1), "cumsum": lambda: x.cumsum(dim=-1),
              "scatter": lambda: torch.empty_like(x).scatter_(-1, idx, x), "exponential": lambda: torch.empty_like(x).exponential_(),
              "argmax": lambda: x.argmax(dim=-1), "topk 64": lambda: x.topk(64, dim=-1)}
    idx = x.sort(dim=-1).indices
    for name, fn in pieces.items():
        print("RESULT " + json.dumps(dict(rows=rows, piece=name, ms=round(median_ms(fn), 3))), flush=True)


def main() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    for rows in [int(a) for a in sys.argv[1:]] or [64, 256, 512]:
        if os.environ.get("PARTS", "1") == "1":
            parts(min(rows, 128), dev)
        logits = (torch.randn(rows, VOCAB, device=dev) * 3).bfloat16()
        chosen = os.environ.get("SETTINGS", ",".join(SETTINGS)).split(",")
        for kernel, (name, kwargs) in [(k, (n, SETTINGS[n])) for n in chosen for k in (False, True)]:
            sampler_module.NUCLEUS_SAMPLING = kernel
            history = OutputHistory(dev)
            states = []
            for i in range(rows):
                ids = torch.randint(0, VOCAB, (700,), generator=gen).tolist()
                state = CachedRequestState(str(i), ids, 550, SamplingParams(max_tokens=600, **kwargs), [0], 550)
                if state.counts_outputs:
                    history.add(state)
                states.append(state)
            ms = median_ms(lambda: sample(Sampler(), logits, states, VOCAB, dev, (2,), history=history))
            print("RESULT " + json.dumps(dict(tree=os.environ.get("TREE", "."), rows=rows, setting=name, kernel=kernel,
                                              ms=round(ms, 3))), flush=True)
            if kernel and os.environ.get("CPROFILE") == "1":   # the host's side: Python time by function
                import cProfile
                import pstats
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(50):
                    sample(Sampler(), logits, states, VOCAB, dev, (2,), history=history)
                torch.cuda.synchronize()
                profile.disable()
                print(f"CPROFILE rows={rows} setting={name} (50 calls)")
                pstats.Stats(profile).sort_stats("tottime").print_stats(22)
            if kernel and os.environ.get("PROFILE") == "1":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        sample(Sampler(), logits, states, VOCAB, dev, (2,), history=history)
                    torch.cuda.synchronize()
                print(f"PROFILE rows={rows} setting={name} (5 calls)")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


if __name__ == "__main__":
    main()
