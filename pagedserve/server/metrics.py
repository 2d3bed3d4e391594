"""Prometheus metrics: vLLM V1's names under the `pagedserve:` prefix, each with a
`model_name` label (TGI's `tgi_*` metrics for the TGI routes are at the end). Gauges and
engine-cumulative counters (prompt and generation tokens among them, counted as the core
runs) are read from AsyncEngine.stats (the core's EngineStats of the last step) at scrape
time; time to first token is observed by the engine's first-token listener as each first
token arrives, the other per-request counters and histograms by its finish listener with
FinishedRequestStats (both called on the engine thread; prometheus_client is thread-safe)."""
from __future__ import annotations

import bisect
import itertools
import threading
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedserve.core.outputs import EngineStats
from pagedserve.frontend.async_engine import AsyncEngine
from pagedserve.frontend.request_metrics import FinishedRequestStats

PREFIX = "pagedserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITL_BUCKETS = TPOT_BUCKETS
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


def buckets_1_2_5(max_value: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class _WeightedHistogram(Collector):
    """A histogram that takes one value `count` times in O(buckets) (prometheus_client's
    Histogram observes one at a time)."""

    def __init__(self, name: str, doc: str, model_name: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.model_name = name, doc, model_name
        self.bounds = [*buckets, float("inf")]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        index = bisect.bisect_left(self.bounds, value)
        with self.lock:
            self.counts[index] += count
            self.sum += value * count

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            counts, total = list(self.counts), self.sum
        family = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        cumulative = list(itertools.accumulate(counts))
        family.add_metric([self.model_name], [(_bound(b), c) for b, c in zip(self.bounds, cumulative)], total)
        yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class _EngineStateCollector(Collector):
    """Scrape-time view of AsyncEngine.stats."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        labels = [self.model_name]
        for name, doc, value in (
                ("num_requests_running", "Number of requests in the running batch.", stats.num_running),
                ("num_requests_waiting", "Number of requests waiting to be scheduled.", stats.num_waiting),
                ("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", stats.kv_cache_usage),
                ("kv_offload_host_usage_perc", "Host KV tier usage by swapped-out requests: 1 means 100 percent.",
                 stats.kv_offload_host_usage)):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        for name, doc, value in (
                ("num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions),
                # as the engine runs, not when requests end (vLLM V1): rate() follows the throughput
                ("prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens),
                ("generation_tokens", "Number of generation tokens processed.", stats.generation_tokens),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
                ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", stats.prefix_cache_hits),
                ("kv_offload_blocks_swapped_out", "KV blocks copied to the host tier (preemption by swap, "
                 "evicted prefix blocks).", stats.kv_offload_blocks_swapped_out),
                ("kv_offload_blocks_swapped_in", "KV blocks copied back from the host tier (resumed requests, "
                 "host prefix hits).", stats.kv_offload_blocks_swapped_in),
                ("kv_offload_host_prefix_hits", "Prompt tokens loaded from the host tier of the prefix cache.",
                 stats.kv_offload_host_prefix_hits)):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric(labels, value)
            yield counter
        config = getattr(getattr(self.engine, "engine", None), "config", None)
        lora = getattr(getattr(config, "scheduler", None), "lora", None)
        if lora is not None:   # vLLM's: the adapters in use now, as labels; the value is the time of the sample
            info = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on lora requests.",
                                     labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
            info.add_metric([",".join(stats.running_loras), ",".join(stats.waiting_loras), str(lora.max_loras)],
                            time.time())
            yield info


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(engine, model_name))
        labels = ["model_name"]
        reg = self.registry
        success = Counter(PREFIX + "request_success", "Count of finished requests, by finish reason.",
                          labels + ["finished_reason"], registry=reg)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success = success
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token in seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token in seconds.",
                              labels, buckets=TPOT_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             labels, buckets=LATENCY_BUCKETS, registry=reg).labels(model_name)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time spent waiting in seconds.",
                                    labels, buckets=LATENCY_BUCKETS, registry=reg).labels(model_name)
        # H3 (issue 16 #17): the rest of vLLM V1's request metrics
        token_buckets = buckets_1_2_5(engine.max_model_len)
        self.itl = _WeightedHistogram(PREFIX + "inter_token_latency_seconds",
                                      "Inter-token latency in seconds (each request's mean gap, once per gap).",
                                      model_name, ITL_BUCKETS)
        reg.register(self.itl)

        def histogram(name: str, doc: str, buckets) -> Any:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.params_n = histogram("request_params_n", "Histogram of the n request parameter.", PARAMS_N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", token_buckets)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.", LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                          ITERATION_TOKEN_BUCKETS)
        self._add_cache_config_info(engine)
        engine.add_step_listener(self.observe_step)
        engine.add_finish_listener(self.observe_finished)
        engine.add_first_token_listener(self.observe_first_token)
        self.tgi = TGIMetrics(engine, reg)

    def _add_cache_config_info(self, engine: AsyncEngine) -> None:
        """vLLM's cache_config_info: a gauge of 1 whose labels are the cache settings."""
        config = getattr(getattr(engine, "engine", None), "config", None)
        cache = getattr(config, "cache", None)
        if cache is None:
            return
        info = {name: str(getattr(cache, name)) for name in
                ("block_size", "enable_prefix_caching", "gpu_memory_utilization", "kv_cache_memory_gb",
                 "num_kv_blocks", "swap_space", "kv_offloading_size", "cache_dtype")}
        gauge = Gauge(PREFIX + "cache_config_info", "Information of the LLMEngine CacheConfig.", list(info),
                      registry=self.registry)
        gauge.labels(**info).set(1)
        quant = config.model.quantization
        weights = Gauge(PREFIX + "model_weight_bytes", "Bytes the model weights take on one rank (after "
                        "quantization).", ["quantization"], registry=self.registry)
        weights.labels(quant.method if quant else "none").set(getattr(getattr(engine.engine, "core", None),
                                                                      "weight_bytes", 0))

    def observe_request_params(self, n: int, max_tokens: int) -> None:
        """Fed by the OpenAI routes once per prompt (the engine's stats carry neither)."""
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)

    def observe_step(self, stats: EngineStats) -> None:
        if stats.num_batched_tokens:
            self.iteration_tokens.observe(stats.num_batched_tokens)

    def observe_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(max(ttft_s, 0.0))   # when it arrives, as vLLM V1 (not when the request ends)

    def observe_finished(self, stats: FinishedRequestStats) -> None:
        counter = self.request_success.get(stats.finish_reason)
        if counter is None:
            counter = self._success.labels(self.model_name, stats.finish_reason)
        counter.inc()
        self.e2e.observe(max(stats.finish_time - stats.arrival_time, 0.0))
        self.request_prompt_tokens.observe(stats.num_prompt_tokens)
        self.request_generation_tokens.observe(stats.num_generation_tokens)
        if stats.first_scheduled_time is not None:
            self.inference_time.observe(max(stats.finish_time - stats.first_scheduled_time, 0.0))
            if stats.first_token_time is not None:
                self.prefill_time.observe(max(stats.first_token_time - stats.first_scheduled_time, 0.0))
        if stats.first_token_time is not None:
            self.decode_time.observe(max(stats.finish_time - stats.first_token_time, 0.0))
            gaps = stats.num_generation_tokens - 1
            if gaps > 0:
                self.itl.observe(max(stats.finish_time - stats.first_token_time, 0.0) / gaps, gaps)
        if stats.first_scheduled_time is not None:
            queued = stats.arrival_time if stats.queued_time is None else stats.queued_time
            self.queue_time.observe(max(stats.first_scheduled_time - queued, 0.0))
        if stats.first_token_time is not None:
            if stats.num_generation_tokens > 1:
                self.tpot.observe(max(stats.finish_time - stats.first_token_time, 0.0)
                                  / (stats.num_generation_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---- TGI's metrics (text-generation-inference's names, no prefix, no model label) ----------

TGI_ERROR_TYPES = ("validation", "overloaded", "generation", "incomplete_generation", "dropped")
TGI_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TGI_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class TGIMetrics(Collector):
    """tgi_request_count / _success / _failure{err} (exposed untyped under their exact TGI
    names: prometheus_client would append `_total` to a counter), the request histograms,
    and tgi_batch_current_size / tgi_queue_size read from AsyncEngine.stats at scrape time.
    Fed by the TGI routes on the event loop."""

    def __init__(self, engine: AsyncEngine, registry: CollectorRegistry) -> None:
        self.engine = engine
        self.request_count = 0
        self.request_success = 0
        self.request_failure = {err: 0 for err in TGI_ERROR_TYPES}
        self.duration = Histogram("tgi_request_duration", "End-to-end TGI request duration in seconds.",
                                  buckets=TGI_DURATION_BUCKETS, registry=registry)
        self.queue_duration = Histogram("tgi_request_queue_duration",
                                        "Seconds from arrival until the first generated token (the engine does "
                                        "not report per-request scheduling times).",
                                        buckets=TGI_DURATION_BUCKETS, registry=registry)
        self.generated_tokens = Histogram("tgi_request_generated_tokens", "Tokens generated per TGI request.",
                                          buckets=TGI_TOKEN_BUCKETS, registry=registry)
        registry.register(self)

    def observe_success(self, duration_s: float, queue_s: float | None, generated_tokens: int) -> None:
        self.request_success += 1
        self.duration.observe(max(duration_s, 0.0))
        if queue_s is not None:
            self.queue_duration.observe(max(queue_s, 0.0))
        self.generated_tokens.observe(generated_tokens)

    def observe_failure(self, error_type: str) -> None:
        self.request_failure[error_type] = self.request_failure.get(error_type, 0) + 1

    def collect(self) -> Iterator[Metric]:
        for name, doc, samples in (
                ("tgi_request_count", "TGI requests received.", [({}, self.request_count)]),
                ("tgi_request_success", "TGI requests that succeeded.", [({}, self.request_success)]),
                ("tgi_request_failure", "TGI requests that failed, by error type.",
                 [({"err": err}, count) for err, count in self.request_failure.items()])):
            metric = Metric(name, doc, "unknown")
            for labels, value in samples:
                metric.add_sample(name, labels, value)
            yield metric
        stats = self.engine.stats
        for name, doc, value in (("tgi_batch_current_size", "Requests in the running batch.", stats.num_running),
                                 ("tgi_queue_size", "Requests waiting to be scheduled.", stats.num_waiting)):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
