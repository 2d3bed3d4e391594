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
    for name in inspect.signature(kernel.fn).parameters:
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


def run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # SM90_TRITON_SITE: a folder holding another Triton (e.g. `pip install --no-deps --target DIR
    # triton==3.6.0`, the GPU image's) to compile with instead of this environment's
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("SM90_TRITON_SITE"), os.getcwd()) if p)
    return subprocess.run([sys.executable, "-c", "from tests.kernels.sm90_compile import build\n" + code],
                          env=env, capture_output=True, text=True, timeout=600)
