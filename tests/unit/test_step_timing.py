"""StepTimer's summary (frontend/step_timing.py) from hand-made steps: decode-only vs mixed,
the gaps between steps (an idle pause of 0.5 s or more is not a gap), delivery, exact ms."""
from __future__ import annotations

from pagedserve.frontend.step_timing import StepTime, StepTimer


def test_summary_of_known_steps() -> None:
    timer = StepTimer()
    # (begin, end, tokens, running, deliver): two decode steps of 4 ms, one mixed of 10 ms, an idle second,
    # then a decode step of 2 ms
    for step in [StepTime(10.000, 10.004, 4, 4, 0.001), StepTime(10.005, 10.009, 4, 4, 0.001),
                 StepTime(10.012, 10.022, 260, 5, 0.002), StepTime(11.022, 11.024, 1, 1, 0.0005)]:
        timer.record(step)
    summary = timer.summary()
    assert summary["steps"] == 4 and summary["decode_steps"] == 3 and summary["mixed_steps"] == 1
    assert summary["mean_running"] == 3.5 and summary["mean_tokens"] == 67.2
    assert summary["mixed_step_ms"] == {"mean": 10.0, "p50": 10.0, "p90": 10.0, "p99": 10.0, "max": 10.0}
    assert summary["decode_step_ms"]["max"] == 4.0 and summary["decode_step_ms"]["p50"] == 4.0
    assert summary["gap_ms"] == {"mean": 2.0, "p50": 3.0, "p90": 3.0, "p99": 3.0, "max": 3.0}   # 1 and 3 ms; not 1 s
    assert summary["decode_after_mixed_ms"]["max"] == 2.0 and timer.raw(1) == [(11.022, 11.024, 1, 1, 0.0005)]
    assert summary["deliver_ms"]["max"] == 2.0 and summary["steps_per_s"] == round(4 / 1.024, 1)
    timer.reset()
    assert timer.summary()["steps"] == 0


def test_cpu_busy_from_samples() -> None:
    timer = StepTimer()
    timer.sample_cpu("core", wall=100.0, cpu=5.0)
    timer.sample_cpu("core", wall=102.0, cpu=6.5)
    assert timer.summary()["cpu_busy"] == {"core": 0.75}
