"""Piecewise CUDA graphs of mixed steps (worker/cuda_graph.py's CudaGraphRunner holds one
MixedGraphs; `mixed=True`, PAGEDSERVE_MIXED_GRAPHS=0 turns them off): any step outside the decode
and lone-prefill graphs of at most MAX_MIXED_TOKENS tokens, e.g. a new prompt's chunk beside the
running decodes. One set of graphs per total-token-count bucket (mixed_token_buckets), split at
every attention call: piece 0 runs embedding -> layer 0's norm, QKV, rotary and KV store and
copies q/k/v into static buffers; attention then runs EAGERLY on them with the step's real
metadata (the same backend call, so the same kernels as an eager step: decodes, their cascade
over a shared prefix, chunks with cached context, long chunks per sequence), writing a static
output that piece 1 (o_proj, MLP, layer 1 up to its attention) reads; the last piece ends at the
final norm and returns the hidden states (logits are taken eagerly, as in an eager step). This is
vLLM V1's default for mixed batches (piecewise graphs around an eager attention); a padded token
has slot -1 (no KV write) and lies past every sequence (attention never reads or writes its row).
The pieces read the runner's static token buffers (input ids, positions, slots) and share its
graph memory pool.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.worker.graph_statics import MixedStatics
from pagedserve.worker.input_batch import StepInputs

MAX_MIXED_TOKENS = 2048


def mixed_token_buckets(max_tokens: int) -> list[int]:
    """32, then every 64 up to 1024, every 128 up to min(max_tokens, MAX_MIXED_TOKENS): a step
    pads by at most 63 tokens below 1024 tokens (6% at 1024), 127 above; 25 buckets for 2048.
    A step of fewer than 32 tokens pads to 32 (its matmuls cost about the same)."""
    limit = min(max_tokens, MAX_MIXED_TOKENS)
    sizes = [32] + list(range(64, 1025, 64)) + list(range(1152, MAX_MIXED_TOKENS + 1, 128))
    return [s for s in sizes if s <= limit]


class _AttentionCall:
    """The attention of one layer between two pieces: its backend, caches and scale."""

    def __init__(self, backend, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> None:
        self.backend, self.k_cache, self.v_cache, self.scale = backend, k_cache, v_cache, scale


class _SplitBackend:
    """Stands in for every attention layer's backend while the mixed graphs are warmed up and
    captured: each attend() copies q/k/v into the static buffers, ends the current piece and
    starts the next (`split`), and returns the static output the next piece reads. Everything
    else is the real backend's."""

    def __init__(self, inner, split: Callable) -> None:
        self.inner, self.name, self.split = inner, inner.name, split

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def store_kv(self, *args, **kwargs) -> None:
        self.inner.store_kv(*args, **kwargs)

    def attend(self, query, key, value, k_cache, v_cache, meta, scale, out=None) -> torch.Tensor:
        return self.split(self.inner, query, key, value, k_cache, v_cache, scale)


class MixedGraphs:
    """Per bucket of `buckets`, the pieces (one more than attention calls) and the final hidden
    states of a mixed step's forward over `runner`'s static token buffers (`runner`: the
    cuda_graph.CudaGraphRunner that holds this one; not imported here, which imports this)."""

    def __init__(self, runner: Any, buckets: list[int]) -> None:
        self.runner, self.buckets = runner, buckets
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.statics = MixedStatics(buckets[-1] if buckets else 0)
        self.attention_calls: list[_AttentionCall] = []
        self.enabled = True   # benchmarks switch it off for an eager A/B on one engine

    def clear(self) -> None:
        self.graphs, self.outputs, self.attention_calls = {}, {}, []

    def capture(self, stream: torch.cuda.Stream | None) -> None:
        """Every bucket's pieces, largest first, each after an eager warm-up of its forward
        (only the largest's once compile-ahead has compiled and loaded the kernels); with no
        stream only the eager forwards (compile_ahead's dry run)."""
        self.runner._padding_inputs()
        for i, size in enumerate(reversed(self.buckets)):
            if stream is None or i == 0 or not self.runner.compiled:
                self.forward(size, None)
            if stream is not None:
                self.graphs[size], self.outputs[size] = self.forward(size, stream)

    def forward(self, size: int, stream: torch.cuda.Stream | None, attend_meta: AttentionMetadata | None = None
                ) -> tuple[list[torch.cuda.CUDAGraph], torch.Tensor]:
        """The model's forward over the static inputs' first `size` tokens with every attention
        call split out: captured as pieces on `stream`, or all run eagerly (None), attention on
        `attend_meta`'s tokens (default: the capture metadata's one token). Returns the pieces
        and the final hidden states (static when captured). What run replays, so run eagerly
        with a step's metadata it computes what the replay does (tests/unit)."""
        r = self.runner
        meta = AttentionMetadata(slot_mapping=r.slot_mapping[:size], query_start_loc=r.prefill_query_start_loc,
                                 seq_lens=r.prefill_seq_len, block_tables=r.block_tables[:1],
                                 max_query_len=size, max_seq_len=r.max_model_len, num_decodes=0)
        attend_meta = attend_meta or meta
        live = size if attend_meta is meta else int(attend_meta.query_start_loc_host[-1])
        pieces: list[torch.cuda.CUDAGraph] = []
        calls: list[_AttentionCall] = []

        def next_piece() -> None:
            if pieces:
                pieces[-1].capture_end()
            pieces.append(torch.cuda.CUDAGraph())
            pieces[-1].capture_begin(pool=r.pool)

        def split(inner, query, key, value, k_cache, v_cache, scale) -> torch.Tensor:
            self.statics.fill(query, key, value)
            calls.append(_AttentionCall(inner, k_cache, v_cache, scale))
            if stream is None:
                q, k, v, out = self.statics.views(live)
                inner.attend(q, k, v, k_cache, v_cache, attend_meta, scale, out=out)
            else:
                next_piece()
            return self.statics.out[:size]

        layers = r.model.attention_layers()
        backends = [layer.backend for layer in layers]
        for layer in layers:
            layer.backend = _SplitBackend(layer.backend, split)
        try:
            if stream is not None:
                torch.cuda.synchronize()
                next_piece()
            hidden = r.model(r.input_ids[:size], r.positions[:size], meta)
        except Exception:
            if pieces:
                try:   # leave no capture open on the stream
                    pieces[-1].capture_end()
                except Exception:   # noqa: BLE001 - the first error is the one raised
                    pass
            raise
        finally:
            for layer, backend in zip(layers, backends):
                layer.backend = backend
        if stream is not None:
            pieces[-1].capture_end()
            if self.attention_calls and len(calls) != len(self.attention_calls):
                raise RuntimeError(f"mixed bucket {size}: {len(calls)} attention calls, "
                                   f"{len(self.attention_calls)} in the first bucket")
            self.attention_calls = calls
        return pieces, hidden

    def can_run(self, inputs: StepInputs) -> bool:
        """Any step of at most the largest bucket of tokens, once they are captured."""
        return (self.enabled and bool(self.graphs) and inputs.input_ids.shape[0] <= self.buckets[-1]
                and inputs.meta.max_seq_len <= self.runner.max_model_len)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The final hidden states [num_tokens, hidden] of a step: the bucket's pieces replayed
        in turn, each layer's attention run eagerly between them on the static q/k/v with the
        step's own metadata."""
        num = inputs.input_ids.shape[0]
        size = next(s for s in self.buckets if s >= num)
        self.runner._copy_tokens(inputs, size)
        q, k, v, out = self.statics.views(num)
        meta = inputs.meta
        pieces = self.graphs[size]
        for piece, call in zip(pieces, self.attention_calls):
            piece.replay()
            call.backend.attend(q, k, v, call.k_cache, call.v_cache, meta, call.scale, out=out)
        pieces[-1].replay()
        return self.outputs[size][:num]
