"""CUDA graphs for decode steps: one graph per batch-size bucket up to max_num_seqs (at most
MAX_CAPTURE_SIZE, as vLLM's default capture limit: larger decode batches run eagerly, where
launch overhead is small against the work), captured over static input buffers; a step of
n decodes replays the smallest bucket >= n with the rows past n padded harmlessly (slot -1: no KV write; seq_len 1: reads one cached key of
whatever block the stale table row names; their logits are dropped).

The graph covers embedding -> layers -> final norm -> LM head, so a replay returns logits.
Attention in the graph is launched for max_seq_len = max_model_len: the grid (and split-K
choice) is fixed at capture, and each program bounds its work by the live seq_lens.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


MAX_CAPTURE_SIZE = 512


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 128, every 32 up to 256, every 64 up to 512: 20 graphs
    for 512 (each costs start-up time: ~0.4 s for an 8B model). Padding a batch up to its
    bucket is nearly free while decode GEMMs are bound by weight reads (below ~300 rows on
    an H100); the wider steps sit above 128 rows, where a step's work is large anyway."""
    max_num_seqs = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 257, 32)) + list(range(320, 513, 64))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class CudaGraphRunner:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.buckets = batch_size_buckets(max_num_seqs)
        max_bs = self.buckets[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
                                 max_query_len=1, max_seq_len=self.max_model_len, num_decodes=bs,
                                 num_decode_tokens=bs)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):   # largest first: the pool grows once
                self._forward(bs)               # warm-up (Triton compilation, cuBLAS handles)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    out = self._forward(bs)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = graph
                self.outputs[bs] = out
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s..%s) in %.1f s", len(self.graphs),
                    self.buckets[0], self.buckets[-1], time.monotonic() - start)

    def can_run(self, inputs: StepInputs) -> bool:
        num = len(inputs.rows)
        return bool(self.graphs) and inputs.meta.num_decodes == num and num <= self.buckets[-1] \
            and inputs.meta.max_seq_len <= self.max_model_len

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits [num_decodes, vocab] for an all-decode step (None on TP ranks other than 0,
        which compute no logits)."""
        num = len(inputs.rows)
        bs = next(b for b in self.buckets if b >= num)
        meta = inputs.meta
        self.input_ids[:num].copy_(inputs.input_ids)
        self.positions[:num].copy_(inputs.positions)
        self.slot_mapping[:num].copy_(meta.slot_mapping)
        self.seq_lens[:num].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:num, :width].copy_(meta.block_tables)
        if bs > num:
            self.slot_mapping[num:bs].fill_(-1)
            self.seq_lens[num:bs].fill_(1)
        self.graphs[bs].replay()
        out = self.outputs[bs]
        return None if out is None else out[:num]
