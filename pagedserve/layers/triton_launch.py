"""Triton launches whose pipeline depth gives way where a GPU's shared memory is short.

The kernels' launch shapes were measured on an H200 (up to 227 KiB of shared memory a block).
A smaller GPU refuses a launch that needs more than it has (an A100: 163 KiB; sm_86 / sm_89
workstation GPUs: 99 KiB), e.g. the W4A16 GEMM's 64 x 128 tiles with fp32 activations (146 KiB
at 3 stages) or the paged attention's fp32 prefill-shaped launch at head_dim 256 (100 KiB).
Triton checks the need before it enqueues anything, so `launch_fitting` can launch again with
one stage less: the same tiles in the same order, the same sums, only less of the next tiles
in flight. The depth that fitted is remembered per kernel and launch shape.

Also here: whether a device takes programmatic dependent launches (`pdl_launches`: sm_90+ and a
Triton with griddepcontrol), and the gdc_* instructions the kernels that use them import.
"""
from __future__ import annotations

import logging

import torch
from triton.runtime.errors import OutOfResources

try:   # programmatic dependent launch (sm_90+)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_PDL = True
except ImportError:   # an older Triton: referenced only in kernels' PDL branches, never taken
    gdc_launch_dependents = gdc_wait = None
    HAS_PDL = False

logger = logging.getLogger(__name__)

# (kernel, its constexprs and launch options, the depth asked) -> the depth this GPU took; empty
# while no launch has been refused (every launch on an H100 / H200), which keeps that path one check
_FITTED: dict[tuple, int] = {}


def _shape(kernel, kwargs: dict, stages_arg: str, stages: int) -> tuple:
    return (kernel, stages, tuple(sorted((name, value) for name, value in kwargs.items() if name != stages_arg
                                         and (value is None or isinstance(value, (bool, int, float, str))))))


def launch_fitting(kernel, grid, *args, stages: int, stages_arg: str = "num_stages", min_stages: int = 1,
                   **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with kwargs[stages_arg] = stages (the launch option
    num_stages, or a constexpr of the kernel that its loops take as their tl.range depth), at
    fewer stages (down to min_stages) while the GPU refuses it for its resources; the last
    refusal is raised."""
    key = _shape(kernel, kwargs, stages_arg, stages) if _FITTED else None
    depth = _FITTED.get(key, stages) if key is not None else stages
    while True:
        kwargs[stages_arg] = depth
        try:
            kernel[grid](*args, **kwargs)
        except OutOfResources as exc:
            if depth <= min_stages:
                raise
            logger.warning("a launch of %s at %d pipeline stages does not fit this GPU (%s): %d from now on",
                           getattr(getattr(kernel, "fn", kernel), "__name__", kernel), depth, exc, depth - 1)
            depth -= 1
            continue
        if depth != stages or key is not None:
            _FITTED[key or _shape(kernel, kwargs, stages_arg, stages)] = depth
        return


_PDL_DEVICES: dict[int, bool] = {}


def pdl_launches(device: torch.device) -> bool:
    """Whether kernels on `device` can be made programmatic dependent launches (griddepcontrol):
    a CUDA device of compute capability >= 9.0 and a Triton that has the instructions."""
    if device.type != "cuda" or not HAS_PDL or torch.version.hip is not None:   # NVIDIA's instructions
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        _PDL_DEVICES[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _PDL_DEVICES[index]
