"""Serving metrics from per-request timings: TTFT, TPOT, ITL, end-to-end latency, request
and token throughput, goodput under SLOs. Pure functions of the recorded timings, so they
are tested exactly on synthetic numbers.

One streamed request on the time axis (seconds, relative to its own start):

    start        first token          token 2 ... last token
      |--- ttft ---|--- itl[0] ---|--- itl[1] ---| ... |
      |<------------------- latency (e2el) ------------>|

    TPOT = (latency - ttft) / (output_tokens - 1)      only for output_tokens > 1

Percentiles use linear interpolation between closest ranks (numpy's default, as vLLM).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from pagedserve.errors import ValidationError

SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (90.0, 99.0)


@dataclass
class RequestResult:
    """What one benchmark request observed. Times in seconds; `itl` holds the gaps between
    consecutive streamed chunks that carried text or tokens."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


@dataclass
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[str, float]   # "p90" -> value
    count: int


@dataclass
class ServeMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float      # completed requests / s
    output_throughput: float       # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    goodput: float | None          # requests meeting every SLO / s; None when no SLO is given
    good_requests: int | None
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; 0.0 for no values."""
    if not len(values):
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def distribution(values_s: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Distribution:
    """Summarize values given in seconds as milliseconds."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return Distribution(0.0, 0.0, 0.0, {_pname(q): 0.0 for q in percentiles}, 0)
    return Distribution(float(ms.mean()), float(np.median(ms)), float(ms.std()),
                        {_pname(q): float(np.percentile(ms, q)) for q in percentiles}, int(ms.size))


def _pname(q: float) -> str:
    return f"p{q:g}"


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first, seconds; None for fewer than 2 tokens."""
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValidationError(f"--goodput takes NAME:MS with NAME one of {', '.join(SLO_METRICS)}, "
                                  f"got {item!r}", "goodput")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValidationError(f"--goodput {item!r}: {value!r} is not a number of milliseconds",
                                  "goodput") from None
        if slos[name] < 0:
            raise ValidationError(f"--goodput {item!r}: an SLO must be >= 0 ms", "goodput")
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """A successful request meets an SLO when its value is <= the bound; a request with a
    single output token has no TPOT and meets any TPOT bound."""
    if not result.success:
        return False
    values = {"ttft": result.ttft, "e2el": result.latency, "tpot": tpot(result)}
    for name, bound_ms in slos.items():
        value = values[name]
        if value is not None and value * 1000.0 > bound_ms:
            return False
    return True


def compute_metrics(results: Sequence[RequestResult], duration_s: float, slos: dict[str, float] | None = None,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> ServeMetrics:
    """Aggregate per-request results over a run of `duration_s` seconds. Failed requests
    count only in `failed`; every other figure is over successful ones."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    ok = [r for r in results if r.success]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(meets_slos(r, slos) for r in ok) if slos else None
    return ServeMetrics(
        completed=len(ok), failed=len(results) - len(ok), duration_s=duration_s,
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s, output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        goodput=None if good is None else good / duration_s, good_requests=good,
        ttft_ms=distribution([r.ttft for r in ok], percentiles),
        tpot_ms=distribution(tpots, percentiles),
        itl_ms=distribution(itls, percentiles),
        e2el_ms=distribution([r.latency for r in ok], percentiles))


def format_serve_metrics(m: ServeMetrics, title: str = "Serving Benchmark Result") -> str:
    lines = [f"{'=' * 18} {title} {'=' * 18}",
             f"{'Successful requests:':<40}{m.completed:>12}",
             f"{'Failed requests:':<40}{m.failed:>12}",
             f"{'Benchmark duration (s):':<40}{m.duration_s:>12.2f}",
             f"{'Total input tokens:':<40}{m.total_input_tokens:>12}",
             f"{'Total generated tokens:':<40}{m.total_output_tokens:>12}",
             f"{'Request throughput (req/s):':<40}{m.request_throughput:>12.2f}",
             f"{'Output token throughput (tok/s):':<40}{m.output_throughput:>12.2f}",
             f"{'Total token throughput (tok/s):':<40}{m.total_token_throughput:>12.2f}"]
    if m.goodput is not None:
        lines.append(f"{'Request goodput (req/s):':<40}{m.goodput:>12.2f}")
    for label, dist in (("Time to First Token", m.ttft_ms), ("Time per Output Token (excl. 1st token)", m.tpot_ms),
                        ("Inter-token Latency", m.itl_ms), ("End-to-end Latency", m.e2el_ms)):
        short = {"Time to First Token": "TTFT", "Inter-token Latency": "ITL",
                 "End-to-end Latency": "E2EL"}.get(label, "TPOT")
        lines.append(f"{'-' * 15}{label}{'-' * 15}")
        lines.append(f"{'Mean ' + short + ' (ms):':<40}{dist.mean:>12.2f}")
        lines.append(f"{'Median ' + short + ' (ms):':<40}{dist.median:>12.2f}")
        for name, value in dist.percentiles.items():
            lines.append(f"{name.upper() + ' ' + short + ' (ms):':<40}{value:>12.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)
