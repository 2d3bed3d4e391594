"""build_step_inputs: the flat model inputs of a step, exactly, for an all-decode step (its own
branch: no per-step list conversions) and a mixed one (decode rows first, prompt chunks after)."""
import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import BlockTable, CachedRequestState, build_step_inputs

BLOCK = 4


def _state(name: str, tokens: list[int], num_prompt: int, blocks: list[int], computed: int,
           table: BlockTable) -> CachedRequestState:
    state = CachedRequestState(name, tokens, num_prompt, SamplingParams(temperature=0.0), blocks, computed)
    state.block_row = table.add(blocks)
    return state


def _ints(t: torch.Tensor) -> list[int]:
    return t.tolist()


def test_all_decode_step() -> None:
    table = BlockTable(4)
    a = _state("a", [11, 12, 13, 14, 15, 16], 5, [7, 2], 5, table)   # feeds token 5 (16), samples
    b = _state("b", [21, 22, 23], 3, [9], 2, table)                     # feeds its last prompt token
    c = _state("c", list(range(30, 39)), 4, [1, 4, 8], 8, table)        # feeds token 8 at block 8's start
    inputs = build_step_inputs([a, b, c], [1, 1, 1], BLOCK, torch.device("cpu"), table)
    assert inputs.rows == [a, b, c] and inputs.query_lens == [1, 1, 1]
    assert _ints(inputs.input_ids) == [16, 23, 38]
    assert _ints(inputs.positions) == [5, 2, 8]
    assert inputs.positions.dtype == torch.int64 and inputs.meta.slot_mapping.dtype == torch.int64
    # slot = block_table[pos // 4] * 4 + pos % 4
    assert _ints(inputs.meta.slot_mapping) == [2 * 4 + 1, 9 * 4 + 2, 8 * 4 + 0]
    assert _ints(inputs.meta.query_start_loc) == [0, 1, 2, 3] and inputs.meta.query_start_loc.dtype == torch.int32
    assert _ints(inputs.meta.seq_lens) == [6, 3, 9] and inputs.meta.seq_lens.dtype == torch.int32
    assert inputs.meta.block_tables.tolist() == [[7, 2, 0], [9, 0, 0], [1, 4, 8]]
    assert (inputs.meta.num_decodes, inputs.meta.max_query_len, inputs.meta.max_seq_len) == (3, 1, 9)
    assert inputs.sample_rows == [0, 1, 2] and _ints(inputs.logits_indices) == [0, 1, 2]


def test_mixed_step_puts_decodes_first() -> None:
    table = BlockTable(4)
    p = _state("p", list(range(100, 110)), 10, [3, 5, 6], 4, table)   # prompt chunk 4..9: samples after it
    d = _state("d", [41, 42, 43, 44], 3, [2], 3, table)                # decode row
    q = _state("q", list(range(200, 209)), 9, [10, 11, 12], 0, table)  # first chunk 0..4 of 9: no sample
    inputs = build_step_inputs([p, d, q], [6, 1, 5], BLOCK, torch.device("cpu"), table)
    assert inputs.rows == [d, p, q] and inputs.query_lens == [1, 6, 5]
    assert _ints(inputs.input_ids) == [44] + list(range(104, 110)) + list(range(200, 205))
    assert _ints(inputs.positions) == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert _ints(inputs.meta.query_start_loc) == [0, 1, 7, 12]
    assert _ints(inputs.meta.seq_lens) == [4, 10, 5]
    blocks = {d: [2], p: [3, 5, 6], q: [10, 11, 12]}
    want_slots = [blocks[row][pos // BLOCK] * BLOCK + pos % BLOCK
                  for row, start, n in ((d, 3, 1), (p, 4, 6), (q, 0, 5)) for pos in range(start, start + n)]
    assert _ints(inputs.meta.slot_mapping) == want_slots
    assert inputs.meta.num_decodes == 1 and inputs.meta.max_query_len == 6 and inputs.meta.max_seq_len == 10
    assert inputs.sample_rows == [0, 1] and _ints(inputs.logits_indices) == [0, 6]


def test_mixed_step_finds_the_prefix_its_decode_rows_share(monkeypatch) -> None:
    """cascade=True: the decode rows of a mixed step (first in row order) are searched for a shared
    prefix; the prompt chunk after them, whose table holds the same blocks, takes no part, nor does
    a decode row of blocks of its own (the group's list is still a row a decode row, as the launch
    checks). Thresholds lowered to 3 rows and 8 keys (cascade_plan)."""
    from pagedserve.attention import cascade_plan
    monkeypatch.setattr(cascade_plan, "CASCADE_MIN_ROWS", 3)
    monkeypatch.setattr(cascade_plan, "CASCADE_MIN_KEYS", 8)
    table = BlockTable(6)
    shared = [7, 2, 9]   # 12 keys
    decodes = [_state(f"d{i}", list(range(20)), 14, shared + [20 + i, 30 + i], 14 + i, table) for i in range(3)]
    chunk = _state("p", list(range(40)), 40, shared + [40, 41, 42], 12, table)   # a chunk of 8 after the prefix
    alone = _state("a", list(range(20)), 14, [50, 51, 52, 53, 54], 16, table)
    inputs = build_step_inputs([chunk, *decodes, alone], [8, 1, 1, 1, 1], BLOCK, torch.device("cpu"), table,
                               cascade=True)
    assert inputs.rows == [*decodes, alone, chunk] and inputs.meta.num_decodes == 4
    assert inputs.cascade_len == 12
    lengths, members, bounds = inputs.meta.cascade
    assert _ints(lengths) == [12, 12, 12, 0] and _ints(members) == [0, 1, 2, 0]   # the decode rows only: one group
    assert _ints(bounds) == [0] + [3] * cascade_plan.CASCADE_MAX_GROUPS   # the other groups empty
    plain = build_step_inputs([chunk, *decodes], [8, 1, 1, 1], BLOCK, torch.device("cpu"), table)
    assert plain.cascade_len == 0 and plain.meta.cascade is None
    two = build_step_inputs([chunk, *decodes[:2]], [8, 1, 1], BLOCK, torch.device("cpu"), table, cascade=True)
    assert two.cascade_len == 0 and two.meta.cascade is None   # 2 decode rows: below the threshold
