"""The server's engine without HTTP: AsyncEngine (the engine core on a thread, or in its own
process) driven in-process by `--concurrency` streams of random token-id prompts (DELTA
outputs, detokenized, as the server does), then the step timing (frontend/step_timing.py)
as one `STEPS {json}` line. Set beside `GET /debug/steps` of a served run at the same
concurrency, the difference is what the HTTP side (event loop, SSE, the clients) costs the
engine's steps.

    python3 benchmarks/serve_steps.py MODEL_DIR [--engine-process] [--concurrency 16]
        [--num-prompts 64] [--input-len 544 --output-len 264 --range-ratio 0.9] [--cpu]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time

from pagedserve.bench.datasets import random_requests
from pagedserve.engine_args import EngineArgs
from pagedserve.frontend.async_engine import AsyncEngine
from pagedserve.sampling_params import SamplingParams


async def drive(engine: AsyncEngine, prompts: list, concurrency: int) -> list[float]:
    """Every prompt, `concurrency` at a time; the gaps between a stream's outputs (ITL), s."""
    gaps: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int, request) -> None:
        async with slots:
            params = SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0)
            last = None
            async for _ in engine.generate({"prompt_token_ids": request.prompt_token_ids}, params, f"r{index}"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    await asyncio.gather(*(one(i, r) for i, r in enumerate(prompts)))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--engine-process", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=544)
    parser.add_argument("--output-len", type=int, default=264)
    parser.add_argument("--range-ratio", type=float, default=0.9)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    kwargs = dict(device="cpu", dtype="float32", num_kv_blocks=512) if args.cpu else \
        dict(dtype="bfloat16", gpu_memory_utilization=0.85)
    engine = AsyncEngine.from_engine_args(EngineArgs(model=args.model, load_format="dummy", max_model_len=2048,
                                                     seed=0, **kwargs), engine_process=args.engine_process)
    gc.collect()
    gc.freeze()   # as `pagedserve serve` does
    try:
        warm = random_requests(4, args.input_len, 8, 0.0, seed=999, vocab_high=32000)
        asyncio.run(drive(engine, warm, 4))
        engine.step_timer.reset()
        prompts = random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, seed=1,
                                  vocab_high=32000)
        t0 = time.perf_counter()
        gaps = sorted(asyncio.run(drive(engine, prompts, args.concurrency)))
        summary = engine.step_timer.summary()
        summary.update(wall_s=round(time.perf_counter() - t0, 2), concurrency=args.concurrency,
                       engine_process=args.engine_process,
                       itl_ms={"p50": round(1e3 * gaps[len(gaps) // 2], 3),
                               "p99": round(1e3 * gaps[int(0.99 * len(gaps))], 3)} if gaps else None)
        print("STEPS " + json.dumps(summary), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
