"""The KV pool's memory: zeroed, and on the CPU resident only as far as it is written."""
from __future__ import annotations

import mmap

import numpy as np
import torch


def kv_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on the CPU a private anonymous mapping of 4 KiB pages (the OS's zero pages;
    no huge pages, which numpy's arrays ask for), so the KV pool is resident only as far as
    blocks have been written, not all at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):   # Linux: also where transparent huge pages are "always"
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)   # holds `pages`
