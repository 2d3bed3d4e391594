"""The profiling stages of benchmarks/tp_gpu.py (`tp_gpu.py profile TP VARIANT`, the last stage of
`tp_gpu.py suite`, and `tp_gpu.py h2d`): rank 0's host time per step by phase (HOST_PHASES, also
printed by `tp_gpu.py peers` as *_host_phases), torch.profiler of batch-1 decode steps with the
device time by kernel kind and the device's idle gaps, and the host -> device copy probe. DRY=1
runs the profile on CPU (tp_gpu.py's tiny model; no device events)."""
import json
import os
import time

DRY = os.environ.get("DRY") == "1"


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


HOST_PHASES: dict[str, list[float]] = {}   # label -> [seconds, calls] on rank 0, once wrap_host_phases ran


def wrap_host_phases() -> None:
    """Name the host phases of a step on rank 0 (in a profile) and time them (HOST_PHASES):
    schedule, send the step, the runner (under PP: stage 0's inputs and launch), wait for
    the sampled ids (under PP: for the last stage's output), update."""
    if HOST_PHASES:   # wrapped already
        return
    import torch
    from pagedserve.core.engine_core import EngineCore
    from pagedserve.core.scheduler import Scheduler
    from pagedserve.worker.model_runner import ModelRunner
    from pagedserve.worker.pending_output import PendingRunnerOutput
    from pagedserve.worker.tp_executor import MultiprocTPExecutor, PipelineOutput
    from pagedserve.worker.tp_worker import StepChannel

    def wrap(cls, name, label):
        fn = getattr(cls, name)
        total = HOST_PHASES.setdefault(label, [0.0, 0])

        def wrapped(*a, **k):
            start = time.perf_counter()
            try:
                with torch.profiler.record_function(label):
                    return fn(*a, **k)
            finally:
                total[0] += time.perf_counter() - start
                total[1] += 1
        setattr(cls, name, wrapped)
    wrap(Scheduler, "schedule", "host:schedule")
    wrap(StepChannel, "send", "host:send_step_message")
    wrap(MultiprocTPExecutor, "_send", "host:send_step_all")   # under PP: + pickled on to stage 1
    wrap(ModelRunner, "execute_model", "host:runner_execute")
    by_kind = ModelRunner.execute_model   # and again by step kind: all decodes (a graph) or not (eager)
    kinds = {kind: HOST_PHASES.setdefault(f"host:runner_{kind}", [0.0, 0]) for kind in ("decode", "mixed")}

    def split(self, so, *args, **kwargs):
        start = time.perf_counter()
        try:
            return by_kind(self, so, *args, **kwargs)
        finally:
            total = kinds["decode" if max(so.num_scheduled_tokens.values(), default=1) == 1 else "mixed"]
            total[0] += time.perf_counter() - start
            total[1] += 1
    ModelRunner.execute_model = split
    wrap(PendingRunnerOutput, "get", "host:wait_sampled_ids")
    wrap(PipelineOutput, "get", "host:wait_last_stage")
    wrap(EngineCore, "_update", "host:update")


def emit_phases(tags: dict, workload: str, wall_s: float) -> None:
    """HOST_PHASES since the last call: ms per launched step (rank 0's runner calls) of each
    phase; calls: how often each ran (schedule runs more often than steps launch under PP)."""
    steps = max(HOST_PHASES.get("host:runner_execute", [0, 0])[1], 1)
    per_step = {label.split(":")[1]: round(sec * 1e3 / steps, 3) for label, (sec, calls) in HOST_PHASES.items()
                if calls}
    emit(**tags, workload=f"{workload}_host_phases", steps=steps, wall_ms_per_step=round(wall_s * 1e3 / steps, 3),
         ms_per_step=per_step, calls={label.split(":")[1]: calls for label, (_, calls) in HOST_PHASES.items()})
    reset_phases()


def reset_phases() -> None:
    for total in HOST_PHASES.values():
        total[:] = [0.0, 0]


KINDS = (   # (substrings of a lower-cased kernel name, kind): the first match wins
    (("one_shot",), "allreduce_one_shot"), (("two_shot",), "allreduce_two_shot"),
    (("nccl", "allreduce"), "nccl_allreduce"), (("nccl", "broadcast"), "nccl_broadcast"),
    (("nccl", "sendrecv"), "nccl_gather"), (("nccl", "allgather"), "nccl_allgather"), (("nccl",), "nccl_other"),
    (("_gemv_kernel",), "gemv"), (("rotary_store",), "rotary_store_kv"), (("store_kv",), "store_kv"),
    (("paged_attention",), "attention"), (("attn",), "attention"), (("attention",), "attention"),
    (("memcpy htod",), "memcpy_h2d"), (("memcpy dtoh",), "memcpy_d2h"), (("memcpy dtod",), "memcpy_d2d"),
    (("memset",), "memset"), (("rms_norm",), "rms_norm"), (("silu",), "silu_and_mul"),
    (("splitk",), "cublas"), (("gemm",), "cublas"), (("gemv",), "cublas"), (("nvjet",), "cublas"),
    (("xmma",), "cublas"), (("cutlass",), "cublas"), (("argmax",), "argmax"), (("reduce_kernel",), "reduce"),
    (("reduce_segments",), "attention"), (("index",), "index"), (("embedding",), "embedding"), (("fill",), "fill"),
    (("copy",), "copy"),
    (("elementwise",), "elementwise"))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for keys, kind in KINDS if all(k in low for k in keys)), "other")


def kernel_breakdown(kernels: list, steps: int, kind_of=kernel_kind) -> dict:
    """Device kernels (profiler events) -> per step: us and launches of each kind (`kind_of`),
    and the device's idle time between kernels, by the kind of the kernel before the gap (a gap
    after the last kernel of a step is the device waiting for the host's next step)."""
    # record_function ranges and ops show up on the device too (host:*, aten::*, nccl:*): not kernels
    kernels = sorted((e for e in kernels if not (e.name.startswith(("host:", "aten::", "nccl:"))
                                                 or e.name == "record_param_comms")),
                     key=lambda e: e.time_range.start)
    busy: dict[str, list[float]] = {}
    gaps: dict[str, list[float]] = {}
    for i, e in enumerate(kernels):
        kind = kind_of(e.name)
        slot = busy.setdefault(kind, [0.0, 0])
        slot[0] += e.time_range.end - e.time_range.start
        slot[1] += 1
        if i + 1 < len(kernels):
            gap = kernels[i + 1].time_range.start - e.time_range.end
            if gap > 0:
                g = gaps.setdefault(kind, [0.0, 0, 0])
                g[0] += gap
                g[1] += 1
                g[2] += gap > 20   # long ones: the device waited for a launch
    per = lambda x: round(x / steps, 1)  # noqa: E731
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) if kernels else 0.0
    return dict(
        span_us_per_step=per(span),
        busy_us_per_step={k: per(v[0]) for k, v in sorted(busy.items(), key=lambda kv: -kv[1][0])},
        launches_per_step={k: round(v[1] / steps, 2) for k, v in sorted(busy.items(), key=lambda kv: -kv[1][0])},
        idle_us_per_step=per(sum(g[0] for g in gaps.values())),
        idle_after_us_per_step={k: per(v[0]) for k, v in sorted(gaps.items(), key=lambda kv: -kv[1][0])},
        long_gaps_per_step={k: round(v[2] / steps, 2) for k, v in gaps.items() if v[2]})


def run_profile(llm, tp: int, variant: str, steps: int = 64) -> None:
    """torch.profiler over a batch-1 decode of `steps` tokens on rank 0: per-step wall time,
    device time by kernel kind (NCCL and one-shot all-reduces, broadcasts, gemvs, copies),
    the device's idle gaps, and the host phases."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    wrap_host_phases()
    steps = 8 if DRY else steps
    from pagedserve import SamplingParams
    greedy = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0.0, detokenize=False)
    p = {"prompt_token_ids": list(range(300, 428))}
    llm.generate([p], [greedy], use_tqdm=False)
    sync = (lambda: None) if DRY else torch.cuda.synchronize
    sync()
    reset_phases()
    with profile(activities=[ProfilerActivity.CPU] + ([] if DRY else [ProfilerActivity.CUDA])) as prof:
        t0 = time.time()
        llm.generate([{"prompt_token_ids": list(range(500, 628))}], [greedy], use_tqdm=False)
        sync()
        wall = time.time() - t0
    events = prof.key_averages()
    if not DRY:
        print(events.table(sort_by="self_device_time_total" if hasattr(events[0], "self_device_time_total")
                           else "self_cuda_time_total", row_limit=30), flush=True)
    print(events.table(sort_by="cpu_time_total", row_limit=25), flush=True)

    from torch.autograd import DeviceType
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]   # device-side events only
    device_ms = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3 / steps

    def host_us(label):
        return sum(e.cpu_time_total for e in events if e.key == label)
    emit(workload="profile_decode", tp=tp, variant=variant, steps=steps, wall_ms_per_step=round(wall * 1e3 / steps, 3),
         device_ms_per_step=round(device_ms, 3), device_idle_ms_per_step=round(wall * 1e3 / steps - device_ms, 3),
         host_ms_per_step={label: round(host_us(label) / 1e3 / steps, 3) for label in (
             "host:schedule", "host:send_step_message", "host:runner_execute", "host:wait_sampled_ids",
             "host:update")}, **kernel_breakdown(kernels, steps))


def h2d_probe() -> None:
    """How long the host spends issuing a non-blocking host -> device copy while the GPU is busy
    (~100 ms of torch.cuda._sleep): from pageable memory (a numpy array, as the step inputs went)
    and through pinned memory. Milliseconds near the busy time mean the copy waited for the
    stream (the driver staged it synchronously)."""
    if DRY:
        emit(workload="h2d_while_busy", skipped="DRY: needs a GPU")
        return
    import numpy as np
    import torch
    dev = torch.device("cuda:0")
    torch.zeros(1, device=dev)
    for nbytes in (4096, 32768, 65536, 65536 + 8, 262144):
        array = np.arange(nbytes // 8, dtype=np.int64)
        row = dict(workload="h2d_while_busy", bytes=nbytes)
        for how in ("pageable", "pinned"):
            for _ in range(2):   # the second one is reported (the first warms the allocators)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(200_000_000)   # ~100 ms at ~2 GHz
                end.record()
                t0 = time.perf_counter()
                tensor = torch.from_numpy(array)
                out = (tensor if how == "pageable" else tensor.pin_memory()).to(dev, non_blocking=True)
                row[f"{how}_host_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                torch.cuda.synchronize()
                row["gpu_busy_ms"] = round(start.elapsed_time(end), 1)
                row[f"{how}_exact"] = bool(torch.equal(out.cpu(), tensor))
        emit(**row)
