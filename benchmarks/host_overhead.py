"""Host-side cost per engine step, measured on CPU with a one-layer, hidden-16 llama so that
the model's own compute is negligible: what every step pays in Python (scheduler, input
building, sampling inputs, output processing) before a GPU sees any work.

Times steady-state decode steps (every request running, none finishing), less the model's
forward, logits and sampler (what a GPU runs asynchronously), with `num` and `num // 4`
requests, async scheduling on and off (the best median of 3 runs of 60 steps); the per-row
cost is the slope between the two. `--profile` adds a cProfile breakdown of the async run
at `num` requests.
Usage: python benchmarks/host_overhead.py [num_requests] [--profile]"""
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


def decode_step_times(llm: LLM, timer: ModelTimer, num: int, prof: cProfile.Profile | None = None) -> list[float]:
    """Seconds per engine step (core + output processing), less the model's forward, logits
    and sampling, once all `num` requests decode."""
    engine = llm.engine
    sp = SamplingParams(max_tokens=WARMUP_STEPS + TIMED_STEPS + 64, ignore_eos=True, temperature=0.0,
                        detokenize=False)
    for i, prompt in enumerate(random_prompts(num, 512, 32, 96)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, sp)
    while engine.core.scheduler.waiting or any(not r.output_token_ids for r in engine.core.scheduler.running):
        engine.step()
    for _ in range(WARMUP_STEPS):
        engine.step()
    times = []
    for _ in range(TIMED_STEPS):
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


def main() -> None:
    import torch
    torch.set_num_threads(1)   # the tiny model gains nothing from threads; fewer timing outliers
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    num = int(args[0]) if args else 256
    path = write_micro_checkpoint(tempfile.mkdtemp())
    for async_scheduling in (True, False):
        llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=512, skip_tokenizer_init=True,
                  async_scheduling=async_scheduling, max_num_seqs=num)
        timer = ModelTimer(llm.engine.core.executor.runner)
        decode_step_times(llm, timer, 4)
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
