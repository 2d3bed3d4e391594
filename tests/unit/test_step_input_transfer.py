"""input_batch.to_device: a step's arrays through one packed host buffer (input_batch.packed,
the path to a GPU) come back equal, in their dtypes and shapes, each view 16-byte aligned,
empty arrays included; on the CPU they are the arrays themselves, no copy."""
from __future__ import annotations

import numpy as np
import torch

from pagedserve.worker.input_batch import packed, to_device


def test_packed_arrays_come_back_equal_and_aligned() -> None:
    arrays = [np.array([5, -1, 70], dtype=np.int64), np.array([1, 2, 3], dtype=np.int32),
              np.zeros(0, dtype=np.int64), np.arange(12, dtype=np.int32).reshape(3, 4)[:, :3],
              np.array([2**40], dtype=np.int64)]
    out = packed(arrays, torch.device("cpu"))
    for array, tensor in zip(arrays, out):
        assert tensor.dtype == torch.from_numpy(np.ascontiguousarray(array)).dtype
        assert tuple(tensor.shape) == array.shape and tensor.is_contiguous()
        assert np.array_equal(tensor.numpy(), array)
        assert tensor.data_ptr() % 16 == 0


def test_cpu_arrays_are_not_copied() -> None:
    arrays = [np.array([5, -1, 70], dtype=np.int64), np.arange(12, dtype=np.int32).reshape(3, 4)[:, :3]]
    out = to_device(arrays, torch.device("cpu"))
    assert out[0].data_ptr() == arrays[0].ctypes.data and out[0].tolist() == [5, -1, 70]
    assert out[1].dtype == torch.int32 and out[1].tolist() == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
