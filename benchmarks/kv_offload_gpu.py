"""Issue 21 (the KV cache's host tier) on one GPU: each configuration in its own subprocess
(a fresh CUDA context and host pool), one `RESULT {json}` line per run and one per comparison.

    PYTHONPATH=$PWD python3 benchmarks/kv_offload_gpu.py pressure [--only a,b,c] | multiturn | all | check
        [--host-gib N] [--no-check] [--cpu-smoke]
    PYTHONPATH=$PWD python3 benchmarks/kv_offload_gpu.py sim     # CPU only: the scheduler alone

Model: a dummy-weight llama-8b from a config alone (load_format="dummy", bf16), as
../shared/bench/peers.py makes it (copied here: that folder does not travel).

pressure   the KV cache limited to 2048 blocks of 16 = 32k tokens (num_kv_blocks), preemption
           by recompute (swap_space=0) vs by swap (swap_space --host-gib, default 4), three
           workloads, greedy, ignore_eos; output tok/s and the preemption counters (tokens of
           preempted requests got back from the device prefix cache / loaded from the host /
           recomputed). Target swap >= 1.2x recompute (the issue states it for (a)).
           (a) thr512 (peers.py: 512 requests, input U[64,1024], output U[16,512], seed 0),
               prefix caching on (the default, as users run it);
           (b) the same with prefix caching off (vLLM V0's swap setting: recompute redoes all);
           (c) long prompts: 64 requests, input U[2048,4096], output U[256,512], seed 2,
               prefix caching on (where recompute would redo long prefills, if the
               preempted contexts left the device; --only d: the same, prefix caching off).
           One process per (mode, prefix caching): (a) and (c) share one (max_model_len 4608).
           `--only` picks workloads. Expected on an H200: ~230 s for all three (a, c: ~130 s; b: ~100 s).
multiturn  64 conversations x 4 turns sharing nothing across conversations: turn 1 is 6144
           random tokens, every turn generates 64 tokens and the next appends them and 448 new
           user tokens (6144, 6656, 7168, 7680 prompt tokens: ~8k at the end). Closed loop: each
           conversation sends its next turn as soon as the last one ends, all 64 at once. The
           device cache holds 8192 blocks = 128k tokens (~16 conversations); the host tier
           --host-gib GiB (default 70: all 64 contexts, ~61 GiB, fit). TTFT (submit -> first
           token) of turns 2-4, mean and P99, without the host tier (swap_space=0) and with it;
           target >= 2x lower mean.
The host pool is pinned in the background from the first swap on: startup_s does not
include it; each run waits for it after its warm-up (pin_wait_s) so it times mapped copies.
sim        no model: the Scheduler and KVCacheManager alone run the pressure workloads with
           llama-8b's block counts (2048 device blocks, 2048 host blocks = 4 GiB, 1024 seqs,
           8192 tokens a step, lockstep) and print the same counters plus the tokens computed.
           2026-11-30, branch kvpress (tokens of preempted requests: got back from the device
           prefix cache / loaded from the host / recomputed; tokens computed vs needed):
             (a) recompute: 189 preemptions, 108,469 tokens: 63,056 / - / 45,413;
                 455,258 computed of 409,845 (+11%)
                 swap: 180, 99,684: 53,152 / 46,532 / 0; 409,845. Copies out 26,814 (21,874 of
                 them evicted prefix blocks nobody reserved: the host prefix tier; 12,445 written
                 behind), in 2,990; forwards waiting for a swap-out: 545 of 3,235 steps
                 (2,618 without write-behind). With 8192 host blocks, eager swap-out (main)
                 copied 24,075 out, lazy 23,824: the copies are the prefix tier's, not swap's.
             (b) recompute: 108,469 tokens all recomputed, 518,314 computed (+26%);
                 swap: 6,312 blocks out and in, nothing recomputed.
             (c) recompute: 8 preemptions, 25,855 tokens: 21,328 / - / 4,527 (+2% computed);
                 swap: 288 blocks in, 12,611 out (11,847 prefix tier); 58 of 2,819 forwards wait
                 for a swap-out (1,306 without write-behind).
check      (first, unless --no-check) a tiny fp32 llama with 40 blocks of 4: greedy ids with
           preemption by swap and by recompute equal to a run without preemption (ids_equal of
           6), both pools free, swaps counted. ~20 s.
--cpu-smoke  the same code on CPU at toy sizes (to check the script, not to measure).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
os.environ.setdefault("PAGEDSERVE_COMPILE_AHEAD_STRICT", "1")   # a failed compile-ahead fails the run

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, hidden_size=4096,
                intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                tie_word_embeddings=False)
TURNS, CONVERSATIONS, FIRST_PROMPT, USER_TOKENS, OUTPUT_TOKENS = 4, 64, 6144, 448, 64
PRESSURE_BLOCKS, MULTITURN_BLOCKS, MULTITURN_LEN, DTYPE = 2048, 8192, 8192, "bfloat16"
# pressure workloads: name -> (requests, input range, output range, seed, prefix caching)
WORKLOADS = {"a": (512, (64, 1024), (16, 512), 0, True), "b": (512, (64, 1024), (16, 512), 0, False),
             "c": (64, (2048, 4096), (256, 512), 2, True), "d": (64, (2048, 4096), (256, 512), 2, False)}
DEFAULT_WORKLOADS = ["a", "b", "c"]
PRESSURE_LEN, PRESSURE_HOST_GIB = 4608, 4.0   # 4 GiB: 2048 host blocks (the sim peaks at 250 held)
# --cpu-smoke (or KVOFF_SMOKE=1, which the children inherit): toy sizes on CPU
SMOKE = "--cpu-smoke" in sys.argv or os.environ.get("KVOFF_SMOKE") == "1"
if SMOKE:
    os.environ["KVOFF_SMOKE"] = "1"
    LLAMA_8B.update(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    CONVERSATIONS, FIRST_PROMPT, USER_TOKENS, OUTPUT_TOKENS = 6, 96, 24, 8
    PRESSURE_BLOCKS, MULTITURN_BLOCKS, MULTITURN_LEN, DTYPE = 48, 32, 512, "float32"
    WORKLOADS = {"a": (16, (8, 64), (4, 32), 0, True), "b": (16, (8, 64), (4, 32), 0, False),
                 "c": (6, (96, 160), (16, 32), 2, True), "d": (6, (96, 160), (16, 32), 2, False)}
    PRESSURE_LEN, PRESSURE_HOST_GIB = 256, 0.01


def emit(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def model_dir() -> str:
    path = "/tmp/models/llama-8b-kvoff" + ("-smoke" if SMOKE else "")
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/config.json", "w") as f:
        json.dump(LLAMA_8B, f)
    return path


def make_llm(**kwargs):
    from pagedserve import LLM
    start = time.time()
    llm = LLM(model=model_dir(), load_format="dummy", skip_tokenizer_init=True, dtype=DTYPE,
              gpu_memory_utilization=0.85, seed=0, **kwargs)
    return llm, round(time.time() - start, 1)


def workload(name: str) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request; (a) and (b) are peers.py's thrN."""
    n, (in_lo, in_hi), (out_lo, out_hi), seed, _ = WORKLOADS[name]
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        input_len, output_len = rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)
        reqs.append(([rng.randrange(3, 32000) for _ in range(input_len)], output_len))
    return reqs


def settle_host_tier(llm) -> dict:
    """After the warm-up: wait for the host pool's background pinning (timed from here), so
    the timed run copies through the mapped view; how copies run."""
    cache = getattr(getattr(llm.engine.core.executor, "runner", None), "host_cache", None)
    if cache is None or cache.stream is None:
        return {}
    start = time.time()
    cache.wait_pinned()
    return dict(pin_wait_s=round(time.time() - start, 1), copy_mode=cache.copy_mode)


def counters(kv, scheduler) -> dict:
    """Cumulative counters of the KV cache manager and scheduler."""
    st = kv.stats
    return dict(preemptions=scheduler.stats.num_preemptions, swap_preemptions=scheduler.stats.num_swap_preemptions,
                preempted_tokens=st.preempted_tokens, resumed_device_tokens=st.resumed_device_tokens,
                resumed_host_tokens=st.resumed_host_tokens, blocks_swapped_out=st.blocks_swapped_out,
                blocks_swapped_in=st.blocks_swapped_in, blocks_offloaded=st.blocks_offloaded, prefix_hit_tokens=st.hits, host_prefix_hit_tokens=st.host_hits)


def diff(after: dict, before: dict) -> dict:
    out = {k: after[k] - before[k] for k in after}
    # preempted and not (yet) resumed counts as neither; at the end every request resumed
    out["recomputed_tokens"] = out["preempted_tokens"] - out["resumed_device_tokens"] - out["resumed_host_tokens"]
    return out


def leak_free(kv) -> bool:
    """Every device and host block free, no swapped request, no pending reservation."""
    host_ok = kv.host is None or kv.host.num_free_blocks == kv.host.num_blocks
    return kv.pool.num_free_blocks == kv.pool.num_blocks and host_ok and not kv.req_to_host_blocks \
        and not kv._pending


def run_pressure(mode: str, caching: bool, names: list[str], host_gib: float) -> None:
    """One engine (mode, prefix caching); each named workload on it in turn."""
    from pagedserve import SamplingParams
    swap = mode == "swap"
    llm, startup = make_llm(max_model_len=PRESSURE_LEN, num_kv_blocks=PRESSURE_BLOCKS,
                            swap_space=host_gib if swap else 0, enable_prefix_caching=caching,
                            preemption_mode="swap" if swap else "recompute")
    kv, scheduler = llm.engine.core.kv_cache_manager, llm.engine.core.scheduler
    for name in names:
        reqs = workload(name)
        prompts = [{"prompt_token_ids": p} for p, _ in reqs]
        params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
        warm = [{"prompt_token_ids": [3 + (t * 7) % 31990 for t in p]} for p, _ in reqs[:8]]   # no prefix shared
        llm.generate(warm, params[:8], use_tqdm=False)   # warm-up
        tier = settle_host_tier(llm)
        before = counters(kv, scheduler)
        start = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.time() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        emit(workload=name, mode=mode, prefix_caching=caching, startup_s=startup, wall_s=round(wall, 2),
             out_tok_s=round(generated / wall, 1), gen_tokens=generated,
             gen_tokens_ok=generated == sum(o for _, o in reqs), leak_free=leak_free(kv),
             host_blocks=kv.num_host_blocks, **tier, **diff(counters(kv, scheduler), before))


def run_multiturn(mode: str, host_gib: float) -> None:
    from pagedserve import SamplingParams
    from pagedserve.frontend.output_processor import OutputKind
    with_tier = mode == "host_tier"
    tier = dict(kv_offloading_size=host_gib) if with_tier else dict(swap_space=0)
    llm, startup = make_llm(max_model_len=MULTITURN_LEN, num_kv_blocks=MULTITURN_BLOCKS, **tier)
    engine = llm.engine
    kv, scheduler = engine.core.kv_cache_manager, engine.core.scheduler
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0.0, detokenize=False)
    warm = [{"prompt_token_ids": [(i * 7) % 32000 + 3 for i in range(n)]} for n in ((64,) if SMOKE else (512, 2048))]
    llm.generate(warm, params, use_tqdm=False)
    tier = settle_host_tier(llm)
    rng = random.Random(1)
    context = [[rng.randrange(3, 32000) for _ in range(FIRST_PROMPT)] for _ in range(CONVERSATIONS)]
    pending: dict[str, tuple[int, int, float]] = {}
    outputs: dict[str, list[int]] = {}
    ttft: dict[int, list[float]] = {turn: [] for turn in range(TURNS)}

    def submit(conv: int, turn: int) -> None:
        rid = f"c{conv}t{turn}"
        outputs[rid] = []
        pending[rid] = (conv, turn, time.perf_counter())
        engine.add_request(rid, {"prompt_token_ids": list(context[conv])}, params, output_kind=OutputKind.DELTA)

    before = counters(kv, scheduler)
    start = time.perf_counter()
    for conv in range(CONVERSATIONS):
        submit(conv, 0)
    while pending:
        for out in engine.step():
            rid = out.request_id
            conv, turn, submitted = pending[rid]
            tokens = out.outputs[0].token_ids
            if tokens and not outputs[rid]:
                ttft[turn].append(time.perf_counter() - submitted)
            outputs[rid] += tokens
            if out.finished:
                del pending[rid]
                context[conv] += outputs[rid] + [rng.randrange(3, 32000) for _ in range(USER_TOKENS)]
                if turn + 1 < TURNS:
                    submit(conv, turn + 1)
    wall = time.perf_counter() - start
    later = sorted(t for turn in range(1, TURNS) for t in ttft[turn])
    emit(workload="multiturn", mode=mode, startup_s=startup, wall_s=round(wall, 2),
         ttft_turns_2_4_mean_ms=round(1e3 * sum(later) / len(later), 1),
         ttft_turns_2_4_p99_ms=round(1e3 * later[min(len(later) - 1, int(0.99 * len(later)))], 1),
         ttft_turn_1_mean_ms=round(1e3 * sum(ttft[0]) / len(ttft[0]), 1), n_later=len(later),
         leak_free=leak_free(kv), host_blocks=kv.num_host_blocks, **tier, **diff(counters(kv, scheduler), before))


def run_check() -> None:
    """Correctness on the device before timing: a tiny fp32 llama (dummy weights), 6 prompts,
    greedy; 40 blocks of 4 force preemptions. Token ids with preemption by swap (mapped copies,
    reservations, write-behind) and by recompute vs a run with room for all; both pools free."""
    from pagedserve import LLM, SamplingParams
    config = dict(LLAMA_8B, vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32")
    path = "/tmp/models/llama-tiny-kvoff-check"
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(20, 60))]} for _ in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0, detokenize=False)

    def ids(**kwargs) -> tuple[list[list[int]], object]:
        llm = LLM(model=path, load_format="dummy", skip_tokenizer_init=True, dtype="float32", seed=0,
                  block_size=4, max_model_len=128, **kwargs)
        cache = getattr(getattr(llm.engine.core.executor, "runner", None), "host_cache", None)
        if cache is not None and cache.stream is not None:
            cache.wait_pinned()
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        return outs, llm

    reference, llm = ids(num_kv_blocks=1024, swap_space=0)
    del llm
    for mode, kwargs in (("swap", dict(swap_space=0.01)), ("recompute", dict(swap_space=0))):
        outs, llm = ids(num_kv_blocks=40, preemption_mode=mode, **kwargs)
        kv, scheduler = llm.engine.core.kv_cache_manager, llm.engine.core.scheduler
        cache = getattr(llm.engine.core.executor.runner, "host_cache", None)
        emit(check=mode, ids_equal=sum(a == b for a, b in zip(outs, reference)), of=len(reference),
             leak_free=leak_free(kv), copy_mode=cache.copy_mode if cache is not None else None,
             **diff(counters(kv, scheduler), dict.fromkeys(counters(kv, scheduler), 0)))
        del llm


def run_sim(name: str, mode: str, num_blocks: int = 2048, host_blocks: int = 2048, block_size: int = 16,
            max_num_seqs: int = 1024, max_tokens_per_step: int = 8192) -> dict:
    """The scheduler alone (no model: every sampled token is 7), lockstep, on a pressure
    workload: the counters, the tokens computed and the steps taken."""
    from pagedserve.core.kv_cache_manager import KVCacheManager
    from pagedserve.core.request import Request, RequestId
    from pagedserve.core.scheduler import Scheduler
    from pagedserve.engine_io import ModelRunnerOutput
    from pagedserve.sampling_params import SamplingParams
    caching = WORKLOADS[name][4]
    kv = KVCacheManager(num_blocks, block_size, caching, num_host_blocks=host_blocks if mode == "swap" else 0)
    scheduler = Scheduler(kv, max_num_seqs, max_tokens_per_step, PRESSURE_LEN, preemption_mode=mode)
    reqs = workload(name)
    for i, (prompt, out_len) in enumerate(reqs):
        params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0)
        scheduler.add_request(Request(RequestId(str(i)), prompt, params, max_tokens=out_len))
    steps = computed = peak_host = behind = waiting_steps = 0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        steps += 1
        computed += out.total_num_scheduled_tokens
        behind += out.num_swap_out_behind
        waiting_steps += len(out.blocks_to_swap_out) > out.num_swap_out_behind   # the forward waits for a copy
        peak_host = max(peak_host, round(kv.host_usage() * kv.num_host_blocks))
        sampled = {rid: 7 for rid, n in out.num_scheduled_tokens.items()
                   if scheduler.requests[rid].num_scheduled_tokens_ahead >= scheduler.requests[rid].num_tokens}
        scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    needed = sum(len(p) + o - 1 for p, o in reqs)
    return dict(workload=name, mode=mode, prefix_caching=caching, steps=steps, tokens_computed=computed,
                tokens_needed=needed, leak_free=leak_free(kv), peak_host_blocks=peak_host,
                blocks_written_behind=behind, steps_waiting_for_swap_outs=waiting_steps,
                **diff(counters(kv, scheduler), dict.fromkeys(counters(kv, scheduler), 0)))


def child(args: list[str]) -> list[dict]:
    """Run one configuration in a fresh interpreter; its RESULT lines, parsed."""
    proc = subprocess.run([sys.executable, __file__, "_one", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    results = []
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            print(line, flush=True)
            results.append(json.loads(line[7:]))
    if proc.returncode != 0 or not results:
        print(f"FAILED {' '.join(args)} (exit {proc.returncode}); last lines:\n"
              + "\n".join(proc.stdout.splitlines()[-25:]), flush=True)
    if "OUT" in os.environ:
        with open(os.path.join(os.environ["OUT"], "kv_offload_" + "_".join(args).replace("/", "-") + ".txt"), "w") as f:
            f.write(proc.stdout)
    return results


def compare_pressure(results: list[dict]) -> None:
    by = {(r["workload"], r["mode"]): r for r in results}
    for name in WORKLOADS:
        recompute, swap = by.get((name, "recompute")), by.get((name, "swap"))
        if recompute and swap:
            emit(comparison=f"pressure_{name}", prefix_caching=WORKLOADS[name][4],
                 swap_over_recompute=round(swap["out_tok_s"] / recompute["out_tok_s"], 2), target=1.2,
                 recomputed_tokens=[recompute["recomputed_tokens"], swap["recomputed_tokens"]],
                 swap_blocks_out_in=[swap["blocks_swapped_out"], swap["blocks_swapped_in"]])


def main(argv: list[str]) -> None:
    argv = [a for a in argv if a != "--cpu-smoke"]
    if argv[0] == "_one":
        kind, mode = argv[1], argv[2]
        if kind == "check":
            run_check()
        elif kind == "pressure":
            run_pressure(mode, argv[3] == "on", argv[4].split(","), float(argv[5]))
        else:
            run_multiturn(mode, float(argv[3]))
        return
    which = argv[0]
    if which == "sim":
        results = []
        for name in (argv[argv.index("--only") + 1].split(",") if "--only" in argv else DEFAULT_WORKLOADS):
            for mode in ("recompute", "swap"):
                results.append(run_sim(name, mode))
                print(json.dumps(results[-1]), flush=True)
        return
    gib = float(argv[argv.index("--host-gib") + 1]) if "--host-gib" in argv else None
    if which in ("pressure", "all", "check") and "--no-check" not in argv:
        child(["check", "-"])
    if which in ("pressure", "all"):
        names = argv[argv.index("--only") + 1].split(",") if "--only" in argv else DEFAULT_WORKLOADS
        results = []
        for caching in (True, False):   # each pair of runs compared as soon as it is done
            group = [n for n in names if WORKLOADS[n][4] == caching]
            for mode in ("recompute", "swap") if group else ():
                results += child(["pressure", mode, "on" if caching else "off", ",".join(group),
                                  str(gib if gib is not None else PRESSURE_HOST_GIB)])
            compare_pressure([r for r in results if r["prefix_caching"] == caching])
    if which in ("multiturn", "all"):
        host_gib = str(gib if gib is not None else (0.02 if SMOKE else 70.0))
        without, with_tier = child(["multiturn", "no_host_tier", host_gib]), child(["multiturn", "host_tier", host_gib])
        if without and with_tier:
            without, with_tier = without[0], with_tier[0]
            emit(comparison="multiturn_ttft_turns_2_4",
                 mean_ratio=round(without["ttft_turns_2_4_mean_ms"] / with_tier["ttft_turns_2_4_mean_ms"], 2),
                 p99_ratio=round(without["ttft_turns_2_4_p99_ms"] / with_tier["ttft_turns_2_4_p99_ms"], 2), target=2.0)


if __name__ == "__main__":
    main(sys.argv[1:] or ["all"])
