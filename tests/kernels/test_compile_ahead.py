"""compile_ahead (worker/compile_ahead.py) on CUDA: a dry run launches nothing and records each
uncompiled specialisation once; after the parallel compile the real launches compile nothing
and compute what torch computes. CUDA only (Triton's interpreter has no compile to record)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("compile-ahead records compiled launches: CUDA only", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

from pagedserve.layers.triton_gemv import GemvConfig, gemv  # noqa: E402
from pagedserve.layers.triton_ops import silu_and_mul  # noqa: E402
from pagedserve.worker.compile_ahead import compile_ahead, recording  # noqa: E402

# configs no other test compiles; each parametrization below is its own specialisations
A, B = GemvConfig(block_n=64, block_k=64, num_warps=2, num_stages=3), GemvConfig(block_n=32, block_k=64, num_warps=2,
                                                                                 num_stages=3)


def _inputs(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, 192, generator=gen).cuda().half(), (torch.randn(80, 192, generator=gen) * 0.05).cuda().half())


def _forward(inputs, configs) -> list[torch.Tensor]:
    return [gemv(x, w, config) for (x, w), config in zip(inputs, configs)] + \
        [silu_and_mul(torch.cat([inputs[0][0], inputs[1][0]], dim=0).repeat(1, 2))]


def test_dry_run_records_once_and_launches_nothing():
    x, w = _inputs(3, 0)
    config = GemvConfig(block_n=16, block_k=32, num_warps=1, num_stages=2)
    previous = knobs.runtime.jit_cache_hook   # an engine started earlier in the process leaves its watch
    with recording() as launches:
        outs = [gemv(x, w, config) for _ in range(3)]
    torch.cuda.synchronize()
    assert len(launches) == 1 and launches[0].kernel.fn.__name__ == "_gemv_kernel"
    # the kernel did not run: nothing equal to the product was written (NaN never equals)
    ref = (x.float() @ w.float().T).half()
    assert not any(torch.equal(out, ref) for out in outs)
    assert knobs.runtime.jit_cache_hook is previous   # restored


@pytest.mark.parametrize("workers,configs", [(1, (A, B)), (4, (B, A))])
def test_compiled_ahead_launches_compile_nothing(workers, configs, monkeypatch):
    inputs = [_inputs(1, workers), _inputs(5, workers + 1)]
    compiled: list[str] = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: compiled.append(kw["repr"]))
    assert compile_ahead(lambda: _forward(inputs, configs), workers=workers) is True   # all compiled and loaded
    ahead = len(compiled)
    outs = _forward(inputs, configs)
    torch.cuda.synchronize()
    assert ahead >= 1 and len(compiled) == ahead, compiled[ahead:]
    for (x, w), out in zip(inputs, outs):
        torch.testing.assert_close(out.float(), (x.float() @ w.float().T), rtol=1e-2, atol=1e-2)
    gate_up = torch.cat([inputs[0][0], inputs[1][0]], dim=0).repeat(1, 2)
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(outs[-1].float(), torch.nn.functional.silu(gate) * up, rtol=1e-2, atol=1e-2)


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def test_a_kernel_compiled_ahead_is_captured_without_a_warm_up():
    """What CudaGraphRunner.capture relies on when compile_ahead returned True: the kernel's
    first launch ever is inside a capture (compiled and loaded ahead, nothing left to do)."""
    x = torch.zeros(1000, device="cuda")
    assert compile_ahead(lambda: _add_one[(4,)](x, 1000, BLOCK=256), workers=2) is True
    assert torch.count_nonzero(x) == 0   # the dry run launched nothing
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        _add_one[(4,)](x, 1000, BLOCK=256)
    assert torch.count_nonzero(x) == 0   # captured, not run
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, torch.full_like(x, 2.0))
