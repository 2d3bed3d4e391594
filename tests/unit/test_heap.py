"""frontend/heap.py: malloc_trim through ctypes on glibc (Linux), a no-op elsewhere."""
from __future__ import annotations

import ctypes
import platform
import sys

import pytest

from pagedserve.frontend import heap


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_free_heap_calls_malloc_trim_on_glibc() -> None:
    trim = heap._malloc_trim()
    assert trim is not None and trim.argtypes == [ctypes.c_size_t] and trim.restype is ctypes.c_int
    assert heap.release_free_heap() is True


def test_release_free_heap_is_a_no_op_without_malloc_trim(monkeypatch) -> None:
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_heap() is False


def test_release_free_heap_passes_zero_padding(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append)
    assert heap.release_free_heap() is True
    assert calls == [0]


def test_release_free_heap_frees_mkl_buffers_before_the_trim(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(heap, "_mkl_free_buffers", lambda: lambda: calls.append("mkl"))
    monkeypatch.setattr(heap, "_malloc_trim", lambda: lambda pad: calls.append(f"trim {pad}"))
    assert heap.release_free_heap() is True
    assert calls == ["mkl", "trim 0"]


def test_torch_with_mkl_exports_mkl_free_buffers() -> None:
    import torch
    if not (sys.platform.startswith("linux") and torch.backends.mkl.is_available()):
        pytest.skip("torch without MKL")
    assert heap._mkl_free_buffers() is not None
    torch.ones(256, 256) @ torch.ones(256, 256)   # MKL's buffers exist; freeing them is harmless
    heap._mkl_free_buffers()()
    assert torch.equal(torch.ones(256, 256) @ torch.ones(256, 256), torch.full((256, 256), 256.0))


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt(M_ARENA_MAX) is glibc's")
def test_limit_arenas_takes_on_glibc() -> None:
    import subprocess
    code = "from pagedserve.frontend import heap; print(heap.limit_arenas(1), heap.limit_arenas(8))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["True", "True"]   # in a child: the setting is process-wide
