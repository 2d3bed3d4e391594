"""Issue 17 part 1 on the GPU machine (nvidia-h200-x2): a TP=2 engine is gone within 10 s,
with every process it started, however it ends. The CPU tests (tests/unit/test_tp_startup.py)
pin the same cases with gloo; this re-runs them with NCCL, CUDA graphs and the server's engine
core in its own process (its default on GPU), where issue 9's TP=2 process hung at exit.

  python3 benchmarks/shutdown_gpu.py        (2 GPUs, ~3 min; or: bash benchmarks/tp_gpu.sh shutdown)
  DRY=1 python3 benchmarks/shutdown_gpu.py  (CPU, gloo: the script's own check)

Cases, each in a fresh process group (a terminal's Ctrl-C is SIGINT to the whole group):
  end       the script's last line after a generate (no shutdown() call)
  shutdown  llm.shutdown(), then the script ends
  gc        `del llm; gc.collect()`: the ranks must be gone while the script still runs
  sigint    Ctrl-C in the middle of a long generate
  serve_sigterm / serve_sigint   `pagedserve serve -tp 2` stopped in the middle of a request
One RESULT line per case: seconds from the event to the exit (gc: to the last rank gone), the
exit code, and how many of the processes it had started (ranks, engine core) are still alive;
ok = under 10 s with none left."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from server_process import ServerProcess, free_port

DRY = os.environ.get("DRY") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):   # KINDS.md
    os.environ.setdefault(key, "0" if key == "NCCL_NVLS_ENABLE" else "1")
DEVICE = dict(device="cpu", dtype="float32") if DRY else dict(dtype="bfloat16", gpu_memory_utilization=0.5)
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=1024,
              intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
              max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
              torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
LIMIT_S = 10.0

SCRIPT = """
import gc, sys, time
from pagedserve import LLM, SamplingParams
llm = LLM(model={model!r}, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
          tensor_parallel_size=2, **{device!r})
llm.generate([{{"prompt_token_ids": [5, 17, 300]}}], SamplingParams(max_tokens=4), use_tqdm=False)
case = sys.argv[1]
print("READY", flush=True)
sys.stdin.readline()   # the harness has listed the ranks
if case == "shutdown":
    llm.shutdown()
elif case == "gc":
    del llm
    gc.collect()
    sys.stdin.readline()   # the harness checks the ranks, then lets the script end
elif case == "sigint":
    llm.generate([{{"prompt_token_ids": [5, 17, 300]}}] * 8, SamplingParams(max_tokens=3000, ignore_eos=True),
                 use_tqdm=False)
"""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _started(pid: int) -> list[int]:
    """The ranks and engine-core processes among `pid`'s descendants."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"--spawned" in cmd or b"core_process" in cmd:
                found.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _finish(case: str, proc: subprocess.Popen, started: list[int], event: float, **extra) -> bool:
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = "hung"
    exit_s = time.monotonic() - event
    deadline = time.monotonic() + max(0.0, LIMIT_S - exit_s)
    while any(map(_alive, started)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sum(map(_alive, started))
    ok = code != "hung" and exit_s < LIMIT_S and left == 0 and bool(started)
    print("RESULT " + json.dumps(dict(case=case, exit_s=round(exit_s, 2), code=code, started=len(started),
                                      left=left, ok=ok, **extra)), flush=True)
    if proc.poll() is None or left:   # never leave anything behind this script
        for pid in [proc.pid] + started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return ok


def run_llm_case(case: str, model: str) -> bool:
    script = SCRIPT.format(model=model, device=DEVICE)
    proc = subprocess.Popen([sys.executable, "-c", script, case], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        print("RESULT " + json.dumps(dict(case=case, ok=False, error=f"no READY: {line!r}")), flush=True)
        return False
    started = _started(proc.pid)
    proc.stdin.write("\n")
    proc.stdin.flush()
    event = time.monotonic()
    extra = {}
    if case == "sigint":
        time.sleep(1.0)   # in the middle of the long generate
        event = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
    elif case == "gc":
        while any(map(_alive, started)) and time.monotonic() - event < 30:
            time.sleep(0.1)
        extra["ranks_gone_s"] = round(time.monotonic() - event, 2)
        extra["ranks_gone_ok"] = extra["ranks_gone_s"] < LIMIT_S
        proc.stdin.write("\n")
        proc.stdin.flush()
        event = time.monotonic()
    return _finish(case, proc, started, event, **extra) and extra.get("ranks_gone_ok", True)


def run_server_case(case: str, model: str) -> bool:
    port = free_port()
    device = ["--device", "cpu", "--dtype", "float32"] if DRY else ["--gpu-memory-utilization", "0.5"]
    server = ServerProcess([sys.executable, "-m", "pagedserve.cli", "serve", model, "--load-format", "dummy",
                            "--skip-tokenizer-init", "-tp", "2", "--max-model-len", "4096", "--host", "127.0.0.1",
                            "--port", str(port), "--log-level", "warning", "--engine-process", *device],
                           port, cwd=REPO)   # no log file: its output is this script's
    proc, base = server.proc, server.base_url
    try:
        server.wait_ready(240)
    except RuntimeError as exc:
        server.kill()
        print("RESULT " + json.dumps(dict(case=case, ok=False, error=f"server never healthy: {exc}")), flush=True)
        return False
    started = _started(proc.pid)
    body = json.dumps({"model": os.path.basename(model), "prompt": [5, 17, 300, 42], "max_tokens": 3000, "ignore_eos": True}).encode()

    def post() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/v1/completions", body,
                                                          {"Content-Type": "application/json"}), timeout=60)
        except OSError:
            pass
    request = threading.Thread(target=post, daemon=True)
    request.start()
    time.sleep(1.0)
    open_request = request.is_alive()   # the signal must meet a running request
    event = time.monotonic()
    if case == "serve_sigint":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    return _finish(case, proc, started, event, request_open=open_request) and open_request


def main() -> None:
    model = "/tmp/models/shutdown-tp2"
    os.makedirs(model, exist_ok=True)
    with open(f"{model}/config.json", "w") as f:
        json.dump(CONFIG, f)
    cases = sys.argv[1:] or ["end", "shutdown", "gc", "sigint", "serve_sigterm", "serve_sigint"]
    results = [run_server_case(c, model) if c.startswith("serve") else run_llm_case(c, model) for c in cases]
    print(f"SUMMARY {sum(results)}/{len(results)} cases ok (under {LIMIT_S:.0f} s, no process left)", flush=True)


if __name__ == "__main__":
    main()
