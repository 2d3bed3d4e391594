"""Which steps' decode rows take cascade attention (attention/triton_cascade.py), decided on the
host from the step's block tables: numpy only (the model runner imports it on every device)."""
from __future__ import annotations

import numpy as np

# A step's decode rows take the cascade from this many rows sharing a prefix of at least this many
# keys (vLLM's rule: >= 8 requests, >= 256 common keys). H100, llama-8b heads, 2,048 shared keys
# (benchmarks/cascade_kernels.py ROWS=N, RESULTS.md session 54), us a layer plain / cascade: 8 rows
# 38.7 / 25.1, 16 rows 47.3 / 28.5, 32 rows 79.5 / 40.6, 64 rows 130.5 / 53.4; prefixmix at
# max_num_seqs 12 / 32: 1.03x / 1.11x (the threshold was 64 until then).
CASCADE_MIN_ROWS = 8
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
