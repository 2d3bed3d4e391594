"""fa4_prefill: the inputs a step's prefill chunks give FlashAttention-4 (exact values), TritonBackend
routing long steps to it once set-up has compiled its kernel (the cuDNN paths before, and after a
failure), against paged_attention_ref. Off CUDA (or without flash-attn-4) the kernel call is
replaced by reference_execute, which reads the same inputs as the kernel is specified to (packed
K/V by cu_seqlens, bottom-right causal); on a Hopper / Blackwell GPU with flash-attn-4 the real
kernel runs too, compiled ahead under FakeTensorMode, and the steps compile nothing more."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention import fa4_prefill  # noqa: E402
from pagedserve.attention.backend import TritonBackend  # noqa: E402
from pagedserve.attention.cudnn_prefill import CudnnPrefill  # noqa: E402
from pagedserve.attention.cudnn_prefill import reference_execute as cudnn_reference  # noqa: E402
from pagedserve.attention.fa4_prefill import Fa4Prefill, plan_inputs, reference_execute  # noqa: E402
from tests.kernels.test_cudnn_prefill import attend_step  # noqa: E402
from tests.kernels.test_paged_attention import DEVICE  # noqa: E402

REAL_FA4 = DEVICE.type == "cuda" and fa4_prefill.available(DEVICE, torch.bfloat16, 64)


def test_plan_inputs_exact() -> None:
    """Two decodes, then chunks of 3 (after 5 cached), 20 (fresh) and 2 (after 30): cu_seqlens count the
    chunks' rows from the first prefill token and the sequences' keys; the packed slots are each
    sequence's keys 0 .. seq_len - 1 through its own blocks."""
    tables = torch.tensor([[9, 0, 0], [8, 0, 0], [4, 0, 0], [7, 1, 0], [2, 3, 6]], dtype=torch.int32)
    inputs = plan_inputs([0, 1, 2, 5, 25, 27], [4, 9, 8, 20, 32], tables, 2, 5, block_size=16)
    assert (inputs.token_begin, inputs.num_tokens, inputs.max_query_len, inputs.max_seq_len) == (2, 25, 20, 32)
    assert inputs.cu_seqlens_q.tolist() == [0, 3, 23, 25]
    assert inputs.cu_seqlens_k.tolist() == [0, 8, 28, 60]
    assert inputs.cu_seqlens_q.dtype == inputs.cu_seqlens_k.dtype == torch.int32
    slots = inputs.kv_slots.tolist()
    assert slots[:8] == [4 * 16 + j for j in range(8)]
    assert slots[8:28] == [7 * 16 + j for j in range(16)] + [16 + j for j in range(4)]
    assert slots[28:] == [2 * 16 + j for j in range(16)] + [3 * 16 + j for j in range(16)]


def _backend(fa4: Fa4Prefill | None) -> tuple[TritonBackend, list]:
    """A backend whose long steps (>= 20 tokens) go to FA4 when prepared, else to the cuDNN graph
    (its stand-in counting the calls)."""
    backend = TritonBackend()
    backend.prefill_min_query_len, backend.sdpa_min_query_len = 8, 20
    backend.long_chunk_path, backend.cudnn_graph_mode = "cudnn_graph", "paged"
    graph_calls: list[int] = []
    backend._cudnn_prefill = CudnnPrefill("paged", executor=lambda *a: graph_calls.append(a[3].num_seqs)
                                          or cudnn_reference(*a))
    backend._fa4 = fa4
    return backend, graph_calls


def _attend(backend, step, dtype) -> None:
    query_lens, context_lens, num_decodes, seed = step
    attend_step(backend, query_lens, context_lens, num_decodes, dtype, seed)


STEPS = [([1, 1, 24, 9, 40], [30, 3, 17, 0, 50], 2, 5), ([1, 33, 2], [7, 0, 40], 1, 6), ([30, 21], [0, 64], 0, 7)]
HEAD_DIM = 64 if DEVICE.type == "cuda" else 32   # _step's


@pytest.mark.parametrize("real", [False, True] if REAL_FA4 else [False])
def test_backend_routes_long_steps_to_fa4_once_prepared(real: bool) -> None:
    """Before prepare_fa4 long steps take the cuDNN graph; prepare compiles once (for the layers' dtype and
    heads) and from then every long step (short chunks included, decodes not) is one FA4 call on the
    strided query."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    compiles, fa4_calls = [], []

    def executor(q, k, v, inputs, scale, out):
        fa4_calls.append(inputs.cu_seqlens_q.tolist())
        reference_execute(q, k, v, inputs, scale, out)

    fa4 = Fa4Prefill(executor=None if real else executor,
                     compiler=fa4_prefill.compile_kernel if real else lambda *a: compiles.append(a[:4]))
    backend, graph_calls = _backend(fa4)
    _attend(backend, STEPS[0], dtype)
    assert fa4.state == "cold" and graph_calls == [3]
    if real:
        assert backend.prepare_fa4(dtype, 4, 2, HEAD_DIM, DEVICE)
    else:   # the backend prepares only where FA4 is available (never off CUDA); then the stand-in directly
        assert backend.prepare_fa4(dtype, 4, 2, HEAD_DIM, DEVICE) == REAL_FA4
        assert fa4.prepare(dtype, 4, 2, HEAD_DIM, DEVICE) and fa4.prepare(dtype, 4, 2, HEAD_DIM, DEVICE)
        assert compiles == [(dtype, 4, 2, HEAD_DIM)]   # once
    for step in STEPS:
        _attend(backend, step, dtype)
    assert graph_calls == [3], "a step went to the cuDNN graph after FA4 was ready"
    if not real:
        assert fa4_calls == [[0, 24, 33, 73], [0, 33, 35], [0, 30, 51]]
    assert backend.use_fa4


@pytest.mark.skipif(not REAL_FA4, reason="needs flash-attn-4 on a Hopper / Blackwell GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_real_kernel_compiled_ahead_compiles_nothing_more(head_dim: int) -> None:
    """compile_kernel (fake tensors, nothing launched) compiles the kernel the steps use: steps of other
    batch sizes and lengths compile nothing (the CuTe DSL's compile is not called again) and match
    the reference."""
    from flash_attn.cute import interface
    fa4_prefill.compile_kernel(torch.bfloat16, 8, 2, head_dim, DEVICE)
    compiled = []
    real_compile = interface.cute.compile
    interface.cute.compile = lambda *a, **k: compiled.append(1) or real_compile(*a, **k)
    try:
        fa4 = Fa4Prefill()
        g = torch.Generator(device="cpu").manual_seed(3)
        for q_lens, kv_lens in (([300, 1024], [300, 3000]), ([2048], [2048]), ([5, 700, 129], [900, 700, 4000])):
            rows, keys = sum(q_lens), sum(kv_lens)
            qkv = torch.randn(rows, 12, head_dim, generator=g).to(DEVICE, torch.bfloat16)
            k = torch.randn(keys, 2, head_dim, generator=g).to(DEVICE, torch.bfloat16)
            v = torch.randn(keys, 2, head_dim, generator=g).to(DEVICE, torch.bfloat16)
            cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
            cu_k = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
            inputs = fa4_prefill.Fa4Inputs(0, rows, max(q_lens), max(kv_lens), cu_q, cu_k, torch.empty(0))
            out, ref = torch.empty(rows, 8, head_dim, dtype=torch.bfloat16, device=DEVICE), torch.empty(
                rows, 8, head_dim, dtype=torch.bfloat16, device=DEVICE)
            fa4_prefill._kernel_call(qkv[:, :8], k, v, cu_q, cu_k, max(q_lens), max(kv_lens), head_dim ** -0.5, out)
            reference_execute(qkv[:, :8], k, v, inputs, head_dim ** -0.5, ref)
            torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        assert compiled == [], "a step compiled a kernel compile_kernel had not"
        assert fa4.state == "cold"
    finally:
        interface.cute.compile = real_compile


def test_steps_with_many_keys_a_token_take_the_cudnn_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose prefill sequences hold more than MAX_KEYS_PER_TOKEN keys a token of the step is not
    gathered: the cuDNN graph attends it."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    fa4 = Fa4Prefill(executor=lambda *a: reference_execute(*a), compiler=lambda *a: None)
    assert fa4.prepare(dtype, 4, 2, HEAD_DIM, DEVICE)
    backend, graph_calls = _backend(fa4)
    _attend(backend, STEPS[2], dtype)   # 30 + 21 tokens, 30 + 85 keys: 2.3 a token
    monkeypatch.setattr(fa4_prefill, "MAX_KEYS_PER_TOKEN", 2)
    _attend(backend, STEPS[2], dtype)
    assert graph_calls == [2] and backend.use_fa4


def test_a_call_that_compiles_is_logged_once(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A kernel call that spends more than SLOW_CALL_S on the host (a compile the set-up did not do) is
    logged, once; the step's output is the call's."""
    import time

    def slow_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, out):
        time.sleep(0.05)
        inputs = fa4_prefill.Fa4Inputs(0, q.shape[0], max_q, max_k, cu_q, cu_k, torch.empty(0))
        reference_execute(q, k, v, inputs, scale, out)

    monkeypatch.setattr(fa4_prefill, "_kernel_call", slow_call)
    monkeypatch.setattr(fa4_prefill, "SLOW_CALL_S", 0.01)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    fa4 = Fa4Prefill(compiler=lambda *a: None)
    assert fa4.prepare(dtype, 4, 2, HEAD_DIM, DEVICE)
    backend, graph_calls = _backend(fa4)
    with caplog.at_level(logging.WARNING, logger="pagedserve.attention.fa4_prefill"):
        _attend(backend, STEPS[0], dtype)
        _attend(backend, STEPS[1], dtype)
    assert caplog.text.count("it compiled a kernel") == 1 and graph_calls == []


def test_failing_fa4_call_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A call that raises is logged once, the step is attended by the cuDNN graph and the backend stays
    off FA4."""
    monkeypatch.setattr(TritonBackend, "use_fa4", TritonBackend.use_fa4)

    def broken(*args):
        raise RuntimeError("no kernel for this shape")

    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    fa4 = Fa4Prefill(executor=broken, compiler=lambda *a: None)
    assert fa4.prepare(dtype, 4, 2, HEAD_DIM, DEVICE)
    backend, graph_calls = _backend(fa4)
    with caplog.at_level(logging.WARNING, logger="pagedserve.attention.backend"):
        _attend(backend, STEPS[0], dtype)
    assert "FlashAttention-4 failed" in caplog.text
    assert TritonBackend.use_fa4 is False and graph_calls == [3]


def test_compile_failure_keeps_the_cudnn_paths(caplog: pytest.LogCaptureFixture) -> None:
    """A compile that raises is logged; the steps keep the cuDNN graph and prepare does not try again."""
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("ptxas failed")

    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    fa4 = Fa4Prefill(executor=lambda *a: pytest.fail("FA4 called after a failed compile"), compiler=broken)
    backend, graph_calls = _backend(fa4)
    with caplog.at_level(logging.WARNING, logger="pagedserve.attention.fa4_prefill"):
        assert not fa4.prepare(dtype, 4, 2, HEAD_DIM, DEVICE) and not fa4.prepare(dtype, 4, 2, HEAD_DIM, DEVICE)
    assert "did not compile" in caplog.text and fa4.state == "failed" and calls == [1]
    for step in STEPS[:2]:
        _attend(backend, step, dtype)
    assert graph_calls == [3, 2] and TritonBackend.use_fa4 is True


def test_an_fa4_that_does_not_import_is_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Installed but failing at import (a missing CUDA library, ...): a warning and the cuDNN paths, not a
    failed start-up."""
    def broken_find_spec(name):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(fa4_prefill.importlib.util, "find_spec", broken_find_spec)
    monkeypatch.setattr(fa4_prefill.torch.cuda, "get_device_capability", lambda device: (9, 0))
    fa4_prefill.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pagedserve.attention.fa4_prefill"):
            assert not fa4_prefill.available(torch.device("cuda", 0), torch.bfloat16, 128)
        assert "does not import" in caplog.text
    finally:
        fa4_prefill.available.cache_clear()


def test_unavailable_off_hopper() -> None:
    """Off CUDA, in fp32 or at a head dim the kernel does not take, FA4 is not available."""
    assert not fa4_prefill.available(torch.device("cpu"), torch.bfloat16, 128)
    if DEVICE.type == "cuda":
        assert not fa4_prefill.available(DEVICE, torch.float32, 128)
        assert not fa4_prefill.available(DEVICE, torch.bfloat16, 100)
