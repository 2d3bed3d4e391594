"""The tokens the penalties of a request read, kept on the device.

Repetition, frequency and presence penalties read each row's outputs so far (and a repetition
penalty its prompt). The runner keeps them where they are sampled: one row of an int32 [rows,
columns] table per penalised request (grown by doubling, rows reused): the prompt's ids first
where a repetition penalty reads them, then the outputs, each written there by the step that
samples it, so the next step's counts never wait for the host and no request holds the engine
in lockstep (async scheduling: the host learns a step's tokens a step later). A step reads them
as flat (row, token, in output) entries with one gather (layers/sampler.apply_penalties works
on those alone).
"""
from __future__ import annotations

import itertools

import torch

from pagedserve.worker.input_batch import CachedRequestState


class OutputHistory:
    """The table and its free rows. A state's row is its history_row, holding history_len ids of
    which the first history_prompt are its prompt's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ids = torch.zeros((0, 0), dtype=torch.int32, device=device)
        self._free: list[int] = []

    def add(self, state: CachedRequestState) -> None:
        """Give `state` a row holding its outputs so far (all known on the host: a new or resumed
        request), after its prompt's ids where a repetition penalty reads them."""
        prompt = state.num_prompt_tokens if state.sampling_params.repetition_penalty != 1.0 else 0
        ids = state.token_ids[state.num_prompt_tokens - prompt:]
        state.history_row = self._take_row()
        state.history_prompt, state.history_len = prompt, len(ids)
        if ids:
            self._grow(self.ids.shape[0], len(ids))
            self.ids[state.history_row, :len(ids)] = torch.tensor(ids, dtype=torch.int32).to(
                self.device, non_blocking=True)   # no wait for the step in flight

    def fork(self, child: CachedRequestState, parent: CachedRequestState) -> None:
        """A parallel sample's row: a copy of its parent's (a token still on its way to the host too)."""
        child.history_row = self._take_row()
        child.history_prompt, child.history_len = parent.history_prompt, parent.history_len
        if parent.history_row >= 0:
            self.ids[child.history_row] = self.ids[parent.history_row]

    def remove(self, state: CachedRequestState) -> None:
        if state.history_row >= 0:
            self._free.append(state.history_row)
            state.history_row = -1

    def append(self, states: list[CachedRequestState], sampled: torch.Tensor) -> None:
        """After a step sampled `sampled[i]` for states[i]: append it to each penalised row."""
        rows = [i for i, state in enumerate(states) if state.history_row >= 0]
        if not rows:
            return
        columns = [states[i].history_len for i in rows]
        self._grow(self.ids.shape[0], max(columns) + 1)
        index = torch.tensor([[states[i].history_row for i in rows], columns, rows]).to(self.device, non_blocking=True)
        self.ids[index[0], index[1]] = sampled[index[2]].to(torch.int32)
        for i in rows:
            states[i].history_len += 1

    def entries(self, rows: list[int], states: list[CachedRequestState]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One entry an id of states[j]'s row, on the device, flat: rows[j], the token, and
        whether it is an output (else a prompt id). No synchronisation: the host knows each
        row's length."""
        lengths = [state.history_len for state in states]
        total = sum(lengths)
        if not total:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty, empty.bool()
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        table = torch.tensor([rows, [state.history_row for state in states], starts,
                              [state.history_prompt for state in states], lengths]).to(self.device, non_blocking=True)
        spread = torch.repeat_interleave(table[:4], table[4], dim=1, output_size=total)
        columns = torch.arange(total, device=self.device) - spread[2]
        return spread[0], self.ids[spread[1], columns].long(), columns >= spread[3]

    def _take_row(self) -> int:
        if not self._free:
            self._grow(max(2 * self.ids.shape[0], 16), self.ids.shape[1])
        return self._free.pop()

    def _grow(self, rows: int, columns: int) -> None:
        old_rows, old_columns = self.ids.shape
        if rows <= old_rows and columns <= old_columns:
            return
        columns = max(columns, old_columns)
        if columns > old_columns:
            columns = max(columns, 2 * old_columns, 256)
        grown = torch.zeros((max(rows, old_rows), columns), dtype=torch.int32, device=self.device)
        grown[:old_rows, :old_columns] = self.ids
        self.ids = grown
        self._free.extend(range(rows - 1, old_rows - 1, -1))
