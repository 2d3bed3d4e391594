"""Plots with matplotlib (Agg, files only): latency CDFs, throughput against request rate,
KV blocks in use over time."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from pagedserve.bench.memory import KVSample
from pagedserve.bench.metrics import RequestResult, tpot


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _rate_label(rate: float) -> str:
    return "rate inf" if math.isinf(rate) else f"rate {rate:g}/s"


def _saved(plt: Any, fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their empirical CDF (i / n for the i-th smallest, 1-based)."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def plot_latency_cdfs(runs: Sequence[tuple[float, Sequence[RequestResult]]], path: str) -> str:
    """One panel per metric (TTFT, TPOT, ITL, E2EL, in ms), one curve per request rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    metrics = (("TTFT", lambda rs: [r.ttft for r in rs]),
               ("TPOT", lambda rs: [t for t in (tpot(r) for r in rs) if t is not None]),
               ("ITL", lambda rs: [gap for r in rs for gap in r.itl]),
               ("E2E latency", lambda rs: [r.latency for r in rs]))
    for ax, (name, extract) in zip(axes.flat, metrics):
        for rate, results in runs:
            values = [v * 1000.0 for v in extract([r for r in results if r.success])]
            if values:
                xs, ys = cdf_points(values)
                ax.step(xs, ys, where="post", label=_rate_label(rate))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of token gaps")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _saved(plt, fig, path)


def plot_throughput_vs_rate(points: Sequence[tuple[float, dict]], path: str) -> str:
    """Output tokens/s and completed requests/s against the offered request rate."""
    plt = _pyplot()
    points = sorted(points, key=lambda p: p[0])
    finite = [p for p in points if not math.isinf(p[0])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [rate for rate, _ in finite]
    ax.plot(xs, [m["output_throughput"] for _, m in finite], "o-", label="output tokens/s")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    twin = ax.twinx()
    twin.plot(xs, [m["request_throughput"] for _, m in finite], "s--", color="tab:orange", label="requests/s")
    twin.set_ylabel("completed requests/s")
    for rate, m in points:
        if math.isinf(rate):
            ax.axhline(m["output_throughput"], color="gray", linestyle=":", label="rate inf (output tokens/s)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    ax.set_title("Throughput against request rate")
    return _saved(plt, fig, path)


def plot_serve(runs: Sequence[tuple[float, Sequence[RequestResult]]], metrics: Sequence[tuple[float, dict]],
               path: str) -> list[str]:
    """The latency CDFs at `path`; with several rates also `<stem>_throughput<ext>`."""
    written = [plot_latency_cdfs(runs, path)]
    if len(metrics) > 1:
        stem, ext = os.path.splitext(path)
        written.append(plot_throughput_vs_rate(metrics, f"{stem}_throughput{ext or '.png'}"))
    return written


def plot_kv_blocks(series: dict[str, Sequence[KVSample]], num_blocks: int, path: str) -> str:
    """Blocks in use (left) and running requests (right) against time, one line per run."""
    plt = _pyplot()
    fig, (blocks_ax, running_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, samples in series.items():
        times = [s.time_s for s in samples]
        blocks_ax.plot(times, [s.blocks_in_use for s in samples], label=label, linewidth=1)
        running_ax.plot(times, [s.num_running for s in samples], label=label, linewidth=1)
    blocks_ax.set_xlabel("time (s)")
    blocks_ax.set_ylabel("KV blocks in use")
    blocks_ax.set_title(f"KV blocks in use over time (pool: {num_blocks} blocks)")
    running_ax.set_xlabel("time (s)")
    running_ax.set_ylabel("running requests")
    running_ax.set_title("Running requests over time")
    for ax in (blocks_ax, running_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _saved(plt, fig, path)
