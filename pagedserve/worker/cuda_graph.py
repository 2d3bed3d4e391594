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

- mixed steps (`mixed=True`): the piecewise graphs of worker/mixed_graphs.py (MixedGraphs), which
  read this runner's static token buffers and share its memory pool.

Each decode / prefill graph covers embedding -> layers -> final norm -> LM head, so a replay
returns logits. A decode graph's inputs (graph_statics.DecodeStatics) arrive in one host -> device copy of
its bucket's bytes, staged while the step's inputs are built (`stage`), and the graph itself
begins by taking the tokens the previous step sampled on the device into its input ids
(`feed_tokens`); a decode graph of at most GRAPH_ARGMAX_ROWS rows ends with the greedy argmax
into static sampled ids, which the runner takes when every row is plain greedy. Beside the
replay a b1 step then has that copy and the sampled ids' copy to the host: the six device
copies, the argmax and the fill it launched before (~30 us a llama-1b step with their gaps,
benchmarks/RESULTS.md) are gone.
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

import numpy as np
import torch
from torch import nn

from pagedserve.attention import cascade_plan
from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.layers import linear_ops
from pagedserve.worker.compile_ahead import compile_ahead
from pagedserve.worker.graph_statics import DecodeStatics
from pagedserve.worker.input_batch import StepInputs
from pagedserve.worker.mixed_graphs import MixedGraphs, mixed_token_buckets

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None   # logits, a stage's (hidden, residual), or None
Receive = Callable[[torch.Tensor, torch.Tensor], None]   # fills (hidden, residual) views in place

logger = logging.getLogger(__name__)


MAX_CAPTURE_SIZE = 512
MAX_PREFILL_TOKENS = 1024
# Decode graphs of up to this many rows end in the greedy argmax (a step that samples otherwise
# wastes it: 32 rows of a 128k vocabulary are 16 MB of fp32 logits, ~5 us against a >= 1 ms step).
GRAPH_ARGMAX_ROWS = 32


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
                 stage_input: tuple[int, torch.dtype] | None = None, mixed: bool = False,
                 cascade: bool = False) -> None:
        """`stage_input`: (hidden size, dtype) of the hidden states a pipeline stage after the
        first receives (None: this model embeds the token ids itself). `mixed`: capture the
        piecewise graphs of mixed steps too (one stage, one rank only). `cascade`: the decode
        buckets of at least cascade_plan.CASCADE_MIN_ROWS rows get a second graph whose
        attention reads the rows' shared prefix once (attention/triton_cascade.py), replayed
        for the steps that have one (StepInputs.cascade_len)."""
        self.model = model
        self.max_model_len = max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        self.cascade_buckets = [b for b in self.buckets if b >= cascade_plan.CASCADE_MIN_ROWS] if cascade else []
        self.prefill_buckets = prefill_token_buckets(min(max_num_batched_tokens, max_model_len))
        mixed_buckets = mixed_token_buckets(max_num_batched_tokens) if mixed and stage_input is None else []
        max_bs = self.buckets[-1]
        max_tokens = max([max_bs] + self.prefill_buckets + mixed_buckets)
        max_blocks = -(-max_model_len // block_size)
        # the prefill and mixed graphs' tokens; the decode graphs read their own (DecodeStatics)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((1, max_blocks), dtype=torch.int32, device=device)
        self.decode = DecodeStatics(max_bs, max_blocks, device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(max_bs, dtype=torch.int64, device=device)
        # the decode graphs' sampled ids (written by the argmax of those that end in one, else by
        # take_sampled): a step's fed rows read the previous step's from here
        self.sampled = torch.zeros(max(max_num_seqs, max_bs), dtype=torch.int64, device=device)
        self.argmax_buckets: set[int] = set()   # decode buckets whose graph ends in the argmax
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
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_outputs: dict[int, Output] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_outputs: dict[int, Output] = {}
        self.mixed = MixedGraphs(self, mixed_buckets)   # mixed steps' pieces (worker/mixed_graphs.py)
        self.pool = None
        # True once a compile-ahead round with dry_run() compiled and loaded every Triton kernel
        # the captures launch: capture() then warms up only the first size of each kind
        self.compiled = False

    def dry_run(self) -> None:
        """Every forward capture() will record, run eagerly with nothing kept: compile_ahead's
        dry run (worker/profile_run.py joins it to the profile forward's: one compile round)."""
        self._capture_all(_run_only)
        self.mixed.capture(None)

    def _meta(self, bs: int, cascade: bool = False) -> AttentionMetadata:
        v = self.decode.views(bs)
        return AttentionMetadata(slot_mapping=v["slot_mapping"], query_start_loc=self.query_start_loc[:bs + 1],
                                 seq_lens=v["seq_lens"], block_tables=v["block_tables"],
                                 max_query_len=1, max_seq_len=self.max_model_len, num_decodes=bs,
                                 num_decode_tokens=bs,
                                 cascade=(v["cascade_len"], v["cascade_rows"], v["cascade_groups"]) if cascade
                                 else None)

    def _stage_in(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.stage_in is None else (self.stage_in[0][:num_tokens], self.stage_in[1][:num_tokens])

    def _forward(self, bs: int, cascade: bool = False) -> Output:
        """A decode graph: the fed tokens into the input ids, the forward, and up to
        GRAPH_ARGMAX_ROWS rows the greedy argmax of the logits into the static sampled ids.
        `cascade`: its attention takes the static cascade_len / cascade_rows / cascade_groups (the
        cascade graphs)."""
        from pagedserve.layers.triton_ops import argmax_rows, feed_tokens   # Triton: CUDA only (a test extra on the CPU)
        v = self.decode.views(bs)
        feed_tokens(v["input_ids"], v["feed"], self.sampled)
        # new view objects each forward: eager code keys per-step caches on the tensor (rotary.py on the CPU)
        out = self.model(v["input_ids"][:bs], v["positions"][:bs], self._meta(bs, cascade), self._stage_in(bs))
        if isinstance(out, tuple):
            return out
        logits = self.model.compute_logits(out)
        if logits is not None and bs <= GRAPH_ARGMAX_ROWS:
            if logits.is_cuda:
                argmax_rows(logits, out=self.sampled[:bs])
            else:   # the CPU's eager runs of this forward (tests)
                self.sampled[:bs].copy_(logits.argmax(dim=-1))
            self.argmax_buckets.add(bs)
        return logits

    def _cascade_forward(self, bs: int) -> Output:
        return self._forward(bs, cascade=True)

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
            if not self.compiled:   # a dry run of every forward about to be captured: its Triton kernels compile in parallel
                self.compiled = compile_ahead(self.dry_run)
            if self.mixed.buckets:   # the largest graphs first: the pool grows once
                self.pool = torch.cuda.graph_pool_handle()
                try:
                    self.mixed.capture(stream)
                except Exception:   # noqa: BLE001 - mixed steps run eagerly, as without them
                    logger.warning("capturing the mixed-step graphs failed; mixed steps run eagerly", exc_info=True)
                    self.mixed.clear()
            warmed: set[Callable] = set()

            def capture_one(forward: Callable[[int], Output], size: int) -> tuple[torch.cuda.CUDAGraph, Output]:
                # a warm-up loads kernels and lazily made handles: with every kernel compiled and
                # loaded ahead, the first size of each forward needs it, the others only if not
                warm_up = not self.compiled or forward not in warmed
                warmed.add(forward)
                return self._capture_one(forward, size, stream, warm_up)
            self._capture_all(capture_one)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s..%s; %d more with cascade attention), %d prefill "
                    "graphs (tokens %s..%s) and %d mixed-step buckets of %d pieces (tokens %s..%s) in %.1f s",
                    len(self.graphs), self.buckets[0], self.buckets[-1], len(self.cascade_graphs),
                    len(self.prefill_graphs),
                    self.prefill_buckets[0] if self.prefill_buckets else "-",
                    self.prefill_buckets[-1] if self.prefill_buckets else "-", len(self.mixed.graphs),
                    len(self.mixed.attention_calls) + 1, self.mixed.buckets[0] if self.mixed.buckets else "-",
                    self.mixed.buckets[-1] if self.mixed.buckets else "-", time.monotonic() - start)

    def _capture_all(self, record: Callable[[Callable[[int], Output], int],
                                            tuple[torch.cuda.CUDAGraph, Output] | None]) -> None:
        """Every bucket's graph and static output, `record(forward, size)` capturing each
        (largest first: the pool grows once and later graphs reuse its memory); a `record`
        that returns None keeps nothing (compile_ahead's dry run)."""
        self._padding_inputs()
        self.argmax_buckets.clear()
        if self.sampled.is_cuda:   # the graphs' argmax counts its programs in these: grown before capture
            from pagedserve.layers.triton_ops import zeroed_counters
            zeroed_counters(self.sampled.device, self.buckets[-1])
        for graphs, outputs, sizes, forward in (
                (self.prefill_graphs, self.prefill_outputs, self.prefill_buckets, self._prefill_forward),
                (self.graphs, self.outputs, self.buckets, self._forward),
                (self.cascade_graphs, self.cascade_outputs, self.cascade_buckets, self._cascade_forward)):
            for size in reversed(sizes):
                if forward != self._prefill_forward:   # this bucket's layout of the decode inputs: padding rows
                    self.decode.pad(size)
                made = record(forward, size)
                if made is not None:
                    graphs[size], outputs[size] = made

    def _padding_inputs(self) -> None:
        """What the forwards run on while capturing: a one-token sequence, no KV writes."""
        self.prefill_query_start_loc.copy_(torch.tensor([0, 1], dtype=torch.int32))
        self.slot_mapping.fill_(-1)

    def _capture_one(self, forward: Callable[[int], Output], size: int, stream: torch.cuda.Stream,
                     warm_up: bool = True) -> tuple[torch.cuda.CUDAGraph, Output]:
        if warm_up:
            forward(size)           # Triton compilation / module loads, cuBLAS handles
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

    def logits_rows(self, rows: int) -> int:
        """The rows an LM head of `rows` rows outside these graphs computes (model_runner._logits):
        past triton_gemv.GEMV_ANY_SHAPE_ROWS (cuBLAS's, or a gemv launch tuned per row bucket), the
        smallest decode bucket holding them, whose matmul the capture ran; else `rows`."""
        from pagedserve.layers.triton_gemv import GEMV_ANY_SHAPE_ROWS
        if rows <= min(linear_ops.GEMV_MAX_ROWS, GEMV_ANY_SHAPE_ROWS) or not self.graphs \
                or rows > self.buckets[-1]:
            return rows
        return next(b for b in self.buckets if b >= rows)

    def can_stage(self, num: int, max_seq_len: int) -> bool:
        """An all-decode step of `num` rows and this longest sequence replays a decode graph."""
        return bool(self.graphs) and num <= self.buckets[-1] and max_seq_len <= self.max_model_len

    def stage(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """An all-decode step's inputs (DecodeStatics.FIELDS' arrays, n rows) into its bucket's
        static inputs in one copy, before the replay (run): the step's device tensors, n rows
        each, with query_start_loc and logits_indices (static aranges)."""
        num = arrays["input_ids"].shape[0]
        views = self.decode.stage(next(b for b in self.buckets if b >= num), arrays)
        return {**{name: view[:num] for name, view in views.items()},
                "query_start_loc": self.query_start_loc[:num + 1], "logits_indices": self.logits_indices[:num]}

    def take_sampled(self, prev: torch.Tensor, feed: np.ndarray) -> np.ndarray:
        """The previous step's sampled ids (`prev`, device) where the feed rows (indices into
        `prev`, -1 none) find them: in place when they are these graphs' own; else copied into
        self.sampled (gathered, the feed renumbered, if `prev` is longer). Returns the feed."""
        if prev.data_ptr() == self.sampled.data_ptr():
            return feed
        if prev.shape[0] <= self.sampled.shape[0]:
            self.sampled[:prev.shape[0]].copy_(prev, non_blocking=True)
            return feed
        fed = np.flatnonzero(feed >= 0)
        self.sampled[:fed.size].copy_(prev[torch.from_numpy(feed[fed].astype(np.int64)).to(prev.device)])
        renumbered = np.full_like(feed, -1)
        renumbered[fed] = np.arange(fed.size, dtype=feed.dtype)
        return renumbered

    def greedy_ids(self, num: int) -> torch.Tensor | None:
        """The argmax of the last replayed decode graph's `num` rows of logits (the static
        sampled ids; the next replay overwrites them), if its graph ends in one."""
        bs = next(b for b in self.buckets if b >= num)
        return self.sampled[:num] if bs in self.argmax_buckets else None

    def run(self, inputs: StepInputs, receive: Receive | None = None) -> Output:
        """Logits [num_decodes, vocab] for an all-decode step staged by `stage` (None on TP ranks
        other than 0, which compute no logits; a stage before the last: its (hidden, residual)
        rows)."""
        if not inputs.staged:
            raise ValueError("CudaGraphRunner.run: the step's inputs were not staged (stage())")
        num = len(inputs.rows)
        bs = next(b for b in self.buckets if b >= num)
        if inputs.cascade_len and bs in self.cascade_graphs:
            return self._replay(self.cascade_graphs[bs], self.cascade_outputs[bs], num, bs, receive)
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
