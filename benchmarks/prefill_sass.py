"""The Triton prefill attention kernel's loops, counted in sm_90 machine instructions, on a machine
without a GPU (issue 22): compiled as tests/kernels/sm90_compile.py compiles it (the launch's
16-byte divisibility; `SM90_TRITON_SITE=DIR` for another Triton, e.g. the GPU image's 3.6), the
cubin disassembled with the cuobjdump that ships in Triton's CUDA backend. For each default tile
shape and each way of reading the cached context (through the block table; a contiguous copy) it
prints registers, shared memory, and each loop's instruction count (a backward branch's span),
with the opcode mix of the context loop (the kernel's first long loop).

    SM90_TRITON_SITE=/tmp/triton36 python benchmarks/prefill_sass.py

(An earlier kernel: `git worktree add /tmp/wt REV`, copy this file and tests/kernels/sm90_compile.py
into it, run it there.)

Instruction counts are not speed: the GPU figures are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.kernels.sm90_compile import run  # noqa: E402

CODE = r'''
import collections, os, re, subprocess, tempfile
import triton
from pagedserve.attention import triton_prefill_attention as p
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
print("triton", triton.__version__)
for label, tiles in (("LARGE_TILES", p.LARGE_TILES), ("SMALL_TILES", p.SMALL_TILES)):
    for contiguous in (False, True):
        c = build_prefill(tiles, contiguous)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(c.asm["cubin"])
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        os.unlink(f.name)
        inst = [(int(m.group(1), 16), m.group(2)) for m in
                re.finditer(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*[^;]*);", sass)]
        loops = [(int(t, 16), a) for a, text in inst
                 for t in re.findall(r"\bBRA\s+0x([0-9a-f]+)", text) if int(t, 16) < a]
        spans = [(a - t) // 16 + 1 for t, a in loops]
        first_long = next(i for i, n in enumerate(spans) if n > 100)
        lo, hi = loops[first_long]
        mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                                  for a, text in inst if lo <= a <= hi)
        regs = re.search(r"REG:(\d+)", usage).group(1)
        where = "contiguous copy" if contiguous else "through the block table"
        print(f"{label} ({tiles.block_m}x{tiles.block_n}, {tiles.num_warps} warps, {tiles.num_stages} stages), "
              f"context {where}: registers {regs}, shared {c.metadata.shared} B, "
              f"loops (instructions) {spans}")
        print("   context loop mix:", ", ".join(f"{k} {v}" for k, v in mix.most_common(14)))
'''

if __name__ == "__main__":
    proc = run(CODE)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
    sys.exit(proc.returncode)
