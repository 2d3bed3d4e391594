"""What the modules of benchmarks/decode_gpu.py share: the --cpu-smoke switch (set before torch
and Triton are imported), the model shapes, the RESULTS dict that decode_gpu.json is written from,
the stage wrapper (a failed stage is logged and the next one runs) and the CUDA-graph timers."""
from __future__ import annotations

import os
import sys
import time
import traceback

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# peers.py: .devcarry/ (repo root), .. (a copy under .devcarry/NAME/), or ../shared/bench
sys.path[:0] = [".devcarry", os.path.abspath(".."),
                os.path.join(os.path.dirname(os.path.abspath(".")), "shared", "bench")]

os.environ.setdefault("PAGEDSERVE_COMPILE_AHEAD_STRICT", "1")   # a failed compile-ahead fails the run

MAX_MODEL_LEN = 2048   # peers.py's: the decode graphs' attention is launched for it
HBM_TB_S = 4.3   # the bandwidth basis for the ceilings (~287 / ~1,740 tok/s)
SHAPES = {  # model: dict(hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama-1b": dict(h=2048, i=8192, layers=16, heads=32, kv=8, vocab=128256),
    "llama-8b": dict(h=4096, i=14336, layers=32, heads=32, kv=8, vocab=128256),
    "tiny": dict(h=64, i=128, layers=2, heads=4, kv=2, vocab=512),
    "llama-70b": dict(h=8192, i=28672, layers=80, heads=64, kv=8, vocab=128256),
    "qwen2.5-7b": dict(h=3584, i=18944, layers=28, heads=28, kv=4, vocab=152064),
}
TIED = {"llama-1b": True, "llama-8b": False, "tiny": True}
RESULTS: dict = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}


def log(msg: str) -> None:
    print(msg, flush=True)


def stage(name):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.time()
            log(f"=== {name}")
            try:
                fn(*args, **kwargs)
            except Exception:   # one stage's failure must not cost the others' device time
                traceback.print_exc()
                RESULTS.setdefault("failed", []).append(name)
            log(f"=== {name} done in {time.time() - t0:.1f} s")
        return run
    return wrap


def weight_shapes(model: str, tp: int = 1) -> dict[str, tuple[int, int]]:
    """(N, K) of each matmul of a layer and the LM head; with tp, one rank's shard (the columns of
    qkv, gate_up and the vocabulary split, the rows of o and down)."""
    s = SHAPES[model]
    d = s["h"] // s["heads"]
    return {"qkv": ((s["heads"] + 2 * s["kv"]) * d // tp, s["h"]), "o": (s["h"], s["heads"] * d // tp),
            "gate_up": (2 * s["i"] // tp, s["h"]), "down": (s["h"], s["i"] // tp), "lm_head": (s["vocab"] // tp, s["h"])}


# ----------------------------------------------------------------------------- timing helpers
def replay_ms(graph, replays: int) -> float:
    """Milliseconds per replay of a captured CUDA graph, `replays` back to back (CUDA events)."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def time_us(fn, args_list) -> float:
    """Per-call microseconds of fn(*args) cycling over args_list, in a CUDA graph of 40 calls
    (gemv_sweep.py's timer: host launch cost excluded, as in the decode graphs); on CPU one
    eager call."""
    if SMOKE:
        t0 = time.perf_counter()
        fn(*args_list[0])
        return (time.perf_counter() - t0) * 1e6
    from gemv_sweep import time_us as graph_time_us
    return graph_time_us(lambda args: fn(*args), args_list)


def set_decode_inputs(graphs, rows: int, ctx: int | None, per_row: int = 0) -> dict:
    """The decode graph of `rows` rows set to replay at context `ctx` (each row's keys in its own
    blocks, distinct ids; nothing stored: slot -1; no token fed from the sampled ids), or with
    ctx None back to padding rows (seq_len 1, block row 0). Its static inputs: DecodeStatics'
    views of the bucket (session 26 on), else the runner's shared tensors (before)."""
    import torch
    with torch.inference_mode():   # the statics are inference tensors (made under the engine's inference mode)
        return _set_decode_inputs(graphs, rows, ctx, per_row)


def _set_decode_inputs(graphs, rows: int, ctx: int | None, per_row: int) -> dict:
    import torch
    if hasattr(graphs, "decode"):
        v = graphs.decode.views(rows)
    else:
        v = dict(seq_lens=graphs.seq_lens[:rows], positions=graphs.positions[:rows],
                 slot_mapping=graphs.slot_mapping[:rows], input_ids=graphs.input_ids[:rows],
                 block_tables=graphs.block_tables[:rows])
    if ctx is None:
        v["seq_lens"].fill_(1)
        v["block_tables"].zero_()
        return v
    v["seq_lens"].fill_(ctx + 1)
    v["positions"].fill_(ctx)
    v["slot_mapping"].fill_(-1)
    if "feed" in v:
        v["feed"].fill_(-1)
    v["input_ids"].copy_(torch.arange(100, 100 + rows, device=v["input_ids"].device))
    v["block_tables"][:, :per_row] = torch.randperm(rows * per_row, device=v["block_tables"].device,
                                                    dtype=torch.int32).view(rows, per_row)
    return v


def decode_context(graphs) -> int:
    """The bs-1 decode graph's seq_len as the last step left it (the context it ran at)."""
    v = graphs.decode.views(1) if hasattr(graphs, "decode") else dict(seq_lens=graphs.seq_lens)
    return int(v["seq_lens"][0].item())
