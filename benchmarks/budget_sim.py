"""How the token budget a step (max_num_batched_tokens) moves thr512 (issue 22, session 33): the
scheduler's order replayed without a model (running rows first, one token each; then waiting prompts,
chunked, in arrival order) on peers.py's workload, each step costed by a rough llama-1b H200 model:
a fixed 0.3 ms + 16 attention launches x 15 us + max(weights 0.57 ms, tokens x 2 x 0.97 GFLOP at
760 TFLOP/s) + the decode rows' KV bytes (32 KB a token of context) at 3.9 TB/s. Prints steps, the
modelled wall and out tok/s per budget. The model is optimistic in absolute terms (it reads ~2.2 s
where the H200 measures ~2.75 s); only the differences between budgets are its prediction.

    python3 benchmarks/budget_sim.py [8192 16384 ...]   (needs .devcarry/peers.py or ../shared/bench)
    python3 benchmarks/budget_sim.py --pad [budget]      the rows the decode-only steps pad up to their CUDA
                                                         graph's bucket, today's buckets and finer ones (session 48)"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [".devcarry", os.path.join(os.path.dirname(os.path.abspath(".")), "shared", "bench")]

KV_BYTES, BANDWIDTH = 32 * 1024, 3.9e12
FIXED_S, ATTENTION_FIXED_S, WEIGHTS_S = 0.30e-3, 16 * 15e-6, 0.57e-3
FLOP_A_TOKEN, FLOP_RATE = 2 * 0.97e9, 760e12


def simulate(lengths: list[tuple[int, int]], budget: int, decode_rows: list[int] | None = None) -> tuple[int, float]:
    """(steps, modelled seconds) for requests of (prompt, output) lengths, all arriving at once.
    `decode_rows`: appended with each decode-only step's row count."""
    waiting = list(range(len(lengths)))
    running: list[int] = []
    prompt_left = [p for p, _ in lengths]
    context = [0] * len(lengths)
    produced = [0] * len(lengths)
    steps, seconds = 0, 0.0
    while waiting or running:
        left, tokens, kv_tokens, decodes = budget, 0, 0, 0
        for i in list(running):
            if left <= 0:
                break
            if prompt_left[i]:
                n = min(prompt_left[i], left)
                prompt_left[i] -= n
            else:
                n = 1
                decodes += 1
                kv_tokens += context[i]
                produced[i] += 1
                if produced[i] >= lengths[i][1]:
                    running.remove(i)
            context[i] += n
            left -= n
            tokens += n
        while waiting and left > 0:
            i = waiting.pop(0)
            n = min(prompt_left[i], left)
            prompt_left[i] -= n
            context[i] += n
            left -= n
            tokens += n
            running.append(i)
        for i in running:   # a prompt's last chunk samples its first token
            if not prompt_left[i] and not produced[i]:
                produced[i] = 1
        if decode_rows is not None and decodes and decodes == tokens:
            decode_rows.append(decodes)
        seconds += FIXED_S + ATTENTION_FIXED_S + max(WEIGHTS_S, tokens * FLOP_A_TOKEN / FLOP_RATE) \
            + kv_tokens * KV_BYTES / BANDWIDTH
        steps += 1
    return steps, seconds


def thr512_lengths() -> list[tuple[int, int]]:
    """peers.py's thr512 requests as (prompt, output) lengths."""
    from peers import workload
    return [(len(p), o) for p, o in workload(512)]


def padded_rows(budget: int) -> None:
    """The rows thr512's decode-only steps pad up to their graph's bucket (all, and above 180 rows, where the GEMMs
    of an 8B model are bound by compute), with cuda_graph.batch_size_buckets and with finer ones."""
    import bisect
    from pagedserve.worker.cuda_graph import batch_size_buckets
    rows: list[int] = []
    simulate(thr512_lengths(), budget, rows)
    small = [1, 2, 4, 8] + list(range(16, 129, 16))
    for name, buckets in (("today's", batch_size_buckets(512)), ("every 32 above 128", small + list(range(160, 513, 32))),
                          ("every 16 above 128", small + list(range(144, 513, 16)))):
        pads = [(r, buckets[bisect.bisect_left(buckets, r)] - r) for r in rows]
        print(f"{name} ({len(buckets)} graphs): {len(rows)} decode-only steps pad {sum(p for _, p in pads):,} rows, "
              f"{sum(p for r, p in pads if r > 180):,} of them in steps above 180 rows")


def main(budgets: list[int]) -> None:
    lengths = thr512_lengths()
    out_tokens = sum(o for _, o in lengths)
    for budget in budgets:
        steps, seconds = simulate(lengths, budget)
        print(f"budget {budget}: {steps} steps, modelled {seconds:.3f} s, {out_tokens / seconds:,.0f} out tok/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pad"]:
        sys.path.insert(0, os.getcwd())
        padded_rows(int(sys.argv[2]) if len(sys.argv) > 2 else 16384)
    else:
        main([int(a) for a in sys.argv[1:]] or [8192, 16384])
