"""Which steps' decode rows take cascade attention (attention/triton_cascade.py), decided on the
host from the step's block tables: numpy only (the model runner imports it on every device)."""
from __future__ import annotations

import numpy as np

# A decode step takes the cascade from this many rows (fewer: the decode graphs below it are
# captured once, and a few rows' shared reads are a small part of the step) and a shared prefix
# of at least this many keys.
CASCADE_MIN_ROWS = 64
CASCADE_MIN_KEYS = 256


def shared_prefix(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> tuple[int, int, np.ndarray]:
    """The prefix a step's decode rows share (the arrays of those rows only: a mixed step's
    decode-first rows [0, num_decodes)): (P, r0, per-row keys), where the rows whose
    first block is row r0's (r0 the last row, else the first: prefix caching shares the blocks of
    requests admitted after the prefix was computed, so the earliest rows may hold their own
    copies) hold the same block ids for their first P keys, P a whole number of blocks at most
    each such row's seq_len - 1 (its new key lies past it); per-row keys ([rows] int32) is P for
    those rows, 0 for the others. (0, 0, None) below CASCADE_MIN_ROWS such rows or
    CASCADE_MIN_KEYS keys."""
    rows = block_tables.shape[0]
    if rows < CASCADE_MIN_ROWS or block_tables.shape[1] == 0:
        return 0, 0, None
    first = block_tables[:, 0]
    for r0 in (rows - 1, 0):
        members = first == first[r0]
        if np.count_nonzero(members) >= CASCADE_MIN_ROWS:
            break
    else:   # the common case (no shared prefix): two column compares
        return 0, 0, None
    limit = int(seq_lens[members].min()) - 1
    width = min(block_tables.shape[1], -(-limit // block_size))
    same = (block_tables[members, :width] == block_tables[r0, :width]).all(axis=0)
    blocks = width if same.all() else int(np.argmin(same))
    keys = min(blocks * block_size, limit)
    if keys < CASCADE_MIN_KEYS:
        return 0, 0, None
    return keys, r0, np.where(members, keys, 0).astype(np.int32)
