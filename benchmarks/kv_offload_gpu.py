"""Issue 21 (the KV cache's host tier) on one GPU: two measurements, each configuration in its
own subprocess (a fresh CUDA context and host pool), one `RESULT {json}` line per run and one
per comparison.

    PYTHONPATH=$PWD python3 benchmarks/kv_offload_gpu.py pressure | multiturn | all [--host-gib N]

Model: a dummy-weight llama-8b from a config alone (load_format="dummy", bf16), as
../shared/bench/peers.py makes it (copied here: that folder does not travel).

pressure   thr512 (peers.py's workload: 512 requests, input U[64,1024], output U[16,512],
           seed 0, greedy, ignore_eos) with the KV cache limited to 2048 blocks of 16 = 32k
           tokens (num_kv_blocks), max_model_len 2048: preemption by recompute (swap_space=0,
           today's engine) vs preemption by swap (swap_space 16 GiB, the default mode).
           Output tok/s; target swap >= 1.2x.
multiturn  64 conversations x 4 turns sharing nothing across conversations: turn 1 is 6144
           random tokens, every turn generates 64 tokens and the next appends them and 448 new
           user tokens (6144, 6656, 7168, 7680 prompt tokens: ~8k at the end). Closed loop: each
           conversation sends its next turn as soon as the last one ends, all 64 at once. The
           device cache holds 8192 blocks = 128k tokens (~16 conversations); the host tier
           --host-gib GiB (default 70: all 64 contexts, ~61 GiB, fit). TTFT (submit -> first
           token) of turns 2-4, mean and P99, without the host tier (swap_space=0) and with it;
           target >= 2x lower mean.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, hidden_size=4096,
                intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                tie_word_embeddings=False)
TURNS, CONVERSATIONS, FIRST_PROMPT, USER_TOKENS, OUTPUT_TOKENS = 4, 64, 6144, 448, 64
THR_REQUESTS, PRESSURE_BLOCKS, MULTITURN_BLOCKS, MULTITURN_LEN, DTYPE = 512, 2048, 8192, 8192, "bfloat16"
# KVOFF_SMOKE=1: the same code on CPU at toy sizes (to check the script, not to measure)
SMOKE = os.environ.get("KVOFF_SMOKE") == "1"
if SMOKE:
    LLAMA_8B.update(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    CONVERSATIONS, FIRST_PROMPT, USER_TOKENS, OUTPUT_TOKENS = 6, 96, 24, 8
    THR_REQUESTS, PRESSURE_BLOCKS, MULTITURN_BLOCKS, MULTITURN_LEN, DTYPE = 24, 256, 32, 512, "float32"


def emit(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def model_dir() -> str:
    path = "/tmp/models/llama-8b-kvoff"
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


def thr_workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """peers.py's thrN: input U[64,1024], output U[16,512]."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        input_len, output_len = rng.randint(64, 1024), rng.randint(16, 512)
        reqs.append(([rng.randrange(3, 32000) for _ in range(input_len)], output_len))
    return reqs


def offload_stats(llm) -> dict:
    stats = llm.engine.stats()
    return dict(preemptions=stats.num_preemptions,
                swap_preemptions=llm.engine.core.scheduler.stats.num_swap_preemptions,
                blocks_swapped_out=stats.kv_offload_blocks_swapped_out,
                blocks_swapped_in=stats.kv_offload_blocks_swapped_in,
                host_prefix_hit_tokens=stats.kv_offload_host_prefix_hits,
                host_blocks=llm.engine.core.kv_cache_manager.num_host_blocks)


def run_pressure(mode: str) -> None:
    from pagedserve import SamplingParams
    swap = mode == "swap"
    llm, startup = make_llm(max_model_len=2048, num_kv_blocks=PRESSURE_BLOCKS, swap_space=16 if swap else 0,
                            preemption_mode="swap" if swap else "recompute")
    reqs = thr_workload(THR_REQUESTS)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)   # warm-up
    before = offload_stats(llm)
    start = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.time() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    after = offload_stats(llm)
    emit(workload="pressure_thr512", mode=mode, startup_s=startup, wall_s=round(wall, 2),
         out_tok_s=round(generated / wall, 1), gen_tokens=generated,
         **{k: after[k] - before[k] if k != "host_blocks" else after[k] for k in after})


def run_multiturn(mode: str, host_gib: float) -> None:
    from pagedserve import SamplingParams
    from pagedserve.frontend.output_processor import OutputKind
    with_tier = mode == "host_tier"
    tier = dict(kv_offloading_size=host_gib) if with_tier else dict(swap_space=0)
    llm, startup = make_llm(max_model_len=MULTITURN_LEN, num_kv_blocks=MULTITURN_BLOCKS, **tier)
    engine = llm.engine
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0.0, detokenize=False)
    warm = [{"prompt_token_ids": [(i * 7) % 32000 + 3 for i in range(n)]} for n in ((64,) if SMOKE else (512, 2048))]
    llm.generate(warm, params, use_tqdm=False)
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

    before = offload_stats(llm)
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
    after = offload_stats(llm)
    emit(workload="multiturn", mode=mode, startup_s=startup, wall_s=round(wall, 2),
         ttft_turns_2_4_mean_ms=round(1e3 * sum(later) / len(later), 1),
         ttft_turns_2_4_p99_ms=round(1e3 * later[min(len(later) - 1, int(0.99 * len(later)))], 1),
         ttft_turn_1_mean_ms=round(1e3 * sum(ttft[0]) / len(ttft[0]), 1), n_later=len(later),
         **{k: after[k] - before[k] if k != "host_blocks" else after[k] for k in after})


def child(kind: str, mode: str, host_gib: float) -> dict | None:
    """Run one configuration in a fresh interpreter; its RESULT line, parsed."""
    cmd = [sys.executable, __file__, "_one", kind, mode, str(host_gib)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            print(line, flush=True)
            result = json.loads(line[7:])
    if proc.returncode != 0 or result is None:
        print(f"FAILED {kind} {mode} (exit {proc.returncode}); last lines:\n" + "\n".join(proc.stdout.splitlines()[-25:]),
              flush=True)
    return result


def main(argv: list[str]) -> None:
    if argv[0] == "_one":
        kind, mode, host_gib = argv[1], argv[2], float(argv[3])
        run_pressure(mode) if kind == "pressure" else run_multiturn(mode, host_gib)
        return
    which = argv[0]
    host_gib = float(argv[argv.index("--host-gib") + 1]) if "--host-gib" in argv else 70.0
    if which in ("pressure", "all"):
        recompute, swap = child("pressure", "recompute", host_gib), child("pressure", "swap", host_gib)
        if recompute and swap:
            emit(comparison="pressure_thr512", swap_over_recompute=round(swap["out_tok_s"] / recompute["out_tok_s"], 2),
                 target=1.2)
    if which in ("multiturn", "all"):
        without, with_tier = child("multiturn", "no_host_tier", host_gib), child("multiturn", "host_tier", host_gib)
        if without and with_tier:
            emit(comparison="multiturn_ttft_turns_2_4",
                 mean_ratio=round(without["ttft_turns_2_4_mean_ms"] / with_tier["ttft_turns_2_4_mean_ms"], 2),
                 p99_ratio=round(without["ttft_turns_2_4_p99_ms"] / with_tier["ttft_turns_2_4_p99_ms"], 2), target=2.0)


if __name__ == "__main__":
    main(sys.argv[1:] or ["all"])
