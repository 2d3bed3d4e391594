"""Every prefill chunk of an eager step in ONE call a layer of cuDNN's fused attention, through
NVIDIA's cudnn-frontend (optional: `pip install 'pagedserve[cuda]'`; without it, or off CUDA, the
backend's other paths take these chunks). TritonBackend sends a step here only when one of its
long chunks has a length or context that torch's cuDNN op would need a new graph for.

torch's own cuDNN op (sdpa_prefill) builds a cuDNN graph per (query, key) length, so only round
chunk shapes could use it. The frontend's graph takes the lengths at run time instead: one graph
of a padded batch (B sequences, at most S_q queries and W blocks each) serves every step that
fits, with per-sequence lengths as device tensors:

    Q / O      packed rows of the step's tensors (ragged offsets: each chunk's first row)
    K / V      "paged":    the paged cache itself, read through a [B, 1, W, 1] page table
               "gathered": each sequence's cached rows copied into one packed buffer (ragged)
    mask       padding (seq_len_q, seq_len_kv) + causal aligned bottom-right: query row i of a
               chunk of L after C cached tokens sees keys [0, C + i], as in every other backend

The new tokens' K/V are stored in the cache before attention, so the context and the chunk
are read alike. The graph's B / S_q / W only grow (powers of two), so a run builds a handful.
`reference_execute` interprets the same inputs with torch math: the CPU tests' stand-in for
the cuDNN call, pinning what the inputs mean (and checked against cuDNN on the GPU).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

MODES = ("paged", "gathered")


def _pow2(value: int, floor: int) -> int:
    return max(floor, 1 << max(0, value - 1).bit_length())


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device` without a stream sync (pinned, non-blocking: a copy from
    pageable memory waits for the queued layers, which leaves the GPU idle behind the host)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class StepInputs:
    """One step's prefill sequences [seq_begin, seq_end) as the graph takes them (shared by
    every layer). Sequences past `num_seqs` up to `batch` are padding: no queries, one key."""

    num_seqs: int
    batch: int             # B of the graph
    max_query_len: int     # S_q of the graph
    table_width: int       # W of the graph (paged)
    token_begin: int       # the first prefill token's row in the step
    num_tokens: int        # rows from token_begin
    seq_len_q: torch.Tensor     # [B, 1, 1, 1] int32
    seq_len_kv: torch.Tensor    # [B, 1, 1, 1] int32
    q_offsets: torch.Tensor     # [B + 1, 1, 1, 1] int64: each chunk's first element in Q (from token_begin)
    o_offsets: torch.Tensor     # [B + 1, 1, 1, 1] int64: the same in O
    page_table: torch.Tensor | None     # [B, 1, W, 1] int32 (paged)
    kv_slots: torch.Tensor | None       # [sum of seq_len_kv] int64 cache slots, packed by sequence (gathered)
    kv_offsets: torch.Tensor | None     # [B + 1, 1, 1, 1] int64: each sequence's first element in K/V (gathered)
    kv_rows: int = 0


def packed_kv_slots(tables: torch.Tensor, kv_lens: Sequence[int], block_size: int) -> torch.Tensor:
    """The cache slots of keys [0, kv_lens[i]) of each sequence i of `tables` (its device block
    table rows), packed one sequence after another: [sum(kv_lens)] int64 on the tables' device.
    Key j of sequence i is in slot tables[i, j // block_size] * block_size + j % block_size."""
    lens_t = torch.tensor(kv_lens, dtype=torch.int64)
    starts = torch.cumsum(lens_t, 0) - lens_t
    seq_of = _to_device(torch.repeat_interleave(torch.arange(len(kv_lens)), lens_t), tables.device)
    pos = _to_device(torch.arange(int(lens_t.sum())) - torch.repeat_interleave(starts, lens_t), tables.device)
    return tables.long()[seq_of, pos // block_size] * block_size + pos % block_size


def plan_inputs(query_start_loc: Sequence[int], seq_lens: Sequence[int], block_tables: torch.Tensor,
                seq_begin: int, seq_end: int, q_token_stride: int, o_token_stride: int, kv_token_elems: int,
                block_size: int, mode: str, floor: tuple[int, int, int] = (1, 1, 1)) -> StepInputs:
    """The inputs of sequences [seq_begin, seq_end) from the step's host query_start_loc /
    seq_lens and device block_tables; `floor` = the smallest (B, S_q, W) to plan for (the
    graph's, so that it is reused)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = block_tables.device
    n = seq_end - seq_begin
    token_begin = int(query_start_loc[seq_begin])
    q_lens = [int(query_start_loc[s + 1]) - int(query_start_loc[s]) for s in range(seq_begin, seq_end)]
    kv_lens = [int(seq_lens[s]) for s in range(seq_begin, seq_end)]
    width = -(-max(kv_lens) // block_size)
    batch = _pow2(n, floor[0])
    max_q = _pow2(max(q_lens), floor[1])
    table_width = _pow2(width, floor[2])
    pad = batch - n
    q_lens_p, kv_lens_p = q_lens + [0] * pad, kv_lens + [1] * pad
    starts = [0]
    for length in q_lens_p:
        starts.append(starts[-1] + length)
    kv_starts = [0]
    for length in kv_lens_p:
        kv_starts.append(kv_starts[-1] + length)
    ints = torch.tensor([q_lens_p, kv_lens_p], dtype=torch.int32)
    offs = torch.tensor([[t * q_token_stride for t in starts], [t * o_token_stride for t in starts],
                         [t * kv_token_elems for t in kv_starts]], dtype=torch.int64)
    ints, offs = _to_device(ints, device), _to_device(offs, device)
    page_table = kv_slots = kv_offsets = None
    tables = block_tables[seq_begin:seq_end, :width]
    if mode == "paged":
        page_table = torch.zeros((batch, table_width), dtype=torch.int32, device=device)
        page_table[:n, :width].copy_(tables)
        page_table = page_table.view(batch, 1, table_width, 1)
    else:
        kv_slots = packed_kv_slots(tables, kv_lens, block_size)
        if pad:   # each padding sequence's one key: slot 0 (any valid row; no query reads it)
            kv_slots = torch.cat([kv_slots, torch.zeros(pad, dtype=torch.int64, device=device)])
        kv_offsets = offs[2].view(batch + 1, 1, 1, 1)
    return StepInputs(n, batch, max_q, table_width, token_begin, starts[n], ints[0].view(batch, 1, 1, 1),
                      ints[1].view(batch, 1, 1, 1), offs[0].view(batch + 1, 1, 1, 1),
                      offs[1].view(batch + 1, 1, 1, 1), page_table, kv_slots, kv_offsets, kv_starts[-1])


def gather_kv(cache: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """The packed K or V rows [kv_rows, Hkv, D] of a gathered step (one index_select); also
    fa4_prefill's, whose Fa4Inputs carry kv_slots alike."""
    return cache.view(-1, *cache.shape[2:]).index_select(0, inputs.kv_slots)


def reference_execute(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, inputs: StepInputs,
                      scale: float, out: torch.Tensor, block_size: int) -> None:
    """What the cuDNN graph computes from these inputs, in torch math (fp32): query / out are
    the step's [T, Hq, D] views from inputs.token_begin (rows located by the element offsets),
    K/V through the page table or the packed gather. Writes out; for the CPU tests."""
    q_flat, o_flat = query[inputs.token_begin:], out[inputs.token_begin:]
    hq, d = query.shape[1], query.shape[2]
    lens_q = inputs.seq_len_q.flatten().tolist()
    lens_kv = inputs.seq_len_kv.flatten().tolist()
    q_off = inputs.q_offsets.flatten().tolist()
    o_off = inputs.o_offsets.flatten().tolist()
    packed = None if inputs.page_table is not None else (gather_kv(k_cache, inputs), gather_kv(v_cache, inputs))
    kv_elems = k_cache.shape[2] * d
    for b in range(inputs.batch):
        lq, lkv = lens_q[b], lens_kv[b]
        if lq == 0:
            continue
        assert q_off[b] % query.stride(0) == 0 and o_off[b] % out.stride(0) == 0
        q = q_flat[q_off[b] // query.stride(0):][:lq].float()
        if packed is None:
            blocks = inputs.page_table[b, 0, :, 0][: -(-lkv // block_size)].long()
            k = k_cache.index_select(0, blocks).flatten(0, 1)[:lkv].float()
            v = v_cache.index_select(0, blocks).flatten(0, 1)[:lkv].float()
        else:
            first = int(inputs.kv_offsets.flatten()[b]) // kv_elems
            k, v = packed[0][first:first + lkv].float(), packed[1][first:first + lkv].float()
        group = hq // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        visible = torch.arange(lkv)[None, :] <= (torch.arange(lq) + (lkv - lq))[:, None]   # bottom-right causal
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        o_flat[o_off[b] // out.stride(0):][:lq] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)


@functools.cache
def available() -> bool:
    """Whether cudnn-frontend is importable (its cuDNN is torch's); asked once a process."""
    try:
        import cudnn  # noqa: F401
    except Exception:   # not installed, or its library does not load
        return False
    return True


class _Graph:
    """One built cuDNN graph and its tensor handles."""

    def __init__(self, cudnn, handle, query: torch.Tensor, k_cache: torch.Tensor, out_stride: int,
                 inputs: StepInputs, scale: float, mode: str) -> None:
        b, s_q, w = inputs.batch, inputs.max_query_len, inputs.table_width
        hq, d = query.shape[1], query.shape[2]
        hkv, block_size = k_cache.shape[2], k_cache.shape[1]
        io_type = cudnn.data_type.BFLOAT16 if query.dtype == torch.bfloat16 else cudnn.data_type.HALF
        graph = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        qs = query.stride(0)
        int32, int64 = cudnn.data_type.INT32, cudnn.data_type.INT64
        self.q = graph.tensor(name="q", dim=[b, hq, s_q, d], stride=[s_q * qs, d, qs, 1], data_type=io_type)
        self.q_off = graph.tensor(name="q_off", dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=int64)
        self.q.set_ragged_offset(self.q_off)
        self.len_q = graph.tensor(name="len_q", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=int32)
        self.len_kv = graph.tensor(name="len_kv", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=int32)
        extra = {}
        if mode == "paged":
            ks = k_cache.stride()
            dims, strides = [k_cache.shape[0], hkv, block_size, d], [ks[0], ks[2], ks[1], 1]
            self.k = graph.tensor(name="k", dim=dims, stride=strides, data_type=io_type)
            self.v = graph.tensor(name="v", dim=dims, stride=strides, data_type=io_type)
            self.table = graph.tensor(name="table", dim=[b, 1, w, 1], stride=[w, w, 1, 1], data_type=int32)
            extra = dict(paged_attention_k_table=self.table, paged_attention_v_table=self.table,
                         paged_attention_max_seq_len_kv=w * block_size)
        else:   # packed rows of at most W blocks' worth of keys a sequence
            s_kv = w * block_size
            dims, strides = [b, hkv, s_kv, d], [s_kv * hkv * d, d, hkv * d, 1]
            self.k = graph.tensor(name="k", dim=dims, stride=strides, data_type=io_type)
            self.v = graph.tensor(name="v", dim=dims, stride=strides, data_type=io_type)
            self.kv_off = graph.tensor(name="kv_off", dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=int64)
            self.k.set_ragged_offset(self.kv_off)
            self.v.set_ragged_offset(self.kv_off)
        o, _ = graph.sdpa(name="prefill", q=self.q, k=self.k, v=self.v, generate_stats=False, attn_scale=scale,
                          use_padding_mask=True, seq_len_q=self.len_q, seq_len_kv=self.len_kv,
                          diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0,
                          **extra)
        self.o_off = graph.tensor(name="o_off", dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=int64)
        o.set_output(True).set_dim([b, hq, s_q, d]).set_stride([s_q * out_stride, d, out_stride, 1])
        o.set_ragged_offset(self.o_off)
        self.o = o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=query.device)
        self.mode = mode

    def execute(self, handle, query, k, v, out, inputs: StepInputs) -> None:
        pack = {self.q: query[inputs.token_begin:], self.k: k, self.v: v, self.o: out[inputs.token_begin:],
                self.q_off: inputs.q_offsets, self.o_off: inputs.o_offsets, self.len_q: inputs.seq_len_q,
                self.len_kv: inputs.seq_len_kv}
        if self.mode == "paged":
            pack[self.table] = inputs.page_table
        else:
            pack[self.kv_off] = inputs.kv_offsets
        self.graph.execute(pack, self.workspace, handle=handle)


class CudnnPrefill:
    """The prefill chunks of a step through one cuDNN graph call a layer (see the module's
    docstring). `executor` replaces the cuDNN call (tests: reference_execute)."""

    def __init__(self, mode: str = "paged", executor=None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.executor = executor
        self._floor = (1, 1024, 64)     # the graph's (B, S_q, W): only grow
        self._graphs: dict[tuple, _Graph] = {}
        self._meta = None
        self._step_key: tuple | None = None
        self._inputs: StepInputs | None = None
        self._handle = None
        self.graphs_built = 0

    def _step_inputs(self, query, out, k_cache, meta, seq_begin: int) -> StepInputs:
        key = (seq_begin, query.stride(0), out.stride(0))
        if meta is not self._meta or key != self._step_key:   # planned once a step, for every layer
            self._inputs = plan_inputs(meta.query_start_loc_host, meta.seq_lens_host, meta.block_tables,
                                       seq_begin, meta.num_seqs, query.stride(0), out.stride(0),
                                       k_cache.shape[2] * k_cache.shape[3], k_cache.shape[1], self.mode,
                                       self._floor)
            self._floor = (self._inputs.batch, self._inputs.max_query_len, self._inputs.table_width)
            self._meta, self._step_key = meta, key
        return self._inputs

    def __call__(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
                 out: torch.Tensor, seq_begin: int) -> torch.Tensor:
        """Attention of sequences [seq_begin, num_seqs) of the step (its prefill chunks) into
        out; needs the step's host lists (eager steps)."""
        inputs = self._step_inputs(query, out, k_cache, meta, seq_begin)
        if self.executor is not None:
            self.executor(query, k_cache, v_cache, inputs, scale, out, k_cache.shape[1])
            return out
        import cudnn
        if self._handle is None:
            self._handle = cudnn.create_handle()
        cudnn.set_stream(handle=self._handle, stream=torch.cuda.current_stream(query.device).cuda_stream)
        key = (self.mode, query.dtype, query.shape[1:], query.stride(0), out.stride(0), tuple(k_cache.shape),
               k_cache.stride(), inputs.batch, inputs.max_query_len, inputs.table_width, scale)
        graph = self._graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            graph = self._graphs[key] = _Graph(cudnn, self._handle, query, k_cache, out.stride(0), inputs, scale,
                                               self.mode)
            self.graphs_built += 1
            logger.info("cuDNN prefill graph %d (%s; B %d, S_q %d, W %d) built in %.0f ms", self.graphs_built,
                        self.mode, inputs.batch, inputs.max_query_len, inputs.table_width,
                        (time.perf_counter() - t0) * 1e3)
        if self.mode == "paged":
            k, v = k_cache, v_cache
        else:
            k, v = gather_kv(k_cache, inputs), gather_kv(v_cache, inputs)
        graph.execute(self._handle, query, k, v, out, inputs)
        return out
