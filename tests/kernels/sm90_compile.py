"""Compile Triton kernels for sm_90 on a machine without a GPU (the CUDA backend and its
ptxas, no device): the interpreter that runs the CPU tests checks no loop-carried types or
layouts, and a kernel that passed there failed to compile on the H200. `run(code)` executes
`code` in a fresh interpreter without TRITON_INTERPRET (the tests' process runs Triton's
interpreter); the code calls `build(kernel, constexprs, pointer_types)`. The GPU image's Triton
(3.6) can differ from this one's: `SM90_TRITON_SITE=DIR` compiles with the Triton in DIR."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys


def build(kernel, constexprs: dict, types: dict[str, str], divisible: tuple[str, ...] = (), **options):
    """Compile the @triton.jit `kernel` to a cubin for sm_90: constexprs by name, argument
    types by name (default: `*bf16` for names ending in _ptr, `fp32` for scale_log2 / inv_k /
    eps, `i32` otherwise). `divisible`: arguments known to be multiples of 16 (as Triton
    specializes them at a launch; without it no load is pipelined, so shared memory is not
    what the launch needs); options: num_warps, num_stages. Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {}
    params = inspect.signature(kernel.fn).parameters
    constexprs = {**{name: p.default for name, p in params.items()   # a launch's defaults, as Triton's
                     if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty}, **constexprs}
    for name in params:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name in ("scale_log2", "inv_k", "eps") else "i32"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    assert "cubin" in compiled.asm
    return compiled


def build_prefill(tiles, contiguous: bool):
    """The prefill attention kernel (triton_prefill_attention) at llama-8b's head shape (4 query
    heads a KV head, D 128, block 16, bf16, K/V caches of equal strides under 2**31 elements) for
    `tiles` (a PrefillTiles), its context through the block table or a contiguous copy. Constexprs
    the kernel does not take are dropped, so an older kernel (a git worktree) compiles too."""
    from pagedserve.attention import triton_prefill_attention as p
    kernel = p._prefill_attention_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    divisible = [n for n in names if n.endswith("_ptr") or (n.startswith("stride") and n != "stride_block_table")]
    types = {n: "*i32" for n in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr")}
    shape = dict(QUERIES_PER_KV=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, NEW_KV_FROM_CACHE=False,
                 SAME_KV_STRIDES=True, CACHE_I64=False, DOT_PRECISION="tf32", BLOCK_M=tiles.block_m,
                 BLOCK_N=tiles.block_n, CONTEXT_CONTIGUOUS=contiguous)
    return build(kernel, {k: v for k, v in shape.items() if k in names}, types, tuple(divisible),
                 num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # SM90_TRITON_SITE: a folder holding another Triton (e.g. `pip install --no-deps --target DIR
    # triton==3.6.0`, the GPU image's) to compile with instead of this environment's
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("SM90_TRITON_SITE"), os.getcwd()) if p)
    return subprocess.run([sys.executable, "-c", "from tests.kernels.sm90_compile import build, build_prefill\n" + code],
                          env=env, capture_output=True, text=True, timeout=600)
