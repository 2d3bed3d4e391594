"""`pagedserve bench serve`: an async load generator against a running server (pagedserve,
vLLM, TGI). Requests leave at a Poisson rate (or a gamma process with --burstiness, or
all at once for `inf`), at most --max-concurrency in flight, each streamed and timed; the
metrics module turns the timings into TTFT/TPOT/ITL/E2EL, throughput and goodput. Several
rates (--request-rate 1,2,4) run one after another on the same prompts."""
from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from dataclasses import asdict
from typing import Any, Sequence

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from pagedserve.bench.backends import BACKENDS, RequestInput
from pagedserve.bench.datasets import SampleRequest, load_requests
from pagedserve.bench.metrics import (RequestResult, ServeMetrics, compute_metrics, format_serve_metrics,
                                      parse_goodput)
from pagedserve.errors import ValidationError

REQUEST_TIMEOUT_S = 6 * 3600


def parse_rates(text: str) -> list[float]:
    """"inf" or "1,2,4" -> [inf] or [1.0, 2.0, 4.0]; every rate > 0."""
    rates = []
    for item in str(text).split(","):
        item = item.strip().lower()
        try:
            rate = math.inf if item in ("inf", "infinity") else float(item)
        except ValueError:
            raise ValidationError(f"--request-rate takes inf or numbers, comma-separated; got {text!r}",
                                  "request_rate") from None
        if not rate > 0:
            raise ValidationError(f"--request-rate must be > 0, got {item}", "request_rate")
        rates.append(rate)
    return rates


def arrival_intervals(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness, scale=1/(rate*burstiness)),
    so the mean rate is `rate` for any burstiness; burstiness 1 is a Poisson process. All zero
    for an infinite rate."""
    if burstiness <= 0:
        raise ValidationError(f"--burstiness must be > 0, got {burstiness}", "burstiness")
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num).tolist()


def make_inputs(args: argparse.Namespace, requests: Sequence[SampleRequest], api_url: str, model: str | None,
                tokenizer: Any | None) -> list[RequestInput]:
    needs_text = BACKENDS[args.backend][2]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    adapters, pick = getattr(args, "lora_modules", None), random.Random(args.seed)
    inputs = []
    for request in requests:
        prompt: str | list[int]
        prompt_len = request.prompt_len
        if request.prompt_text is not None and (needs_text or request.prompt_token_ids is None):
            prompt = request.prompt_text
        elif not needs_text:
            prompt = request.prompt_token_ids
        elif tokenizer is None:
            raise ValidationError(f"--backend {args.backend} sends text: use --dataset-name random-text or "
                                  "sharegpt, or give --tokenizer to decode token-id prompts", "backend")
        else:
            prompt = tokenizer.decode(request.prompt_token_ids)
            prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        name = pick.choice(adapters) if adapters else None   # a LoRA adapter by its served name
        inputs.append(RequestInput(api_url, model if name is None or args.backend == "tgi" else name, prompt,
                                   prompt_len, request.output_len, args.ignore_eos, headers,
                                   {"adapter_id": name} if name is not None and args.backend == "tgi" else {}))
    return inputs


async def run_load(backend: str, inputs: Sequence[RequestInput], rate: float, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0,
                   show_progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send every input on the arrival schedule; (results in input order, wall seconds)."""
    request_func = BACKENDS[backend][1]
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(inputs), desc=f"rate {rate:g}", disable=not show_progress)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=False)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
        async def one(request: RequestInput) -> RequestResult:
            if semaphore is None:
                result = await request_func(session, request)
            else:
                async with semaphore:
                    result = await request_func(session, request)
            bar.update(1)
            return result

        tasks = []
        start = time.perf_counter()
        for request, wait in zip(inputs, arrival_intervals(len(inputs), rate, burstiness, seed)):
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def served_model(base_url: str, api_key: str | None) -> str | None:
    """The first model /v1/models lists (None when the server has no such route, as TGI)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.get(f"{base_url}/v1/models", headers=headers) as response:
                if response.status == 200:
                    data = (await response.json()).get("data") or []
                    return data[0]["id"] if data else None
    except aiohttp.ClientError:
        return None
    return None


def base_url_of(args: argparse.Namespace) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def load_tokenizer_for(args: argparse.Namespace) -> Any | None:
    """A tokenizer when the dataset or backend needs one: --tokenizer, else --model when
    it names a local model, else the embedded default model's."""
    text_backend = BACKENDS[args.backend][2]
    if args.dataset_name not in ("sharegpt", "random-text") and not text_backend:
        return None
    from pagedserve.models.loader import load_tokenizer, materialize_gguf, resolve_model
    source = resolve_model(args.tokenizer or args.model)
    if source.gguf_file:
        source = materialize_gguf(source)
    return load_tokenizer(source)


def run_rate(args: argparse.Namespace, inputs: Sequence[RequestInput], rate: float,
             slos: dict[str, float]) -> tuple[ServeMetrics, list[RequestResult]]:
    results, duration = asyncio.run(run_load(args.backend, inputs, rate, args.burstiness, args.max_concurrency,
                                             args.seed, not args.disable_tqdm))
    metrics = compute_metrics(results, duration, slos, args.percentiles)
    return metrics, results


def initial_test(args: argparse.Namespace, inputs: Sequence[RequestInput]) -> None:
    """One short request first, so a wrong URL, model or backend fails fast and clearly."""
    probe = RequestInput(**{**asdict(inputs[0]), "output_len": min(inputs[0].output_len, 2)})
    results, _ = asyncio.run(run_load(args.backend, [probe], math.inf, show_progress=False))
    if not results[0].success:
        raise ValidationError(f"the initial test request to {probe.api_url} failed: {results[0].error}",
                              "base_url")


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pagedserve.bench.results import default_filename, envelope, save_result
    rates = parse_rates(args.request_rate)
    slos = parse_goodput(args.goodput)
    base_url = base_url_of(args)
    api_url = base_url + (args.endpoint or BACKENDS[args.backend][0])
    model = args.served_model_name or args.model
    if model is None and args.backend != "tgi":
        model = asyncio.run(served_model(base_url, args.api_key))
    tokenizer = load_tokenizer_for(args)
    requests = load_requests(args, tokenizer)
    inputs = make_inputs(args, requests, api_url, model, tokenizer)
    if not args.skip_initial_test:
        initial_test(args, inputs)
    runs = []
    for rate in rates:
        metrics, results = run_rate(args, inputs, rate, slos)
        print(format_serve_metrics(metrics, f"Serving Benchmark Result (rate {rate:g})"))
        run: dict[str, Any] = {"request_rate": "inf" if math.isinf(rate) else rate, "burstiness": args.burstiness,
                               "max_concurrency": args.max_concurrency, "metrics": metrics.to_dict()}
        run["requests"] = [asdict(r) for r in results] if args.save_detailed else None
        run["errors"] = sorted({r.error.splitlines()[-1] if r.error else "" for r in results if not r.success})
        runs.append((rate, run, results))
    if args.plot:
        from pagedserve.bench.plots import plot_serve
        for path in plot_serve([(rate, results) for rate, _, results in runs],
                               [(rate, run["metrics"]) for rate, run, _ in runs], args.plot):
            print(f"plot written to {path}")
    report = envelope("serve", args, {"backend": args.backend, "base_url": base_url, "model": model,
                                      "slos_ms": slos, "runs": [run for _, run, _ in runs]})
    filename = args.result_filename or (default_filename("serve") if args.save_result else None)
    if filename:
        print(f"results written to {save_result(report, filename)}")
    return report
