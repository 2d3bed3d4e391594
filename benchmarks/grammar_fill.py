"""Host cost of the grammar work per decode step, without a model, for N matchers of one JSON
schema at staggered positions (the default model's tokenizer, 49,152 tokens):

- the fill: xgrammar's per-row fill_next_token_bitmask loop (the engine before issue 20's fourth
  pass), the engine's fill_bitmask (one batch call) and BatchGrammarMatcher's thread pool at
  several sizes;
- the overlap: a stretch of pure-Python work alone, then with the engine's fill running beside
  it on a second thread (started by a handshake, joined at the end), vs the two one after the
  other. xgrammar's calls go through tvm_ffi, which drops the GIL for each call, so the fill
  can hide behind Python work (in the engine it did not pay: benchmarks/RESULTS.md);
- the accept: per-row accept_token + is_terminated (the engine's) vs BatchGrammarMatcher's
  batch_accept_token (one call, then its result read element by element);
- the grammar process (core/grammar_process.py): per step, every row takes its next token
  and its next mask is filled. `step_inline_us`: accept + fill on the engine thread (the
  in-engine path); `process_roundtrip_us`: post, then wait at once (the process's whole
  step plus the hand-off); `process_engine_us`: the engine thread's cost when it does
  `python_work_us` of Python between the post and the wait (post + work + wait - work):
  what a host-bound engine step would pay; `process_handoff_us`: post + wait when the
  process has already answered (the engine thread's floor, meaningful on a loaded machine
  too). The masks are checked against in-engine matchers fed the same tokens.

    python benchmarks/grammar_fill.py [--rows 64] [--threads 2,4,8] [--tokenizer DIR]

Prints a table and one `RESULT {...}` JSON line (microseconds per step, best of --repeats)."""
from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time

import xgrammar

from benchmarks.structured_overhead import SCHEMA
from pagedserve.core import structured_output


def _best(fn, repeats: int, setup=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        state = setup() if setup else None
        start = time.perf_counter()
        fn(state)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def _python_work(n: int) -> int:
    """Pure-Python work holding the GIL, like the engine's per-request loops."""
    total = 0
    for i in range(n):
        total += len(str(i))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", default="2,4,8", help="BatchGrammarMatcher pool sizes to time")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--tokenizer", default=None, help="a folder with tokenizer files (default: the default model's GGUF)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from pagedserve.models.default_model import default_model_path
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        path = default_model_path()
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    text = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin",
                       "address": {"city": "London", "street": "St James's Square 12"},
                       "tags": ["math", "poetry"], "bio": "First programmer, wrote notes on the engine"})
    ids = tokenizer.encode(text, add_special_tokens=False)

    class Row:   # what core/structured_output reads from a Request
        def __init__(self, i: int) -> None:
            self.grammar, self.grammar_matcher = grammar, xgrammar.GrammarMatcher(grammar)
            for token in ids[:i % len(ids)]:
                assert self.grammar_matcher.accept_token(token)
            self.next_token = ids[i % len(ids)]

        def is_finished(self) -> bool:
            return False

    rows = [Row(i) for i in range(args.rows)]
    buffer = structured_output.bitmask_buffer(rows)
    result = {"rows": args.rows, "cpus": os.cpu_count()}

    def fill_rows(_):
        for i, row in enumerate(rows):
            row.grammar_matcher.fill_next_token_bitmask(buffer, i)
    result["fill_rows_us"] = _best(fill_rows, args.repeats)
    reference = buffer[:args.rows].clone()
    result["fill_batch1_us"] = _best(lambda _: structured_output.fill_bitmask(rows, buffer), args.repeats)
    assert buffer[:args.rows].equal(reference)
    for threads in [int(t) for t in args.threads.split(",") if t]:
        pool = xgrammar.BatchGrammarMatcher(max_threads=threads)
        result[f"fill_pool{threads}_us"] = _best(
            lambda _: pool.batch_fill_next_token_bitmask([r.grammar_matcher for r in rows], buffer), args.repeats)
        assert buffer[:args.rows].equal(reference), threads

    # the overlap: Python work sized to about twice the fill, alone / then the fill / beside it
    work = 1000
    while _best(lambda _: _python_work(work), 5) < 2 * result["fill_batch1_us"]:
        work *= 2
    result["python_work_us"] = _best(lambda _: _python_work(work), args.repeats)
    _python_seconds[0] = result["python_work_us"] / 1e6

    def one_after_other(_):
        _python_work(work)
        structured_output.fill_bitmask(rows, buffer)

    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def filler():   # one thread for every repeat, asleep between them (as it was in the engine)
        while True:
            started, done = jobs.get()
            started.release()
            structured_output.fill_bitmask(rows, buffer)
            done.release()
    threading.Thread(target=filler, daemon=True).start()

    def beside(_):
        started, done = threading.Lock(), threading.Lock()
        started.acquire()
        done.acquire()
        jobs.put((started, done))
        started.acquire()   # blocking drops the GIL: the thread takes it and enters xgrammar
        _python_work(work)
        done.acquire()
    result["work_then_fill_us"] = _best(one_after_other, args.repeats)
    result["work_beside_fill_us"] = _best(beside, args.repeats)
    assert buffer[:args.rows].equal(reference)
    result["fill_hidden_pct"] = 100 * (result["python_work_us"] + result["fill_batch1_us"]
                                       - result["work_beside_fill_us"]) / result["fill_batch1_us"]

    def forks():
        return [r.grammar_matcher.fork() for r in rows]
    tokens = [r.next_token for r in rows]

    def accept_rows(matchers):   # the engine's accept, row by row
        for matcher, token in zip(matchers, tokens):
            matcher.accept_token(token)
            matcher.is_terminated()
    result["accept_rows_us"] = _best(accept_rows, args.repeats, forks)
    result["accept_batch_us"] = _best(
        lambda matchers: xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens), args.repeats, forks)
    result.update(_process_step(args, grammar, ids, rows, work))
    for key, value in result.items():
        print(f"{key:>20}: {value:.1f}" if isinstance(value, float) else f"{key:>20}: {value}")
    print("RESULT " + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


def _process_step(args, grammar, ids: list[int], rows, work: int) -> dict:
    """The grammar process against the in-engine accept + fill, one decode step of every row."""
    import torch

    from pagedserve.core.grammar_process import GrammarProcess
    n = args.rows
    width = xgrammar.get_bitmask_shape(1, grammar.tokenizer_info.vocab_size)[1]
    process = GrammarProcess(grammar.tokenizer_info, max(n, 64), width)
    try:
        process.add_grammar(0, grammar)
        for slot in range(n):
            process.open(slot, 0)
        positions = [0] * n
        process.post([], [], [])   # start-up (imports) and the opens
        process.wait()
        # staggered positions, as in the engine
        for slot in range(n):
            positions[slot] = slot % (len(ids) - 1)
        for i in range(max(positions)):
            ahead = [s for s in range(n) if positions[s] > i]
            _post(process, ahead, [ids[i]] * len(ahead), [])
            assert process.wait()[1].all()
        mirror = [xgrammar.GrammarMatcher(grammar) for _ in range(n)]   # the in-engine matchers
        for slot in range(n):
            for i in range(positions[slot]):
                mirror[slot].accept_token(ids[i])
        buffer = xgrammar.allocate_token_bitmask(n, grammar.tokenizer_info.vocab_size)
        batch = xgrammar.BatchGrammarMatcher(max_threads=1)

        def advance():   # the tokens of one step; a row at the text's end starts again
            slots, tokens = [], []
            for slot in range(n):
                if positions[slot] == len(ids) - 1:
                    process.close(slot)
                    process.open(slot, 0)
                    mirror[slot] = xgrammar.GrammarMatcher(grammar)
                    positions[slot] = 0
                    continue
                slots.append(slot)
                tokens.append(ids[positions[slot]])
                positions[slot] += 1
            return slots, tokens

        fills = list(range(n))
        checked = 0
        times = {"step_inline_us": [], "process_roundtrip_us": [], "process_engine_us": [], "process_handoff_us": []}
        for step in range(args.repeats):
            slots, tokens = advance()
            start = time.perf_counter()   # in-engine: accept (row by row) + one batch fill
            for slot, token in zip(slots, tokens):
                mirror[slot].accept_token(token)
                mirror[slot].is_terminated()
            batch.batch_fill_next_token_bitmask(mirror, buffer)
            times["step_inline_us"].append(time.perf_counter() - start)
            start = time.perf_counter()
            _post(process, slots, tokens, fills)
            mask, accepted = process.wait()
            times["process_roundtrip_us"].append(time.perf_counter() - start)
            assert accepted.all() and torch.equal(mask, buffer[:n]), step
            checked += 1
            slots, tokens = advance()   # the next step: Python work between post and wait
            for slot, token in zip(slots, tokens):
                mirror[slot].accept_token(token)
            start = time.perf_counter()
            _post(process, slots, tokens, fills)
            _python_work(work)
            middle = time.perf_counter()
            mask, accepted = process.wait()
            end = time.perf_counter()
            times["process_engine_us"].append((end - middle) + (middle - start) - _python_seconds[0])
            batch.batch_fill_next_token_bitmask(mirror, buffer)
            assert accepted.all() and torch.equal(mask, buffer[:n]), step
            slots, tokens = advance()   # the hand-off alone: the answer is there when asked for
            for slot, token in zip(slots, tokens):
                mirror[slot].accept_token(token)
            start = time.perf_counter()
            _post(process, slots, tokens, fills)
            posted = time.perf_counter()
            while process.layout.header[1] != process._posted:   # DONE
                time.sleep(0.001)
            start_wait = time.perf_counter()
            mask, accepted = process.wait()
            times["process_handoff_us"].append(time.perf_counter() - start_wait + posted - start)
            batch.batch_fill_next_token_bitmask(mirror, buffer)
            assert accepted.all() and torch.equal(mask, buffer[:n]), step
            checked += 1
        out = {key: min(values) * 1e6 for key, values in times.items()}
        out.update({key.replace("_us", "_median_us"): sorted(values)[len(values) // 2] * 1e6
                    for key, values in times.items()})
        out["process_masks_checked"] = checked + args.repeats
        return out
    finally:
        process.shutdown()


_python_seconds = [0.0]   # the python work's best time (seconds), set by main


def _post(process, slots: list[int], tokens: list[int], fills: list[int]) -> None:
    """A step's post with its tokens already in the ids rows (as the device's copy leaves them)."""
    if tokens:
        process.sampled_ids()[:len(tokens)] = __import__("torch").tensor(tokens)
    process.post(slots, list(range(len(slots))), fills)


if __name__ == "__main__":
    main()
