"""Host-side cost per engine step, measured on CPU with a one-layer, hidden-16 llama so that
the model's own compute is negligible: what every step pays in Python (scheduler, input
building, sampling inputs, output processing) before a GPU sees any work.

Times steady-state decode steps (every request running, none finishing), less the model's
forward, logits and sampler (what a GPU runs asynchronously), with `num` and `num // 4`
requests, async scheduling on and off (the best median of 3 runs of 60 steps); the per-row
cost is the slope between the two. `--profile` adds a cProfile breakdown of the async run
at `num` requests. `--viewer` measures what a dashboard viewer costs instead (issue 23): the
mean host time per decode step at `num` requests, in alternating blocks of steps without and
with a viewer (snapshots requested as the server's ticker does: every 100 ms of wall time,
or less often when the last one cost more than 0.25% of that interval; each encoded as the
server does: on the server that runs on the event loop, here it is counted in the step).
`--phases`: the async step split by phase (print_phases) instead. `--gc`: the async step with
CPython's gen-0 threshold as it is and as LLM.generate runs it, alternating (gc_ab).
`--window K`: host ms per decode step (each row's token) at one step a schedule and at decode
windows of K (num_scheduler_steps), alternating blocks in one engine (window_ab); with `--tp N`,
over N tensor-parallel ranks (gloo; async TP, whose workers take each step's ids from rank 0):
rank 0's host ms, which then include its waits for the workers in the all-reduces.
Usage: python benchmarks/host_overhead.py [num_requests] [--profile | --viewer | --phases | --gc | --window K [--tp N]]"""
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, ".")
from pagedserve import LLM, SamplingParams  # noqa: E402
from tests.helpers import random_prompts  # noqa: E402

WARMUP_STEPS, TIMED_STEPS, REPEATS = 8, 60, 3


def write_micro_checkpoint(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class ModelTimer:
    """Wraps the runner's forward, logits and sampler calls; `seconds` accumulates their
    time (the part of a CPU step that a GPU would run asynchronously)."""

    def __init__(self, runner) -> None:
        self.seconds = 0.0
        for owner, name in ((runner.model, "forward"), (runner.model, "compute_logits"), (runner, "sampler")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def start_decoding(engine, num: int, max_tokens: int) -> None:
    """`num` requests r0.. (prompts of 32-96 tokens), run until all of them decode, then warmed up."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    for i, prompt in enumerate(random_prompts(num, 512, 32, 96)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, sp)
    while engine.core.scheduler.waiting or any(not r.output_token_ids for r in engine.core.scheduler.running):
        engine.step()
    for _ in range(WARMUP_STEPS):
        engine.step()


def decode_step_times(llm: LLM, timer: ModelTimer, num: int, prof: cProfile.Profile | None = None,
                      on_start=None, steps: int = TIMED_STEPS) -> list[float]:
    """Seconds per engine step (core + output processing), less the model's forward, logits
    and sampling, once all `num` requests decode (`on_start` called then)."""
    engine = llm.engine
    start_decoding(engine, num, WARMUP_STEPS + steps + 64)
    if on_start is not None:
        on_start()
    times = []
    for _ in range(steps):
        if prof is not None:
            prof.enable()
        t0, model_s = time.perf_counter(), timer.seconds
        engine.step()
        times.append(time.perf_counter() - t0 - (timer.seconds - model_s))
        if prof is not None:
            prof.disable()
    for i in range(num):
        engine.abort_request(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
    return times


def viewer_overhead(llm: LLM, timer: ModelTimer, num: int, block: int = 150, pairs: int = 4
                    ) -> tuple[list[float], list[float], int, float, float]:
    """(host s of each step without a viewer, of each step with one, snapshots taken, their
    build + encode seconds, seconds spent logging steps for them) over `pairs` alternating
    blocks of `block` steps (ABBA order) after one unmeasured block, all `num` requests
    decoding (at most 96 + 8 + 1350 + 8 tokens each: run with max_model_len 2048)."""
    from pagedserve.core.snapshot import StepLog
    from pagedserve.server.dashboard import encode_snapshot, encode_step, snapshot_interval
    log_s = [0.0]   # time in StepLog.log, the per-step part of the cost
    log = StepLog.log

    def timed_log(self, *args) -> None:
        t0 = time.perf_counter()
        log(self, *args)
        log_s[0] += time.perf_counter() - t0

    StepLog.log = timed_log
    engine = llm.engine
    start_decoding(engine, num, WARMUP_STEPS + (2 * pairs + 1) * block + 8)
    for _ in range(block):
        engine.step()
    spent: dict[bool, list[float]] = {False: [], True: []}
    snapshots, snapshot_s = 0, 0.0
    watched_clock, next_request = 0.0, 0.0   # the ticker's clock: wall time while watched
    for watched in [False, True, True, False] * (pairs // 2):   # ABBA: steps slow down as sequences grow
        for _ in range(block):
            t0, model_s = time.perf_counter(), timer.seconds
            if watched and watched_clock >= next_request:
                engine.request_snapshot()
                next_request = float("inf")
            _, stats = engine.step_with_stats()
            if stats.snapshot is not None:
                encoding = time.thread_time()   # CPU time, as the server's hub counts it
                encode_snapshot(stats.snapshot, "m")
                [encode_step(s) for s in stats.snapshot.steps]
                cost = time.thread_time() - encoding + stats.snapshot.build_seconds
                next_request = watched_clock + (time.perf_counter() - t0) + snapshot_interval(cost)
                snapshots += 1
                snapshot_s += cost
            if watched:
                watched_clock += time.perf_counter() - t0
            spent[watched].append(time.perf_counter() - t0 - (timer.seconds - model_s))
        if watched:   # the ticker's clock runs on: the next watched block waits for it
            engine.stop_snapshots()
    for i in range(num):
        engine.abort_request(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
    StepLog.log = log
    return spent[False], spent[True], snapshots, snapshot_s, log_s[0]


def print_phases(llm: LLM, timer: ModelTimer, num: int, steps: int = 200) -> None:
    """Host ms a step in each phase of a decode step at `num` rows: each wrapped call's wall
    time (less the model's), summed per step, the median over `steps` steps (nested phases
    are listed under their callers)."""
    from pagedserve.core import engine_core, scheduler
    from pagedserve.frontend import output_processor
    from pagedserve.worker import model_runner, pending_output
    phases = [(scheduler.Scheduler, "schedule"), (scheduler.Scheduler, "update_from_output"),
              (engine_core.EngineCore, "_update"), (output_processor.OutputProcessor, "process_outputs"),
              (model_runner.ModelRunner, "execute_model"), (model_runner.ModelRunner, "_update_states"),
              (model_runner.ModelRunner, "_sample"), (pending_output.PendingRunnerOutput, "get"),
              (model_runner, "build_step_inputs")]
    spent = {name: 0.0 for _, name in phases}
    saved = []
    for owner, name in phases:
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def timed(*args, _fn=fn, _name=name, **kwargs):
            t0, model_s = time.perf_counter(), timer.seconds
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - t0 - (timer.seconds - model_s)
        setattr(owner, name, timed)
    engine = llm.engine
    start_decoding(engine, num, WARMUP_STEPS + steps + 64)
    per_step = {name: [] for name in spent}
    totals = []
    for _ in range(steps):
        spent.update({name: 0.0 for name in spent})
        t0, model_s = time.perf_counter(), timer.seconds
        engine.step()
        totals.append(time.perf_counter() - t0 - (timer.seconds - model_s))
        for name, sec in spent.items():
            per_step[name].append(sec)
    for i in range(num):
        engine.abort_request(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
    for owner, name, fn in saved:
        setattr(owner, name, fn)
    print(f"phases at {num} rows, median of {steps} steps (host ms a step; step {statistics.median(totals) * 1e3:.3f},"
          f" min {min(totals) * 1e3:.3f}):")
    for name, secs in per_step.items():
        print(f"  {name:<22} {statistics.median(secs) * 1e3:7.3f}")


def gc_ab(llm: LLM, timer: ModelTimer, num: int, pairs: int = 4, steps: int = 200) -> None:
    """`--gc`: host ms a decode step at `num` rows with CPython's gen-0 threshold as it is and at
    gc_policy.HOT_GEN0_THRESHOLD (what LLM.generate's loop runs at), alternating rounds of
    `steps` steps in this process, with the collections each round made and their time."""
    import gc
    from pagedserve.frontend.gc_policy import HOT_GEN0_THRESHOLD
    spent = {"n": 0, "s": 0.0, "t0": 0.0}

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            spent["t0"] = time.perf_counter()
        else:
            spent["n"] += 1
            spent["s"] += time.perf_counter() - spent["t0"]

    base = gc.get_threshold()
    gc.callbacks.append(count)
    try:
        for _ in range(pairs):
            for threshold in (base, (HOT_GEN0_THRESHOLD, *base[1:])):
                gc.set_threshold(*threshold)
                spent.update(n=0, s=0.0)
                t = decode_step_times(llm, timer, num, steps=steps)
                print(f"gen-0 threshold {threshold[0]}: {num} rows, host median {statistics.median(t) * 1e3:.3f} ms, "
                      f"mean {statistics.mean(t) * 1e3:.3f} ms; {spent['n']} collections, {spent['s'] * 1e3:.1f} ms "
                      f"(in the round's {steps} steps and its start-up)", flush=True)
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*base)


def window_ab(llm: LLM, timer: ModelTimer, num: int, window: int, pairs: int = 4, tokens: int = 96) -> None:
    """Host ms per decode step at `num` rows with num_scheduler_steps 1 and `window`, in
    alternating blocks of `tokens` tokens a row (the scheduler's knob flipped between blocks)."""
    engine = llm.engine
    scheduler = engine.core.scheduler
    start_decoding(engine, num, WARMUP_STEPS + 2 * pairs * (tokens + 2 * window) + 64)
    row = scheduler.requests["r0"]
    per_step: dict[int, list[float]] = {1: [], window: []}
    for _ in range(pairs):
        for k in (1, window):
            scheduler.num_scheduler_steps = k
            for _ in range(2):   # the window in flight when the knob flips, at the old size
                engine.step()
            start, host = len(row.output_token_ids), 0.0
            while len(row.output_token_ids) - start < tokens:
                t0, model_s = time.perf_counter(), timer.seconds
                engine.step()
                host += time.perf_counter() - t0 - (timer.seconds - model_s)
            per_step[k].append(host / (len(row.output_token_ids) - start))
    for k, values in per_step.items():
        print(f"num_scheduler_steps {k}: {num} rows, host ms per decode step "
              f"{' / '.join(f'{v * 1e3:.3f}' for v in values)} (median {statistics.median(values) * 1e3:.3f})")
    for i in range(num):
        engine.abort_request(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    import torch
    torch.set_num_threads(1)   # the tiny model gains nothing from threads; fewer timing outliers
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for flag in ("--window", "--tp"):
        if flag in sys.argv:
            args.remove(sys.argv[sys.argv.index(flag) + 1])
    tp = int(sys.argv[sys.argv.index("--tp") + 1]) if "--tp" in sys.argv else 1
    num = int(args[0]) if args else 256
    path = write_micro_checkpoint(tempfile.mkdtemp())
    for async_scheduling in (True, False):
        viewer = "--viewer" in sys.argv
        # longer runs: 2048 positions (the micro model's rope extends them)
        long_runs = viewer or "--window" in sys.argv
        llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=2048 if long_runs else 512,
                  allow_long_max_model_len=long_runs, skip_tokenizer_init=True, async_scheduling=async_scheduling,
                  max_num_seqs=num, tensor_parallel_size=tp)
        timer = ModelTimer(llm.engine.core.executor.runner)
        decode_step_times(llm, timer, 4)
        if "--window" in sys.argv:   # async only
            window_ab(llm, timer, num, int(sys.argv[sys.argv.index("--window") + 1]))
            llm.engine.shutdown()
            break
        if viewer:
            off, on, snapshots, snapshot_s, log_s = viewer_overhead(llm, timer, num)
            watched_s = sum(on)
            without, with_viewer = statistics.median(off), statistics.median(on)
            print(f"{'async' if async_scheduling else 'lockstep'}: {num} rows, median host ms/step without a viewer "
                  f"{without * 1e3:.3f}, with one {with_viewer * 1e3:.3f} ({(with_viewer / without - 1) * 100:+.1f}%), "
                  f"means {statistics.mean(off) * 1e3:.3f} / {statistics.mean(on) * 1e3:.3f}; "
                  f"of the watched steps' host time: {snapshots} snapshots {snapshot_s * 1e3:.1f} ms "
                  f"({snapshot_s / watched_s * 100:.2f}%), step log {log_s * 1e3:.1f} ms "
                  f"({log_s / watched_s * 100:.2f}%)")
            llm.engine.shutdown()
            continue
        if "--phases" in sys.argv or "--gc" in sys.argv:   # async only
            (print_phases if "--phases" in sys.argv else gc_ab)(llm, timer, num)
            llm.engine.shutdown()
            break
        small, large = (min(statistics.median(decode_step_times(llm, timer, n)) for _ in range(REPEATS))
                        for n in (num // 4, num))
        per_row = (large - small) / (num - num // 4)
        print(f"{'async' if async_scheduling else 'lockstep'}: {num} rows {large * 1e3:.2f} ms/step, "
              f"{num // 4} rows {small * 1e3:.2f} ms/step, {per_row * 1e6:.1f} us per row (slope), "
              f"{large / num * 1e6:.1f} us per row (total / rows)")
        if async_scheduling and "--profile" in sys.argv:
            prof = cProfile.Profile()
            decode_step_times(llm, timer, num, prof)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            print(s.getvalue()[:7000])
        llm.engine.shutdown()


if __name__ == "__main__":
    main()
