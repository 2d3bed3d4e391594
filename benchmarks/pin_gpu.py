"""What pinning the KV cache's host tier costs the engine thread while it runs (issue 22: the
llama-1b batch-1 spread). worker/host_kv_cache.py's _Pinning registers a 4 GiB host pool with
cudaHostRegister on its thread, with each variant's parameters:

  old      256 MiB chunks, pages faulted by the registration, back to back (before session 17)
  touched  256 MiB chunks, each chunk's pages touched first, back to back
  nopause  32 MiB chunks, touched first, back to back
  new      the defaults: 32 MiB chunks, touched first, a pause of 3x each registration's time

Stages (one JSON of results):
- register: while the pool is pinned, the main thread replays a CUDA graph of 80 small kernels
  with a few bytes copied to the device and back, as an engine step does; per iteration of that
  loop its wall time (median / p99 / max) before and during the pinning; the pinning's time and
  how much of it was spent in cudaHostRegister.
- engine: one llama-1b engine (dummy weights, peers.py's set-up); per variant, a fresh 4 GiB pool
  pinned while batch-1 decode of 256 tokens runs three times (`none`: no pinning), `--rounds` times.
- gc: thr512 and batch-1 decode on a fresh llama-1b engine with the garbage collector's pauses
  timed by generation (gc.callbacks), plain and after gc.collect(); gc.freeze().

Usage: python3 benchmarks/pin_gpu.py OUT [--stages register,engine,gc] [--rounds 2] [--engine-variants
none,old,new] [--gc-rounds 1]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path[:0] = [".", ".devcarry", os.path.join(os.path.dirname(os.path.abspath(".")), "shared", "bench")]

import torch  # noqa: E402

from pagedserve.worker.host_kv_cache import _Pinning  # noqa: E402

POOL_BYTES = 4 << 30   # the default swap_space
PINNING = {"old": dict(chunk=256 << 20, touch=False, pause=0.0), "touched": dict(chunk=256 << 20, touch=True, pause=0.0),
           "nopause": dict(touch=True, pause=0.0), "new": {}}
LOOP_LIMIT_S = 30.0   # the register stage's main loop stops then, pinned or not
RESULTS: dict = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}


def log(msg: str) -> None:
    print(msg, flush=True)


def _summary(times: list[float]) -> dict | None:
    if not times:
        return None
    ms = sorted(t * 1e3 for t in times)
    return dict(n=len(ms), median_ms=round(statistics.median(ms), 4), p99_ms=round(ms[int(0.99 * (len(ms) - 1))], 4),
                max_ms=round(ms[-1], 3), mean_ms=round(statistics.fmean(ms), 4))


def _pinned(pinning: _Pinning) -> dict:
    pinning.done.wait(LOOP_LIMIT_S)
    res = dict(ok=pinning.ok, error=repr(pinning.error) if pinning.error else None, pin_s=round(pinning.seconds, 3),
               register_s=round(pinning.register_seconds, 3), chunks=len(pinning.chunks))
    pinning.close()
    return res


def register_stage(dev: torch.device, variant: str) -> dict:
    x = torch.zeros(4096, device=dev)
    ids_host = torch.zeros(64, dtype=torch.int64).pin_memory()
    ids_dev = torch.zeros(64, dtype=torch.int64, device=dev)
    out_host = torch.zeros(8, dtype=torch.int64).pin_memory()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(80):   # ~llama-1b's kernels a decode step
            x.add_(1.0)

    def step() -> None:
        ids_dev.copy_(ids_host, non_blocking=True)
        graph.replay()
        out_host.copy_(ids_dev[:8], non_blocking=True)
        torch.cuda.current_stream().synchronize()

    for _ in range(200):
        step()
    base, t_end = [], time.perf_counter() + 1.0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        step()
        base.append(time.perf_counter() - t0)
    raw = torch.empty(POOL_BYTES, dtype=torch.uint8)
    during = []
    pinning = _Pinning(raw, dev, **PINNING[variant])
    deadline = time.perf_counter() + LOOP_LIMIT_S
    while not pinning.done.is_set() and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        step()
        during.append(time.perf_counter() - t0)
    res = dict(variant=variant, **PINNING[variant], **_pinned(pinning), loop_before=_summary(base),
               loop_during=_summary(during))
    log(f"register {variant}: {json.dumps(res)}")
    return res


def _engine(swap_space: float = 4):
    from peers import make_model_dir
    from pagedserve import LLM
    return LLM(model=make_model_dir("llama-1b"), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
               max_model_len=2048, gpu_memory_utilization=0.85, seed=0, swap_space=swap_space)


def _b1(llm) -> float:
    from pagedserve import SamplingParams
    sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
    t0 = time.time()
    llm.generate([{"prompt_token_ids": list(range(100, 228))}], [sp], use_tqdm=False)
    return round(256 / (time.time() - t0), 1)


def _free() -> None:
    """After an engine's shutdown() and its last reference dropped: its device memory back."""
    gc.collect()
    torch.cuda.empty_cache()


def engine_stage(dev: torch.device, rounds: int, variants: list[str]) -> dict:
    llm = _engine(swap_space=0)
    for _ in range(2):
        _b1(llm)
    out: dict = {}
    for r in range(rounds):
        for variant in variants:
            raw = torch.empty(POOL_BYTES, dtype=torch.uint8)
            pinning = None if variant == "none" else _Pinning(raw, dev, **PINNING[variant])
            b1 = [_b1(llm) for _ in range(3)]
            res = dict(b1_decode_tok_s=b1)
            if pinning is not None:
                res["pinning_ran_past_b1"] = not pinning.done.is_set()
                res.update(_pinned(pinning))
            del raw
            log(f"engine {variant} (round {r + 1}): {json.dumps(res)}")
            out.setdefault(variant, []).append(res)
    llm.shutdown()
    return out


class GcPauses:
    """Per generation: how many collections ran, the milliseconds they took and the longest one
    (gc.callbacks); thr_spread.py uses it too."""

    def __init__(self) -> None:
        self.began: float | None = None
        self._reset()
        gc.callbacks.append(self._callback)

    def _reset(self) -> None:
        self.counts, self.seconds, self.longest = [0, 0, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.began = time.perf_counter()
        elif self.began is not None:
            took, generation = time.perf_counter() - self.began, info["generation"]
            self.counts[generation] += 1
            self.seconds[generation] += took
            self.longest[generation] = max(self.longest[generation], took)

    def take(self) -> dict:
        out = dict(counts=self.counts, ms=[round(s * 1e3, 1) for s in self.seconds],
                   longest_ms=[round(s * 1e3, 1) for s in self.longest])
        self._reset()
        return out

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def gc_stage(frozen: bool) -> dict:
    from peers import workload
    from pagedserve import SamplingParams
    llm = _engine(swap_space=0)
    if frozen:
        gc.collect()
        gc.freeze()
    res: dict = dict(frozen=frozen, gc_tracked=len(gc.get_objects()))
    reqs = workload(512)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    sps = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    llm.generate(prompts[:8], sps[:8], use_tqdm=False)
    pauses = GcPauses()
    t0 = time.time()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    res["thr512_out_tok_s"] = round(sum(len(o.outputs[0].token_ids) for o in outs) / (time.time() - t0), 1)
    res["thr512_gc"] = pauses.take()
    res["b1_decode_tok_s"] = [_b1(llm) for _ in range(3)]
    res["b1_gc"] = pauses.take()
    pauses.close()
    if frozen:
        gc.unfreeze()
    log(f"gc frozen={frozen}: {json.dumps(res)}")
    llm.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--stages", default="register,engine,gc")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engine-variants", default="none,old,new")
    ap.add_argument("--gc-rounds", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    stages = args.stages.split(",")
    dev = torch.device("cuda", torch.cuda.current_device())
    RESULTS["machine"] = torch.cuda.get_device_name(dev)
    if "register" in stages:
        RESULTS["register"] = []
        for variant in PINNING:
            RESULTS["register"].append(register_stage(dev, variant))
            _write(args.out)
    if "engine" in stages:
        RESULTS["engine"] = engine_stage(dev, args.rounds, args.engine_variants.split(","))
        _free()
        _write(args.out)
    if "gc" in stages:
        RESULTS["gc"] = []
        for _ in range(args.gc_rounds):
            for frozen in (False, True):
                RESULTS["gc"].append(gc_stage(frozen))
                _free()
        _write(args.out)


def _write(out: str) -> None:
    with open(os.path.join(out, "pin_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
