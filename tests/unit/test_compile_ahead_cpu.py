"""compile_ahead's mechanics without a GPU: Triton compiles for an sm_90 target on the CPU
(its bundled ptxas), through a stand-in driver, for a kernel built as a JITFunction (conftest's
TRITON_INTERPRET makes `triton.jit` interpret). A dry run records each specialisation once
and launches nothing; compile_all puts a compiled kernel under each recorded key, the key the
real launch looks up. tests/kernels/test_compile_ahead.py runs the real launches on CUDA.
It runs in the suite's process: conftest's _triton_language_restored undoes what earlier
interpreted kernels left patched in triton.language (the compile would trace their ops)."""
from __future__ import annotations

import gc
import json

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pagedserve.worker import compile_ahead  # noqa: E402


def _scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


class _Utils:
    """The driver's module loading, as CompiledKernel._init_handles calls it."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": 232448}

    def load_binary(self, name, kernel, shared, device) -> tuple:
        self.loaded.append(name)
        return object(), object(), 32, 0, 1024   # module, function, registers, spills, max threads

    def unload_module(self, module) -> None:   # CompiledKernel.__del__ (newer Triton)
        pass


class _Driver:
    """What JITFunction.run, preload, the launcher build and the kernel load ask of the
    driver, on the CPU."""

    def __init__(self) -> None:
        self.launchers: list[str] = []
        self.utils = _Utils()

    def launcher_cls(self, src, metadata) -> object:
        self.launchers.append(src.fn.fn.__name__)
        return object()

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


@pytest.fixture
def fake_driver(monkeypatch):
    fake = _Driver()
    monkeypatch.setattr(driver, "_active", fake)
    yield fake
    gc.collect()   # the loaded kernels' __del__ (in reference cycles) while this driver is active


def test_dry_run_then_compile_all(fake_driver, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = JITFunction(_scale)
    x, y = torch.ones(100), torch.empty(100)
    y.fill_(7.0)
    with compile_ahead.recording() as launches:
        for block in (64, 64, 128):   # the second launch finds the first's stand-in: no new record
            kernel[(2,)](x, y, 100, BLOCK=block)
    assert [json.loads(launch.data)["constant_vals"][-1] for launch in launches] == [64, 128]
    assert torch.all(y == 7.0)   # nothing ran
    cache = kernel.device_caches[0][0]
    assert not cache   # the stand-ins are gone
    assert compile_ahead.compile_all(launches, workers=2) == 0   # none left to a launch
    assert {json.loads(launch.data)["key"] for launch in launches} == set(cache)
    assert all(type(compiled).__name__ == "CompiledKernel" for compiled in cache.values())
    # each launcher built once on its compile's thread, again (from the disk cache on a GPU) by
    # the load on this thread; both kernels loaded into the context, so no launch loads anything
    assert fake_driver.launchers == ["_scale"] * 4
    assert fake_driver.utils.loaded == ["_scale", "_scale"]
    assert all(compiled.module is not None and compiled._run is not None for compiled in cache.values())


def test_compiles_start_while_the_dry_run_goes_on(fake_driver, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = JITFunction(_scale)
    x, y = torch.ones(100), torch.full((100,), 7.0)
    with compile_ahead.Compiler(workers=2) as compiler:
        with compile_ahead.recording(compiler.submit) as launches:
            kernel[(2,)](x, y, 100, BLOCK=64)
            assert len(compiler.futures) == 1   # submitted at its record, the dry run not over
            kernel[(2,)](x, y, 100, BLOCK=64)   # the stand-in: neither recorded nor submitted again
            kernel[(2,)](x, y, 100, BLOCK=128)
            assert len(launches) == len(compiler.futures) == 2
        assert torch.all(y == 7.0)   # nothing ran
    assert compiler.load() == 0
    cache = kernel.device_caches[0][0]
    assert {json.loads(launch.data)["key"] for launch in launches} == set(cache)
    assert fake_driver.utils.loaded == ["_scale", "_scale"]


def test_compile_ahead_says_whether_every_kernel_is_ready(fake_driver, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = JITFunction(_scale)
    x, y = torch.ones(100), torch.empty(100)
    monkeypatch.setattr(compile_ahead, "STRICT", False)
    monkeypatch.setattr(compile_ahead, "tp_world_size", lambda: 1)
    monkeypatch.setattr(compile_ahead, "pp_world_size", lambda: 1)
    assert compile_ahead.compile_ahead(lambda: kernel[(1,)](x, y, 100, BLOCK=64), workers=2) is True
    assert compile_ahead.compile_ahead(lambda: None, workers=2) is True   # nothing to compile
    assert compile_ahead.compile_ahead(lambda: kernel[(1,)](x, y, 100, BLOCK=32), workers=0) is False   # off
    fake_driver.utils.load_binary = None   # a kernel that cannot load: left to its launch
    assert compile_ahead.compile_ahead(lambda: kernel[(1,)](x, y, 100, BLOCK=16), workers=2) is False
    monkeypatch.setattr(compile_ahead, "tp_world_size", lambda: 2)   # TP: never ahead
    assert compile_ahead.compile_ahead(lambda: kernel[(1,)](x, y, 100, BLOCK=256), workers=2) is False


def test_a_failed_dry_run_is_logged_or_raised_when_strict(monkeypatch, caplog):
    def broken() -> None:
        raise ValueError("not enough values to unpack")

    monkeypatch.setattr(compile_ahead, "STRICT", False)
    compile_ahead.compile_ahead(broken, workers=1)   # left to the first launch
    assert "compiling Triton kernels ahead failed (ValueError: not enough values to unpack)" in caplog.text
    monkeypatch.setattr(compile_ahead, "STRICT", True)
    with pytest.raises(ValueError, match="not enough values"):
        compile_ahead.compile_ahead(broken, workers=1)


def test_a_compile_after_start_up_is_logged(fake_driver, tmp_path, monkeypatch, caplog):
    """watch_late_compiles (ModelRunner.finish_setup on CUDA): a real launch that compiles is
    recorded and logged with its kernel and specialisation; a launch of a compiled key, a
    compile_all (start-up's preloads) and a dry run's records are not."""
    from triton import knobs
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)   # restored after the test
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    monkeypatch.setattr(compile_ahead, "LATE_COMPILES", [])
    monkeypatch.setattr(compile_ahead, "LATE_COMPILE_WARN_S", 0.0)
    monkeypatch.setattr(compile_ahead, "tp_world_size", lambda: 1)
    monkeypatch.setattr(compile_ahead, "pp_world_size", lambda: 1)
    kernel = JITFunction(_scale)
    x, y = torch.ones(100), torch.empty(100)
    with compile_ahead.recording() as launches:
        kernel[(2,)](x, y, 100, BLOCK=32)
    assert compile_ahead.watch_late_compiles() is True
    assert compile_ahead.watch_late_compiles() is False   # once
    assert compile_ahead.compile_all(launches, workers=1) == 0   # a preload, as at start-up: not late
    with compile_ahead.recording() as dry:   # a dry run's record: its own hook, then ours again
        kernel[(2,)](x, y, 100, BLOCK=16)
    assert len(dry) == 1 and knobs.runtime.jit_cache_hook.late_watch
    assert compile_ahead.LATE_COMPILES == []
    for block in (32, 64, 64, 128):
        with pytest.raises(TypeError):   # compiled (or found), then the stand-in driver's launcher cannot run
            kernel[(2,)](x, y, 100, BLOCK=block)
    late = [name for name, _ in compile_ahead.LATE_COMPILES]
    assert late == [f"_scale(x_ptr: *fp32 %16, y_ptr: *fp32 %16, n: i32, BLOCK={block}) [warps 4, stages 3]"
                    for block in (64, 128)], late
    assert caplog.text.count("Triton compiled _scale(") == 2 and "at its first launch after start-up" in caplog.text
    with pytest.raises(TypeError):   # n = 96: divisible by 16, another specialisation of the same kernel
        kernel[(2,)](x, y, 96, BLOCK=64)
    assert compile_ahead.LATE_COMPILES[-1][0].startswith("_scale(x_ptr: *fp32 %16, y_ptr: *fp32 %16, n: i32 %16, ")


def test_one_masked_argmax_specialisation_serves_any_grammar_width(fake_driver, tmp_path, monkeypatch):
    """profile_run's dry run launches the bitmask-reading argmax once, with the model's vocabulary
    / 32 words a row; a grammar's bitmask may be narrower or wider (its own vocabulary): the row
    stride is not specialised, so that one compile serves every request's mask."""
    from triton.runtime.interpreter import InterpretedFunction
    from pagedserve.layers import triton_ops
    kernel = triton_ops._argmax_kernel
    if isinstance(kernel, InterpretedFunction):   # conftest's TRITON_INTERPRET: the real JITFunction, same options
        kernel = JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if v is not None})
    monkeypatch.setattr(triton_ops, "_argmax_kernel", kernel)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    logits = torch.zeros(4, 2000, dtype=torch.bfloat16)
    with compile_ahead.recording() as launches:
        triton_ops.argmax_rows(logits)
        for words in (63, 64, 80, 100):   # 63 = ceil(2000 / 32); 64 and 80 divisible by 16, 100 by 4 only
            triton_ops.argmax_rows(logits, torch.zeros(4, words, dtype=torch.int32))
    masked = [launch for launch in launches if json.loads(launch.data)["constant_vals"][-1] is True]
    assert len(launches) == 2 and len(masked) == 1, [json.loads(launch.data)["constant_vals"] for launch in launches]
