"""The start-up half of benchmarks/serve_gpu.py, and what it shares with startup_gpu.py: the
llama-8b / tiny model folder with the Llama-3 tokenizer (.devcarry/serve/), the start-up probe
(`python3 benchmarks/serve_gpu.py startup MODEL_DIR`: one `LLM(...)` in a fresh process, time per
phase) and its three runs (cold Triton cache, warm, warm with the tokenizer)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".devcarry" / "serve"
OUT = Path(os.environ.get("OUT") or "/tmp/out")
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=False)      # ../shared/bench/peers.py
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def make_model_dir(directory: Path, dims: dict) -> Path:
    """peers.py's llama config (vocab 128256) with Llama-3's bos/eos ids, plus the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
               max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
               torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001, **dims)
    (directory / "config.json").write_text(json.dumps(cfg))
    with gzip.open(CARRY / "tokenizer.json.gz", "rb") as src, open(directory / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(CARRY / "tokenizer_config.json", directory / "tokenizer_config.json")
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if vocab != cfg["vocab_size"]:
        raise SystemExit(f"tokenizer vocab {vocab} != config vocab_size {cfg['vocab_size']}")
    return directory


def startup_probe(model_dir: str, cpu: bool, tokenizer: bool, setup=None) -> None:
    """`setup()` (benchmarks/startup_gpu.py's variants) runs after the timed import and
    returns a dict of figures printed at the end."""
    import gc
    gc_s = [0.0, 0]

    def on_gc(phase, info, started=[0.0]):   # noqa: B006 - the start time between the two calls
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - started[0]
            gc_s[1] += info["generation"] == 2
    gc.callbacks.append(on_gc)
    t_start = time.perf_counter()
    import pagedserve   # noqa: F401 - timed: the import itself
    t_import = time.perf_counter() - t_start
    import torch
    from pagedserve import LLM, SamplingParams
    from pagedserve.engine_args import EngineArgs
    from pagedserve.frontend import llm_engine
    from pagedserve.worker import executor
    from pagedserve.worker.cuda_graph import CudaGraphRunner
    from pagedserve.worker.model_runner import ModelRunner
    phases: dict[str, float] = {"import": t_import}

    def timed(owner, name, label):
        original = getattr(owner, name, None)
        if original is None:
            print(f"startup probe: {owner.__name__}.{name} not found, not timed", flush=True)
            return

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0
        setattr(owner, name, wrapper)

    timed(EngineArgs, "create_config", "config")
    timed(llm_engine, "load_tokenizer", "tokenizer")
    timed(ModelRunner, "load_model", "weights")
    timed(executor, "num_kv_blocks", "kv_profile")
    timed(ModelRunner, "init_kv_cache", "kv_alloc")
    timed(ModelRunner, "finish_setup", "graph_capture")
    # inside graph_capture: the model forwards (warm-up + recorded, per size) and torch's empty_cache
    timed(CudaGraphRunner, "_forward", "capture_fwd_decode")
    timed(CudaGraphRunner, "_prefill_forward", "capture_fwd_prefill")
    timed(torch.cuda, "empty_cache", "empty_cache")
    extra = setup() if setup is not None else {}
    t0 = time.perf_counter()
    kwargs = dict(device="cpu", dtype="float32", num_kv_blocks=256) if cpu else \
        dict(dtype="bfloat16", gpu_memory_utilization=0.85)
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=not tokenizer, max_model_len=2048, seed=0,
              **kwargs)
    phases["llm_total"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": list(range(100, 228))}],
                       SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0, detokenize=False), use_tqdm=False)
    phases["first_request"] = time.perf_counter() - t1
    phases.update(extra)
    phases["ready"] = t_import + phases["llm_total"]
    # the tokenizer loads on a thread beside the core: not part of the sum
    phases["other"] = phases["llm_total"] - sum(phases.get(k, 0.0) for k in
                                                ("config", "weights", "kv_profile", "kv_alloc", "graph_capture"))
    phases["gc"], phases["gc_full_collections"] = gc_s
    print("STARTUP " + json.dumps({**{k: round(v, 3) if isinstance(v, float) else v for k, v in phases.items()},
                                   "token_ids": list(out[0].outputs[0].token_ids)}), flush=True)
    llm.shutdown()


def run_startup(model_dir: Path, cpu: bool, log) -> list[dict]:
    """A cold Triton cache, then the warm one it left, then warm with the Llama-3 tokenizer
    loaded (as `pagedserve serve` does); each in a fresh process."""
    cache = Path("/tmp/triton_serve_gpu")
    shutil.rmtree(cache, ignore_errors=True)
    runs = []
    for label in ("cold", "warm", "warm+tokenizer"):
        env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
        t0 = time.perf_counter()
        flags = (["--cpu-smoke"] if cpu else []) + (["--tokenizer"] if "tokenizer" in label else [])
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_gpu.py"), "startup", str(model_dir),
                               *flags],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
        phases = probe_result(proc, f"startup {label}", log, t0, triton_cache=label)
        if phases is not None:
            runs.append(phases)
    return runs


def probe_result(proc: subprocess.CompletedProcess, label: str, log, t0: float, **tags) -> dict | None:
    """A probe process's STARTUP figures (+ tags, its wall time), logged and emitted; None
    (and its stderr's tail printed) if it printed none."""
    log.write(f"==== {label} rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("STARTUP ")), None)
    if line is None:
        print(f"{label} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    phases = json.loads(line[len("STARTUP "):])
    phases.update(**tags, process_s=round(time.perf_counter() - t0, 2))
    emit(engine="pagedserve", workload="startup", **phases)
    return phases
