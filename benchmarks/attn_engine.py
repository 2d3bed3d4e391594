"""The engine stages of benchmarks/attn_gpu.py (engine, long64, budget16k): llama-8b dummy at
max_model_len 32768, the prefill attention paths A/B on one engine (TritonBackend's class knobs),
ttft16k walls, torch.profiler summed per kernel class, peers_long.py's long64. attn_gpu.py makes
one EngineStages (its --cpu-smoke, its emit, $OUT) and runs them after the kernel stages."""
from __future__ import annotations

import os
import random
import statistics
import time
import traceback
from typing import Callable

import torch

from pagedserve.attention.backend import TritonBackend
from step_profile import long64_requests, make_llm

PAGED_ONLY = 1 << 30  # prefill_min_query_len that keeps every chunk on the paged kernel
# engine A/B modes: (name, TritonBackend.prefill_min_query_len, .use_sdpa, .long_chunk_path)
SDPA = ("cudnn_by_sequence", TritonBackend.prefill_min_query_len, True, "cudnn")
GATHERED = ("triton_by_sequence", TritonBackend.prefill_min_query_len, True, "triton")
TRITON = ("triton_prefill", TritonBackend.prefill_min_query_len, False, "cudnn")
PAGED = ("paged_only", PAGED_ONLY, False, "cudnn")
# every prefill chunk of a long step in one cuDNN graph call a layer (cudnn_prefill), K/V paged / gathered
GRAPH_PAGED = ("cudnn_graph_paged", TritonBackend.prefill_min_query_len, True, "cudnn_graph", "paged")
GRAPH_GATHERED = ("cudnn_graph_gathered", TritonBackend.prefill_min_query_len, True, "cudnn_graph", "gathered")
MODES = {mode[0]: mode for mode in (SDPA, GATHERED, TRITON, PAGED, GRAPH_PAGED, GRAPH_GATHERED)}

KERNEL_CLASSES = [  # (class, substrings of the kernel name), first match wins
    ("attn_prefill_kernel", ("_prefill_attention_kernel",)),
    ("attn_paged_kernel", ("_paged_attention_kernel", "_reduce_segments")),
    ("attn_merge", ("_merge_kernel",)),
    ("attn_sdpa", ("sdpa", "fmha", "flash", "cudnn", "attention")),
    ("store_kv", ("store_kv",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "gemv", "matmul", "_w4a16")),
    ("norm_rope_act", ("rms", "norm", "rotary", "rope", "silu", "act", "fused")),
]


class backend_mode:
    """Sets TritonBackend's class knobs for one A/B mode (every engine layer's backend reads them)."""

    def __init__(self, mode) -> None:
        self.mode = mode

    def __enter__(self):
        self.saved = (TritonBackend.prefill_min_query_len, TritonBackend.use_sdpa, TritonBackend.long_chunk_path,
                      TritonBackend.cudnn_graph_mode)
        (TritonBackend.prefill_min_query_len, TritonBackend.use_sdpa, TritonBackend.long_chunk_path,
         TritonBackend.cudnn_graph_mode) = self.mode[1:4] + (self.mode[4:] or self.saved[3:])
        return self.mode[0]

    def __exit__(self, *exc) -> None:
        (TritonBackend.prefill_min_query_len, TritonBackend.use_sdpa, TritonBackend.long_chunk_path,
         TritonBackend.cudnn_graph_mode) = self.saved


class EngineStages:
    """`smoke`: a tiny float32 model on CPU and short prompts; `emit(**fields)` prints a RESULT
    line; `out`: where the profiler tables go (None: printed only)."""

    def __init__(self, smoke: bool, emit: Callable[..., None], out: str | None) -> None:
        self.smoke, self.emit, self.out = smoke, emit, out

    def make_llm(self, **extra):
        return make_llm(self.smoke, "llama-8b", 32768, **extra)

    def kernel_summary(self, prof, wall_ms: float, label: str) -> dict:
        classes: dict[str, float] = {}
        per_kernel: dict[str, list[float]] = {}
        for evt in prof.events():
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.time_range.end - evt.time_range.start
            per_kernel.setdefault(evt.name, [0.0, 0])
            per_kernel[evt.name][0] += us
            per_kernel[evt.name][1] += 1
            low = evt.name.lower()
            cls = next((c for c, keys in KERNEL_CLASSES if any(k.lower() in low for k in keys)), "other")
            classes[cls] = classes.get(cls, 0.0) + us / 1e3
        device_ms = sum(classes.values())
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
        lines = [f"== {label}: wall {wall_ms:.1f} ms, device busy {device_ms:.1f} ms"]
        lines += [f"  {c:<22} {ms:9.2f} ms  {100 * ms / max(device_ms, 1e-9):5.1f}%" for c, ms in
                  sorted(classes.items(), key=lambda kv: -kv[1])]
        lines += ["  top kernels (total ms, calls):"]
        lines += [f"    {us / 1e3:9.2f} {n:5d}  {name[:110]}" for name, (us, n) in top]
        text = "\n".join(lines)
        print(text, flush=True)
        if self.out:
            with open(os.path.join(self.out, f"profile_{label}.txt"), "w") as f:
                f.write(text + "\n\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                  max_name_column_width=60))
        return dict(wall_ms=round(wall_ms, 1), device_busy_ms=round(device_ms, 1),
                    host_or_idle_ms=round(wall_ms - device_ms, 1),
                    classes_ms={c: round(ms, 2) for c, ms in classes.items()})

    def engine(self, llm, rng: random.Random, modes=(SDPA, GATHERED, TRITON, PAGED), profiles: bool = True) -> None:
        from torch.profiler import ProfilerActivity, profile
        from pagedserve import SamplingParams
        smoke = self.smoke
        n = 600 if smoke else 16384
        one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)

        def fresh():
            return {"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(n)]}

        def ttft() -> float:
            prompt = fresh()
            if not smoke:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate([prompt], [one], use_tqdm=False)
            return (time.perf_counter() - t0) * 1e3

        activities = [ProfilerActivity.CPU] + ([] if smoke else [ProfilerActivity.CUDA])
        for mode_spec in modes:
            with backend_mode(mode_spec) as mode:
                ttft()  # compiles / warms this path
                times = [ttft() for _ in range(1 if smoke else 3)]
                self.emit(stage="engine", workload=f"ttft{n}", mode=mode, ms=[round(t, 1) for t in times],
                          median_ms=round(statistics.median(times), 1))
                if not profiles:
                    continue
                prompt = fresh()
                with profile(activities=activities) as prof:
                    t0 = time.perf_counter()
                    llm.generate([prompt], [one], use_tqdm=False)
                    if not smoke:
                        torch.cuda.synchronize()
                    wall = (time.perf_counter() - t0) * 1e3
                try:
                    summary = self.kernel_summary(prof, wall, mode)
                except Exception:
                    summary = dict(wall_ms=round(wall, 1), summary_failed=traceback.format_exc(limit=2)[-400:])
                self.emit(stage="engine", workload=f"profile_ttft{n}", mode=mode, **summary)

    def long64(self, llm, modes=(SDPA, GATHERED, TRITON), label: str = "long64") -> None:
        """peers_long.py's long64, the same requests (its rng: seed 1, 2000 warm-up draws first)."""
        from pagedserve import SamplingParams
        reqs = long64_requests(self.smoke)
        params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
        for run, mode_spec in enumerate(modes):
            # later runs shift every first token: same lengths, no prefix-cache hit on an earlier run
            prompts = [{"prompt_token_ids": [3 + (p[0] + run) % 31990] + p[1:]} for p, _ in reqs]
            with backend_mode(mode_spec) as mode:
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                dt = time.perf_counter() - t0
                gen = sum(len(o.outputs[0].token_ids) for o in outs)
                self.emit(stage=label, mode=mode, wall_s=round(dt, 2), out_tok_s=round(gen / dt, 1),
                          total_tok_s=round((gen + sum(len(p) for p, _ in reqs)) / dt, 1))

    def budget16k(self) -> None:
        """An engine with a 16k-token step budget: a 16k prompt in one chunk."""
        budget = 1200 if self.smoke else 16384
        t0 = time.time()
        llm = self.make_llm(max_num_batched_tokens=budget)
        self.emit(stage="budget16k", max_num_batched_tokens=budget, startup_s=round(time.time() - t0, 1))
        self.engine(llm, random.Random(8), (SDPA,), False)
        self.long64(llm, (SDPA,), "long64_budget16k")
