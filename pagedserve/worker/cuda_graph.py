"""CUDA graphs, captured over static input buffers, for the two kinds of step whose eager
forward is bound by the host launching ~10 kernels per layer:

- decode steps: one graph per batch-size bucket up to max_num_seqs (at most MAX_CAPTURE_SIZE,
  as vLLM's default capture limit: larger decode batches run eagerly, where launch overhead is
  small against the work); a step of n decodes replays the smallest bucket >= n with the rows
  past n padded harmlessly (slot -1: no KV write; seq_len 1: reads one cached key of whatever
  block the stale table row names; their logits are dropped).
- single-sequence prefill steps that end the prompt (the first token of a request arriving
  alone: time to first token), one graph per token-count bucket up to MAX_PREFILL_TOKENS: the
  chunk's tokens are padded to the bucket with slot -1 (no KV write) and attention writes
  only the real query rows; the logits of the chunk's last token come back. An eager 1024-token
  prefill of llama-1b took the host 7-15 ms to launch, the device ~5 ms.

Each graph covers embedding -> layers -> final norm -> LM head, so a replay returns logits.
Under pipeline parallelism each stage captures its own layers: a later stage's graphs read the
previous stage's (hidden, residual) from static input buffers (the pipeline recv writes the
step's rows into them before the replay: `receive`), and an earlier stage's graphs end in
static (hidden, residual) outputs, which the runner copies and sends on (the next replay
overwrites them while the send may still be reading). Only the last stage computes logits.
Attention in a graph is launched for max_seq_len = max_model_len: the grid (and split-K
choice) is fixed at capture, and each program bounds its work by the live seq_lens and
query_start_loc.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.worker.compile_ahead import compile_ahead
from pagedserve.worker.input_batch import StepInputs

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None   # logits, a stage's (hidden, residual), or None
Receive = Callable[[torch.Tensor, torch.Tensor], None]   # fills (hidden, residual) views in place

logger = logging.getLogger(__name__)


MAX_CAPTURE_SIZE = 512
MAX_PREFILL_TOKENS = 1024


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 128, every 32 up to 256, every 64 up to 512: 20 graphs
    for 512 (each costs start-up time: ~0.4 s for an 8B model). Padding a batch up to its
    bucket is nearly free while decode GEMMs are bound by weight reads (below ~300 rows on
    an H100); the wider steps sit above 128 rows, where a step's work is large anyway."""
    max_num_seqs = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 257, 32)) + list(range(320, 513, 64))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


def prefill_token_buckets(max_tokens: int) -> list[int]:
    """16, 32, then every 64 up to min(max_tokens, MAX_PREFILL_TOKENS): a chunk pads by at
    most 63 tokens (6% at 1024), 17 graphs for 1024."""
    limit = min(max_tokens, MAX_PREFILL_TOKENS)
    return [s for s in [16, 32] + list(range(64, MAX_PREFILL_TOKENS + 1, 64)) if s <= limit]


def _run_only(forward: Callable[[int], Output], size: int) -> None:
    """compile_ahead's dry-run `record`: runs the forward and returns None, so _capture_all
    keeps nothing (a lambda returning forward's output would be unpacked as a graph)."""
    forward(size)


class CudaGraphRunner:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, max_num_batched_tokens: int = MAX_PREFILL_TOKENS,
                 stage_input: tuple[int, torch.dtype] | None = None) -> None:
        """`stage_input`: (hidden size, dtype) of the hidden states a pipeline stage after the
        first receives (None: this model embeds the token ids itself)."""
        self.model = model
        self.max_model_len = max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        self.prefill_buckets = prefill_token_buckets(min(max_num_batched_tokens, max_model_len))
        max_bs = self.buckets[-1]
        max_tokens = max([max_bs] + self.prefill_buckets)
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=device)
        # the prefill graphs' one sequence: [0, query_len], its seq_len, its last token's row
        self.prefill_query_start_loc = torch.zeros(2, dtype=torch.int32, device=device)
        self.prefill_seq_len = torch.ones(1, dtype=torch.int32, device=device)
        self.prefill_last_row = torch.zeros(1, dtype=torch.int64, device=device)
        self.stage_in: tuple[torch.Tensor, torch.Tensor] | None = None   # (hidden, residual) from the last stage
        if stage_input is not None:
            hidden = torch.zeros((max_tokens, stage_input[0]), dtype=stage_input[1], device=device)
            self.stage_in = (hidden, torch.zeros_like(hidden))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Output] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_outputs: dict[int, Output] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
                                 max_query_len=1, max_seq_len=self.max_model_len, num_decodes=bs,
                                 num_decode_tokens=bs)

    def _stage_in(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.stage_in is None else (self.stage_in[0][:num_tokens], self.stage_in[1][:num_tokens])

    def _forward(self, bs: int) -> Output:
        out = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self._stage_in(bs))
        return out if isinstance(out, tuple) else self.model.compute_logits(out)

    def _prefill_forward(self, num_tokens: int) -> Output:
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:num_tokens],
                                 query_start_loc=self.prefill_query_start_loc, seq_lens=self.prefill_seq_len,
                                 block_tables=self.block_tables[:1], max_query_len=num_tokens,
                                 max_seq_len=self.max_model_len, num_decodes=0)
        out = self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta, self._stage_in(num_tokens))
        return out if isinstance(out, tuple) else self.model.compute_logits(out.index_select(0, self.prefill_last_row))

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # a dry run of every forward about to be captured: its Triton kernels compile in parallel
            compile_ahead(lambda: self._capture_all(_run_only))
            self._capture_all(lambda forward, size: self._capture_one(forward, size, stream))
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s..%s) and %d prefill graphs (tokens %s..%s) "
                    "in %.1f s", len(self.graphs), self.buckets[0], self.buckets[-1], len(self.prefill_graphs),
                    self.prefill_buckets[0] if self.prefill_buckets else "-",
                    self.prefill_buckets[-1] if self.prefill_buckets else "-", time.monotonic() - start)

    def _capture_all(self, record: Callable[[Callable[[int], Output], int],
                                            tuple[torch.cuda.CUDAGraph, Output] | None]) -> None:
        """Every bucket's graph and static output, `record(forward, size)` capturing each
        (largest first: the pool grows once and later graphs reuse its memory); a `record`
        that returns None keeps nothing (compile_ahead's dry run)."""
        # padding prefill rows while capturing: a one-token sequence, no KV writes
        self.prefill_query_start_loc.copy_(torch.tensor([0, 1], dtype=torch.int32))
        self.slot_mapping.fill_(-1)
        for graphs, outputs, sizes, forward in (
                (self.prefill_graphs, self.prefill_outputs, self.prefill_buckets, self._prefill_forward),
                (self.graphs, self.outputs, self.buckets, self._forward)):
            for size in reversed(sizes):
                made = record(forward, size)
                if made is not None:
                    graphs[size], outputs[size] = made

    def _capture_one(self, forward: Callable[[int], Output], size: int, stream: torch.cuda.Stream
                     ) -> tuple[torch.cuda.CUDAGraph, Output]:
        forward(size)               # warm-up (Triton compilation, cuBLAS handles)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out = forward(size)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    def _replay(self, graph: torch.cuda.CUDAGraph, out: Output, num_tokens: int, size: int,
                receive: Receive | None) -> Output:
        """Receive the previous stage's rows into the static inputs, replay, and return the
        output's first `num_tokens` rows (logits of a prefill graph are one row already). The
        layers add into the received residual in place: padding rows are zeroed, or they would
        grow replay after replay."""
        if self.stage_in is not None:
            receive(*self._stage_in(num_tokens))
            if size > num_tokens:
                self.stage_in[1][num_tokens:size].zero_()
        graph.replay()
        if isinstance(out, tuple):
            return out[0][:num_tokens], out[1][:num_tokens]
        return None if out is None else out[:num_tokens]

    def _copy_tokens(self, inputs: StepInputs, size: int) -> None:
        """The step's token ids, positions and slots into the static buffers; tokens from its
        count up to the graph's `size` get slot -1 (no KV write)."""
        num = inputs.input_ids.shape[0]
        self.input_ids[:num].copy_(inputs.input_ids)
        self.positions[:num].copy_(inputs.positions)
        self.slot_mapping[:num].copy_(inputs.meta.slot_mapping)
        if size > num:
            self.slot_mapping[num:size].fill_(-1)

    def can_run(self, inputs: StepInputs) -> bool:
        num = len(inputs.rows)
        return bool(self.graphs) and inputs.meta.num_decodes == num and num <= self.buckets[-1] \
            and inputs.meta.max_seq_len <= self.max_model_len

    def run(self, inputs: StepInputs, receive: Receive | None = None) -> Output:
        """Logits [num_decodes, vocab] for an all-decode step (None on TP ranks other than 0,
        which compute no logits; a stage before the last: its (hidden, residual) rows)."""
        num = len(inputs.rows)
        bs = next(b for b in self.buckets if b >= num)
        meta = inputs.meta
        self._copy_tokens(inputs, bs)
        self.seq_lens[:num].copy_(meta.seq_lens)
        self.block_tables[:num, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        if bs > num:
            self.seq_lens[num:bs].fill_(1)
        return self._replay(self.graphs[bs], self.outputs[bs], num, bs, receive)

    def can_run_prefill(self, inputs: StepInputs) -> bool:
        """One sequence whose chunk ends its prompt (it samples), no decodes, at most the
        largest prefill bucket of tokens."""
        return (len(inputs.rows) == 1 and inputs.meta.num_decodes == 0 and inputs.sample_rows == [0]
                and bool(self.prefill_graphs) and inputs.query_lens[0] <= self.prefill_buckets[-1]
                and inputs.meta.max_seq_len <= self.max_model_len)

    def run_prefill(self, inputs: StepInputs, receive: Receive | None = None) -> Output:
        """Logits [1, vocab] of the chunk's last token (None on TP ranks other than 0; a stage
        before the last: the (hidden, residual) rows of every token)."""
        num = inputs.query_lens[0]
        size = next(s for s in self.prefill_buckets if s >= num)
        meta = inputs.meta
        self._copy_tokens(inputs, size)
        self.prefill_query_start_loc.copy_(meta.query_start_loc)
        self.prefill_seq_len.copy_(meta.seq_lens)
        self.prefill_last_row.copy_(inputs.logits_indices)
        self.block_tables[:1, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        return self._replay(self.prefill_graphs[size], self.prefill_outputs[size], num, size, receive)
