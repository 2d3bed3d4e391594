"""peers.py's pagedserve run (thr512, b1_decode, ttft1024 in its order) with the host KV tier's
calls timed: each HostKVCache.swap (host wall, pairs out / in / write-behind, copy mode) and the
adoption of the pinned pool's mapped view (_adopt: its check's round trip), listed at the end
with their time since start-up. Says which of them fell inside ttft1024's timed prompt.
Usage (GPU machine, repo root): PYTHONPATH=$PWD python3 benchmarks/host_tier_probe.py [llama-8b] [peers.py]
"""
from __future__ import annotations

import importlib.util
import sys
import time

from pagedserve.worker import host_kv_cache

name = sys.argv[1] if len(sys.argv) > 1 else "llama-8b"
spec = importlib.util.spec_from_file_location("peers", sys.argv[2] if len(sys.argv) > 2 else ".devcarry/peers.py")
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)
events: list[tuple[float, str, float]] = []   # (start since t0, what, ms)
t0 = time.perf_counter()


def timed(cls: type, method: str, describe) -> None:
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            events.append((began - t0, describe(self, *args, **kwargs), (time.perf_counter() - began) * 1e3))
    setattr(cls, method, wrapper)


timed(host_kv_cache.HostKVCache, "swap", lambda self, out, into, behind=0:
      f"swap out {len(out) - behind} in {len(into)} behind {behind} ({self.copy_mode})")
timed(host_kv_cache.HostKVCache, "_adopt", lambda self: "adopt the mapped view")
emitted = []
real_emit = peers.emit


def emit(**kw):
    emitted.append((time.perf_counter() - t0, kw))
    real_emit(**kw)


peers.emit = emit
peers.run_engine("pagedserve", name, 512)
marks = [(at, kw.get("workload", "startup")) for at, kw in emitted]
print(f"{len(events)} host tier calls; stage ends: " + ", ".join(f"{w} {at:.2f} s" for at, w in marks))
ttft_end = marks[-1][0]
ttft_ms = emitted[-1][1].get("ms", 0.0)
slow = [e for e in events if e[2] >= 1.0 or e[0] >= ttft_end - ttft_ms / 1e3 - 0.5]
for at, what, ms in slow[:40]:
    inside = " <- inside ttft1024's prompt" if ttft_end - ttft_ms / 1e3 <= at <= ttft_end else ""
    print(f"  {at:8.3f} s  {ms:8.2f} ms  {what}{inside}")
