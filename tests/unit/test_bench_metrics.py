"""Benchmark arithmetic on synthetic timings: TTFT/TPOT/ITL/E2EL summaries, throughput,
goodput, arrival schedules, the KV memory report and the per-step KV probe.

Timings are multiples of 1/8 s so every millisecond value is exact in binary; percentiles
are numpy's linear interpolation, checked against hand-computed values to 1e-9 ms."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pagedserve.bench.datasets import SampleRequest
from pagedserve.bench.latency import decode_per_token
from pagedserve.bench.memory import KVSample, KVUsageProbe, kv_memory_report, paged_slots
from pagedserve.bench.metrics import (RequestResult, compute_metrics, distribution, meets_slos, parse_goodput,
                                      percentile, tpot)
from pagedserve.bench.serve import arrival_intervals, parse_rates
from pagedserve.bench.throughput import make_result, ratios
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestId
from pagedserve.core.scheduler import Scheduler
from pagedserve.engine_io import ModelRunnerOutput
from pagedserve.errors import ValidationError
from pagedserve.sampling_params import SamplingParams

EPS = 1e-9


def synthetic() -> list[RequestResult]:
    return [
        # 5 tokens: ttft 125 ms, then 4 gaps of 125 ms -> e2el 625, tpot 125
        RequestResult(True, prompt_len=10, output_tokens=5, ttft=0.125, latency=0.625, itl=[0.125] * 4),
        # 3 tokens: ttft 250, gaps 250 + 750 -> e2el 1250, tpot (1250 - 250) / 2 = 500
        RequestResult(True, prompt_len=20, output_tokens=3, ttft=0.25, latency=1.25, itl=[0.25, 0.75]),
        # 1 token: no TPOT, no ITL
        RequestResult(True, prompt_len=30, output_tokens=1, ttft=0.375, latency=0.375),
        # failed: counted, and nothing else
        RequestResult(False, prompt_len=40, output_tokens=0, ttft=0.0, latency=0.01, error="HTTP 500"),
    ]


def test_tpot_excludes_the_first_token_and_single_token_requests() -> None:
    r1, r2, r3, _ = synthetic()
    assert tpot(r1) == 0.125
    assert tpot(r2) == 0.5
    assert tpot(r3) is None


def test_percentiles_interpolate_linearly() -> None:
    assert percentile([125.0, 250.0, 375.0], 90) == pytest.approx(350.0, abs=EPS)
    assert percentile([125.0, 250.0, 375.0], 99) == pytest.approx(372.5, abs=EPS)
    assert percentile([], 99) == 0.0
    d = distribution([0.5, 0.125], (50, 90, 99))   # seconds in, ms out
    assert (d.mean, d.median, d.count) == (312.5, 312.5, 2)
    assert d.percentiles == pytest.approx({"p50": 312.5, "p90": 462.5, "p99": 496.25}, abs=EPS)
    empty = distribution([])
    assert (empty.mean, empty.count, empty.percentiles) == (0.0, 0, {"p90": 0.0, "p99": 0.0})


def test_compute_metrics_exact() -> None:
    m = compute_metrics(synthetic(), duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 9)
    assert (m.request_throughput, m.output_throughput, m.total_token_throughput) == (1.5, 4.5, 34.5)
    assert m.goodput is None and m.good_requests is None
    assert (m.ttft_ms.mean, m.ttft_ms.median, m.ttft_ms.count) == (250.0, 250.0, 3)
    assert m.ttft_ms.percentiles == pytest.approx({"p90": 350.0, "p99": 372.5}, abs=EPS)
    assert (m.tpot_ms.mean, m.tpot_ms.median, m.tpot_ms.count) == (312.5, 312.5, 2)
    assert m.tpot_ms.percentiles == pytest.approx({"p90": 462.5, "p99": 496.25}, abs=EPS)
    # ITL pools every gap: 125 x4, 250, 750
    assert (m.itl_ms.mean, m.itl_ms.median, m.itl_ms.count) == (250.0, 125.0, 6)
    assert m.itl_ms.percentiles == pytest.approx({"p90": 500.0, "p99": 725.0}, abs=EPS)
    assert (m.e2el_ms.mean, m.e2el_ms.median) == (750.0, 625.0)
    assert m.e2el_ms.percentiles == pytest.approx({"p90": 1125.0, "p99": 1237.5}, abs=EPS)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = synthetic()
    # r1 meets both; r2 misses tpot (500 > 200); r3 misses ttft (375 > 300); failed never counts
    m = compute_metrics(results, 2.0, {"ttft": 300.0, "tpot": 200.0})
    assert (m.good_requests, m.goodput) == (1, 0.5)
    # a single-token request has no TPOT and meets a TPOT-only SLO
    m = compute_metrics(results, 2.0, {"tpot": 200.0})
    assert (m.good_requests, m.goodput) == (2, 1.0)
    # bounds are inclusive
    assert meets_slos(results[1], {"e2el": 1250.0, "tpot": 500.0, "ttft": 250.0})
    assert not meets_slos(results[1], {"e2el": 1249.0})
    assert not meets_slos(results[3], {})


def test_parse_goodput() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000.5"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    assert parse_goodput(None) == {}
    for bad in ("ttft", "latency:5", "tpot:fast", "ttft:-1"):
        with pytest.raises(ValidationError) as info:
            parse_goodput([bad])
        assert info.value.param == "goodput"


def test_compute_metrics_rejects_zero_duration() -> None:
    with pytest.raises(ValueError):
        compute_metrics(synthetic(), 0.0)


def test_parse_rates() -> None:
    assert parse_rates("inf") == [math.inf]
    assert parse_rates("1, 2.5,4") == [1.0, 2.5, 4.0]
    for bad in ("0", "-1", "fast", "1,,2"):
        with pytest.raises(ValidationError) as info:
            parse_rates(bad)
        assert info.value.param == "request_rate"


def test_arrival_intervals() -> None:
    assert arrival_intervals(5, math.inf) == [0.0] * 5
    assert arrival_intervals(100, 4.0, seed=3) == arrival_intervals(100, 4.0, seed=3)
    assert arrival_intervals(100, 4.0, seed=3) != arrival_intervals(100, 4.0, seed=4)
    # mean gap is 1/rate for any burstiness; the coefficient of variation is 1/sqrt(burstiness).
    # 200k draws: standard errors are ~0.2% of the mean; tolerances 2% (mean) and 3% (CV).
    for burstiness in (1.0, 0.25, 4.0):
        gaps = np.asarray(arrival_intervals(200_000, 4.0, burstiness, seed=0))
        assert gaps.mean() == pytest.approx(0.25, rel=0.02)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.03)
    with pytest.raises(ValidationError):
        arrival_intervals(3, 1.0, burstiness=0.0)


def test_kv_memory_report_exact() -> None:
    lengths = [1, 16, 17, 33]
    assert paged_slots(lengths, 16) == 16 + 16 + 32 + 48
    samples = [KVSample(0.0, 5, 2, 2), KVSample(0.1, 7, 3, 1), KVSample(0.2, 4, 1, 0)]
    r = kv_memory_report(lengths, block_size=16, max_model_len=64, num_kv_blocks=10, samples=samples)
    assert (r.used_tokens, r.paged_tokens, r.contiguous_tokens) == (67, 112, 256)
    assert r.paged_waste_pct == pytest.approx(100 * 45 / 112, abs=EPS)
    assert r.contiguous_waste_pct == pytest.approx(100 * 189 / 256, abs=EPS)
    assert r.contiguous_over_paged == pytest.approx(256 / 112, abs=EPS)
    assert (r.peak_blocks_in_use, r.measured_max_concurrency, r.num_steps) == (7, 3, 3)
    assert r.peak_kv_usage_pct == pytest.approx(70.0, abs=EPS)
    assert r.contiguous_max_concurrency == 160 // 64


def _run_step(scheduler: Scheduler) -> None:
    out = scheduler.schedule()
    sampled = {}
    for rid, n in out.num_scheduled_tokens.items():
        request = scheduler.requests[rid]
        if request.num_computed_tokens + n == request.num_tokens:
            sampled[rid] = 7
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))


def test_kv_probe_samples_blocks_and_running_after_each_schedule() -> None:
    scheduler = Scheduler(KVCacheManager(64, 4), 2, 16, 64)
    for rid, prompt_len, start in (("a", 6, 0), ("b", 6, 100), ("c", 5, 200)):
        scheduler.add_request(Request(RequestId(rid), list(range(start, start + prompt_len)),
                                      SamplingParams(max_tokens=2), max_tokens=2))
    probe = KVUsageProbe(scheduler).install()
    while scheduler.has_unfinished():
        _run_step(scheduler)
    probe.remove()
    # a, b: 6-token prompts (2 blocks of 4 each), both at max_num_seqs=2, then c alone
    assert [(s.blocks_in_use, s.num_running, s.num_waiting) for s in probe.samples] == \
        [(4, 2, 1), (4, 2, 1), (2, 1, 0), (2, 1, 0)]
    assert (probe.peak_blocks_in_use, probe.max_concurrency) == (4, 2)
    assert "schedule" not in vars(scheduler)   # the class method is back
    times = [s.time_s for s in probe.samples]
    assert times == sorted(times)


def test_throughput_arithmetic_and_ratios() -> None:
    requests = [SampleRequest(100, 10), SampleRequest(300, 30)]
    r = make_result("pagedserve continuous", requests, elapsed_s=2.0, output_tokens=40)
    assert (r.requests_per_s, r.input_tokens_per_s, r.output_tokens_per_s, r.total_tokens_per_s) == \
        (1.0, 200.0, 20.0, 220.0)
    static = make_result("pagedserve static", requests, elapsed_s=4.0, output_tokens=40)
    hf = make_result("transformers", requests, elapsed_s=8.0, output_tokens=40)
    assert ratios([r, static, hf]) == {"continuous_over_static": 2.0, "continuous_over_transformers": 4.0,
                                       "static_over_transformers": 2.0}
    assert ratios([r]) == {}


def test_decode_time_per_token() -> None:
    # a 1-token run of 0.5 s and a 9-token run of 2.5 s: 8 decode steps of 0.25 s
    assert decode_per_token(2.5, 0.5, 9) == 0.25
