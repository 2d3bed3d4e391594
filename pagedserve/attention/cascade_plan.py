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
# Groups of rows a step reads prefixes once for (several system prompts): the prefix launch's grid holds
# this many - 1 spare tiles a launch (a power of two: the launch reads the bounds as one vector). H100, prefixmix
# with 8 system prompts (session 56): 8 groups 1.38x of none, 4 groups (the 4 largest of a step) 1.12x.
CASCADE_MAX_GROUPS = 8
# A step takes the cascade only where its groups' shared keys (each member's P) are at least this share of the
# keys its other decode rows read: the prefix launch costs 35-47 us a layer whatever the group's size, and the other
# rows read their whole context under the cascade's decode plan. H100, llama-8b heads, 256 rows, 2,048 shared keys
# (cascade_kernels.py MEMBERS=m, session 55), us a layer plain / cascade: m 256 447 / 117; m 128 (share 0.94) 450 /
# 320; m 64 (0.31) 450 / 422; m 32 (0.13) 447 / 495. prefixmix with 4 prompts, one group of a quarter of the rows
# taking it (0.31): 0.98x of none; every group: 1.41x; 8 prompts, 4 groups of half the rows: 1.10x.
CASCADE_MIN_SHARE = 0.35


def shared_prefix(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> tuple[int, dict[str, np.ndarray]]:
    """The prefixes groups of a step's decode rows share (the arrays of those rows only: a mixed
    step's decode-first rows [0, num_decodes)). A group: at least CASCADE_MIN_ROWS rows that hold
    one block id for key CASCADE_MIN_KEYS - 1 (so, prefix caching chaining each block to the ones
    before it, the same ids before it: one system prompt; a chat template's common first tokens
    alone make no group), up to CASCADE_MAX_GROUPS of them, the largest first. A group's prefix P:
    the whole blocks its rows hold alike, at most each row's seq_len - 1 (its new key lies past
    it); none unless the members' P add up to CASCADE_MIN_SHARE of the other rows' keys. Returns
    (the longest P, the device arrays): cascade_len (int32 [rows], each row's P, 0 outside the
    groups), cascade_rows (int32 [rows]: the groups' rows, group after group, each in row order,
    then 0) and cascade_groups (int32 [CASCADE_MAX_GROUPS + 1]: group g is cascade_rows
    [groups[g]:groups[g + 1]], empty past the last); (0, {}) where no group reaches
    CASCADE_MIN_KEYS keys."""
    rows = block_tables.shape[0]
    column = -(-CASCADE_MIN_KEYS // block_size) - 1   # the block of key CASCADE_MIN_KEYS - 1
    if rows < CASCADE_MIN_ROWS or block_tables.shape[1] <= column:
        return 0, {}
    candidates = np.flatnonzero(seq_lens > CASCADE_MIN_KEYS)   # (shorter rows: the column is no block of theirs)
    key = block_tables[candidates, column]
    ordered = np.sort(key)
    if candidates.size < CASCADE_MIN_ROWS \
            or not np.any(ordered[CASCADE_MIN_ROWS - 1:] == ordered[:1 - CASCADE_MIN_ROWS]):
        return 0, {}   # the common case (no block id CASCADE_MIN_ROWS times): a sort and a compare
    order = candidates[np.argsort(key, kind="stable")]
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(ordered)) + 1, [order.size]))
    sizes = np.diff(bounds)
    big = np.flatnonzero(sizes >= CASCADE_MIN_ROWS)
    per_row = np.zeros(rows, dtype=np.int32)
    members, longest = [], 0
    for g in big[np.argsort(-sizes[big], kind="stable")][:CASCADE_MAX_GROUPS]:
        group = order[bounds[g]:bounds[g + 1]]
        limit = int(seq_lens[group].min()) - 1
        width = min(block_tables.shape[1], -(-limit // block_size))
        same = (block_tables[group, :width] == block_tables[group[0], :width]).all(axis=0)
        keys = min((width if same.all() else int(np.argmin(same))) * block_size, limit)
        if keys < CASCADE_MIN_KEYS:   # (a row's table differs before the column: not prefix caching's sharing)
            continue
        per_row[group] = keys
        members.append(group)
        longest = max(longest, keys)
    others = seq_lens[per_row == 0].sum(dtype=np.int64)
    if not members or per_row.sum(dtype=np.int64) < CASCADE_MIN_SHARE * others:
        return 0, {}
    return longest, cascade_arrays(per_row, members)


def cascade_arrays(per_row: np.ndarray, groups: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The cascade's device arrays (int32) for each row's prefix keys `per_row` and the groups'
    rows (at most CASCADE_MAX_GROUPS, each in the order its tiles take them): cascade_len,
    cascade_rows (the groups' rows one after another, one entry a row as the launch checks, 0 past
    the members) and cascade_groups (the CASCADE_MAX_GROUPS + 1 bounds, empty groups past the last)."""
    bounds = np.zeros(CASCADE_MAX_GROUPS + 1, dtype=np.int32)
    bounds[1:len(groups) + 1] = np.cumsum([len(group) for group in groups], dtype=np.int32)
    bounds[len(groups) + 1:] = bounds[len(groups)]
    listed = np.zeros(len(per_row), dtype=np.int32)
    if groups:
        listed[:bounds[-1]] = np.concatenate(groups)
    return {"cascade_len": np.asarray(per_row, dtype=np.int32), "cascade_rows": listed, "cascade_groups": bounds}
