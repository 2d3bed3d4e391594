"""Resident memory of `pagedserve serve` on the CPU (issue 19), against a bare `import torch`.

Starts `python -m pagedserve.cli serve` (default model and args, a free port) as a real
subprocess, waits for /health, sends one chat request, then N concurrent streamed chat
requests (stdlib HTTP client, one thread each), and reads /proc/PID/status (VmRSS, VmHWM) and
/proc/PID/smaps_rollup (anonymous, file-backed) for the server and its children after each
phase (and once more after --idle-s seconds idle). The same for a bare `python -c "import
torch; ..."` process in the same run. KV: the
CPU KV pool is one anonymous mapping of num_blocks x bytes per block (model_runner._zeros);
its resident part (from /proc/PID/smaps) is what the requests wrote. Prints one JSON line.

    python benchmarks/serve_memory.py [--streams 16] [--max-tokens 128] [--env K=V ...]
        [--repo CHECKOUT] [--label NAME] [--out FILE] [-- SERVE_ARGS...]
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from server_process import ServerProcess, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024.0
BASELINE = ("import torch, sys, time; x = torch.ones(64, 64) @ torch.ones(64, 64); "
            "print('ready', flush=True); sys.stdin.read()")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _status(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0]) / (MiB if key != "Threads" else 1)
    return out


def _rollup(pid: int) -> dict[str, float]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"^(\w+):\s+(\d+) kB", line)
            if m:
                fields[m.group(1)] = int(m.group(2)) / MiB
    return {"rss_mib": fields["Rss"], "anonymous_mib": fields["Anonymous"],
            "file_backed_mib": fields["Rss"] - fields["Anonymous"] - fields.get("Shmem", 0.0)}


def mappings(pid: int) -> list[tuple[int, str, int]]:
    """(size KiB, name, Rss KiB) per mapping of /proc/PID/smaps."""
    rows, current = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
            if head:
                current = [(int(head.group(2), 16) - int(head.group(1), 16)) // 1024, head.group(3) or "[anon]", 0]
                rows.append(current)
            elif line.startswith("Rss:") and current is not None:
                current[2] = int(line.split()[1])
    return [tuple(r) for r in rows]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            direct = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return direct + [c for p in direct for c in children(p)]


def snapshot(pid: int, kv_bytes: int | None) -> dict:
    snap = {**_status(pid), **_rollup(pid)}
    kids = children(pid)
    snap["children"] = len(kids)
    snap["children_rss_mib"] = sum(_status(k).get("VmRSS", 0.0) for k in kids)
    if kv_bytes:   # the KV pool: the anonymous mapping of exactly its size (rounded to pages)
        size_kib = -(-kv_bytes // 4096) * 4
        pool = [m for m in mappings(pid) if m[0] == size_kib and m[1] == "[anon]"]
        snap["kv_resident_mib"] = pool[0][2] / MiB if len(pool) == 1 else None
    return snap


def kv_pool_bytes(log: str) -> tuple[int, int] | None:
    """(num_blocks, bytes per block) from the engine's start-up log and the model's config."""
    m = re.search(r"KV cache: (\d+) blocks of (\d+) tokens", log)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2))


def post(port: int, body: dict, stream: bool) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    if not stream:
        return json.loads(resp.read())
    usage, chunks = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        chunks += 1
        usage = event.get("usage") or usage
    conn.close()
    return {"usage": usage, "chunks": chunks}


def run_streams(port: int, model: str, n: int, max_tokens: int) -> list[dict]:
    results: list[dict | None] = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"{PROMPT} ({i})"}]}
        try:
            results[i] = post(port, body, stream=True)
        except BaseException as exc:   # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def baseline() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", BASELINE], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        return snapshot(proc.pid, None)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def serve(args: argparse.Namespace) -> dict:
    port = free_port()
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", "--port", str(port), *args.serve_args]
    with tempfile.NamedTemporaryFile(suffix=".log") as log, \
            ServerProcess(cmd, port, env, args.repo, log.name) as server:
        ready_s = server.wait_ready(args.ready_timeout)
        text = server.log_text()
        pid = server.proc.pid
        blocks = kv_pool_bytes(text)
        model = re.search(r"serving (\S+) on http", text).group(1)
        kv_bytes = None
        if blocks:
            kv_bytes = blocks[0] * blocks[1] * args.kv_bytes_per_token
        phases = {"ready": snapshot(pid, kv_bytes)}
        chat = post(port, {"model": model, "max_tokens": 64, "temperature": 0.0,
                           "messages": [{"role": "user", "content": "Hello, who are you?"}]}, stream=False)
        phases["chat1"] = snapshot(pid, kv_bytes)
        t1 = time.monotonic()
        streams = run_streams(port, model, args.streams, args.max_tokens)
        streams_s = time.monotonic() - t1
        phases[f"streams{args.streams}"] = snapshot(pid, kv_bytes)
        time.sleep(args.idle_s)
        phases[f"streams{args.streams}_idle"] = snapshot(pid, kv_bytes)
        tokens = [s["usage"]["prompt_tokens"] + s["usage"]["completion_tokens"] for s in streams]
        return {"command": cmd[1:], "repo": args.repo, "env": args.env, "model": model, "port": port,
                "ready_s": round(ready_s, 1),
                "chat1_usage": chat["usage"], "streams": args.streams, "stream_tokens": sum(tokens),
                "streams_wall_s": round(streams_s, 1),
                "kv_pool": {"blocks": blocks[0] if blocks else None, "bytes": kv_bytes,
                            "bytes_per_token": args.kv_bytes_per_token},
                "phases": phases}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s+(.*)", out).group(1).strip() + f", {os.cpu_count()} CPUs"
    except Exception:   # lscpu missing
        return f"{os.cpu_count()} CPUs"


def rounded(obj):
    if isinstance(obj, float):
        return round(obj, 1)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--env", action="append", default=[], help="K=V for the server's environment")
    parser.add_argument("--kv-bytes-per-token", type=int, default=2 * 30 * 3 * 64 * 4,
                        help="2 x layers x kv heads x head_dim x dtype bytes (default model, fp32: 46,080)")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--idle-s", type=float, default=3.0, help="then one more snapshot after this idle time")
    parser.add_argument("--repo", default=REPO, help="the checkout whose `pagedserve` serves (default: this one)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None, help="append the JSON line to this file too")
    parser.add_argument("serve_args", nargs="*", help="extra `serve` arguments (after --)")
    args = parser.parse_args()
    load_before = open("/proc/loadavg").read().split()[:3]
    base = baseline()
    result = serve(args)
    last = result["phases"][f"streams{args.streams}"]
    result.update({
        "label": args.label, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "python": sys.version.split()[0],
        "load_before": load_before, "load_after": open("/proc/loadavg").read().split()[:3],
        "bare_torch": base,
        "increment_over_torch_mib": {phase: snap["rss_mib"] - base["rss_mib"]
                                     for phase, snap in result["phases"].items()},
        "hwm_increment_over_torch_mib": last["VmHWM"] - base["VmHWM"],
    })
    line = json.dumps(rounded(result))
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
