"""The paged decode attention at a thr512 decode step's shape, launched a few times, and a plain
copy of the same bytes after it: a target for Nsight Compute (issue 22). Session 22 fitted each
wide decode launch to ~17-30 us plus its bytes at 4.2-4.4 TB/s and could not place the fixed part
with events alone; ncu's sections (speed of light, memory, occupancy, launch, warp states) can.

Usage (device; ncu reads the counters on the Firecracker machines, H200.md):
  ncu --clock-control none --kernel-name regex:_paged_attention_kernel --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats python3 benchmarks/attn_ncu.py --heads 32,8,64 --rows 448
  (the copy, in the NVTX range "copy": --nvtx --nvtx-include copy/ --launch-count 1 instead of the kernel name,
  skip and count: its kernel is torch's vectorized_elementwise_kernel, which the set-up launches too; session 31's
  --kernel-name regex:copy matched nothing)
Without ncu it prints us a call (CUDA events) and the KV bytes' rate, as a check of the shape;
--heads-first also A/Bs the decode grid's order (triton_paged_attention.DECODE_HEADS_FIRST off / on, CUDA
graphs of 16 launches, 7 interleaved rounds, medians) and checks the outputs bit for bit; --ab NAME does the
same for another of that module's switches (e.g. DECODE_PREFETCH_TABLE).
--fp8: the cache in FP8 E4M3 (kv_cache_dtype fp8), the same values rounded (benchmarks/fp8_ncu.sh runs both).
"""
from __future__ import annotations

import random
import sys

from attn_common import DEV, HKV, HQ, Paged, D, args   # --heads (parsed there)
import torch


def main() -> None:
    rows = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else 448
    lo, hi = 300, 1300   # thr512's decode contexts (input U[64, 1024] + the outputs so far), mean 800
    rng = random.Random(0)
    b = Paged([1] * rows, [rng.randint(lo, hi) for _ in range(rows)], torch.bfloat16, seed=0)
    if "--fp8" in sys.argv:
        b.k_cache, b.v_cache = b.k_cache.to(torch.float8_e4m3fn), b.v_cache.to(torch.float8_e4m3fn)
    out = torch.empty_like(b.query)
    kv_bytes = sum(c + 1 for c in b.context_lens) * HKV * D * 2 * b.k_cache.element_size()
    src = torch.empty(kv_bytes // 2, dtype=torch.bfloat16, device=DEV).normal_()
    dst = torch.empty_like(src)
    for _ in range(5):
        b.paged(out=out)
    if DEV.type != "cuda":   # --cpu-smoke: the shape builds and runs
        print(f"smoke: {rows} rows, heads {HQ}/{HKV}/{D}, KV {kv_bytes} bytes")
        return
    torch.cuda.synchronize()
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        b.paged(out=out)
    e.record()
    torch.cuda.synchronize()
    us = a.elapsed_time(e) * 1000 / 20
    if "--heads-first" in sys.argv or "--ab" in sys.argv:   # A/B: interleaved rounds, a switch off / on
        from pagedserve.attention import triton_paged_attention as tpa
        name = sys.argv[sys.argv.index("--ab") + 1] if "--ab" in sys.argv else "DECODE_HEADS_FIRST"
        setattr(tpa, name, False)
        ref = b.paged(out=torch.empty_like(out)).clone()
        setattr(tpa, name, True)
        same = torch.equal(b.paged(out=torch.empty_like(out)), ref)
        graphs = {}
        for flag in (False, True):
            setattr(tpa, name, flag)
            b.paged(out=out)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(16):
                    b.paged(out=out)
            graphs[flag] = g
        setattr(tpa, name, True)
        times = {False: [], True: []}
        for _ in range(7):
            for flag in (False, True):
                a.record()
                graphs[flag].replay()
                e.record()
                torch.cuda.synchronize()
                times[flag].append(a.elapsed_time(e) * 1000 / 16)
        med = {k: sorted(v)[3] for k, v in times.items()}
        print(f"{name} A/B ({HQ}/{HKV}/{D}, {rows} rows{', fp8' if '--fp8' in sys.argv else ''}): off {med[False]:.1f} us "
              f"({kv_bytes / med[False] / 1e6:.3f} TB/s), on {med[True]:.1f} us "
              f"({kv_bytes / med[True] / 1e6:.3f} TB/s); outputs equal: {same}")
    with torch.cuda.nvtx.range("copy"):   # the copy: kv_bytes read and as many written
        dst.copy_(src)
    torch.cuda.synchronize()
    print(f"heads {HQ}/{HKV}/{D}, {rows} rows, contexts U[{lo}, {hi}]: {us:.1f} us a call, KV "
          f"{kv_bytes / 1e6:.1f} MB, {kv_bytes / us / 1e6:.3f} TB/s (args {vars(args)})")


if __name__ == "__main__":
    main()
