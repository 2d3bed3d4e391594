"""Start-up's profiled forward (CUDA): one forward of max_num_batched_tokens prompt tokens, logits
and a sampler pass against a one-block scratch cache, whose peak memory sizes the KV cache
(worker/kv_budget.py), and, in the same compile round, a dry run of every Triton launch the first
requests and the CUDA graphs will take (worker/compile_ahead.py)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedserve.attention import cascade_plan
from pagedserve.attention.backend import select_backend
from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.layers.parallel import is_last_stage
from pagedserve.layers.sampler import SamplingTensors, greedy_ids
from pagedserve.worker.compile_ahead import compile_ahead
from pagedserve.worker.sampling_inputs import SAMPLER_CHUNK_ROWS

if TYPE_CHECKING:
    from pagedserve.worker.model_runner import ModelRunner

SHORT_DRY_RUN_TOKENS = 512   # a short prompt's prefill launch takes other tiles (SHORT_TILES)


@torch.inference_mode()
def profile_run(runner: ModelRunner, num_tokens: int) -> None:
    """A forward of `num_tokens` prompt tokens, logits of max_num_seqs rows and a sampler pass,
    against a one-block scratch cache (stores skipped), to measure peak memory. On CUDA the
    runner's graph runner is made here (uncaptured: ModelRunner.finish_setup captures it once the
    KV cache exists) and its forwards dry-run with this one."""
    device, dtype, sched = runner.device, runner.model_config.dtype, runner.scheduler_config
    num_tokens = min(num_tokens, sched.max_model_len)
    backend = select_backend(device)
    for layer in runner.model.attention_layers():
        # of the KV cache's element type: the dry runs below take the launches the real cache will
        # (an FP8 cache's compiled late, 1.1-1.5 s stalls in a first thr512 run; RESULTS.md, session 40)
        shape = (1, runner.block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=runner.kv_dtype, device=device)
        layer.v_cache = torch.zeros_like(layer.k_cache)
        layer.backend = backend
    num_blocks = -(-num_tokens // runner.block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.zeros((1, num_blocks), dtype=torch.int32, device=device),
        max_query_len=num_tokens, max_seq_len=num_tokens, num_decodes=0)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.arange(num_tokens, device=device)
    intermediate = None
    if runner.pipeline is not None and runner.pipeline.prev is not None:
        hidden = torch.zeros((num_tokens, runner.model_config.hidden_size), dtype=dtype, device=device)
        intermediate = (hidden, hidden.clone())
    rows = min(sched.max_num_seqs, num_tokens)
    sample_rows = min(rows, SAMPLER_CHUNK_ROWS)   # the sampler's largest chunk (see sampling_inputs.sample)

    def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = runner.model(ids, positions, meta, intermediate)
        return hidden, runner.model.compute_logits(hidden[:rows]) if is_last_stage() else None

    if device.type == "cuda":
        # one compile round for this forward's Triton kernels, the greedy argmax's and the
        # CUDA graphs' (their forwards dry-run here on the scratch cache): a round costs
        # its slowest compile. No sampler in the dry run: skipped kernels leave garbage
        # logits, and multinomial asserts on NaN.
        graphs = None
        if not runner.device_config.enforce_eager:
            graphs = runner.uncaptured_graphs = runner.make_graph_runner()
        short = min(num_tokens, SHORT_DRY_RUN_TOKENS)
        short_meta = replace(meta, slot_mapping=meta.slot_mapping[:short],
                             query_start_loc=meta.query_start_loc.new_tensor([0, short]),
                             seq_lens=meta.seq_lens.new_tensor([short]), max_query_len=short, max_seq_len=short)

        mixed = mixed_step_metas(runner, backend, meta, num_tokens) if intermediate is None else []

        def dry_run() -> None:
            logits = forward()[1]
            if logits is not None:
                greedy_ids(logits[:sample_rows])
                # and the argmax that reads a structured-outputs bitmask (else the first such request
                # compiles it, stalling every running request on a cold cache)
                greedy_ids(logits[:sample_rows], torch.zeros((sample_rows, -(-logits.shape[1] // 32)),
                                                             dtype=torch.int32, device=device))
            if short < num_tokens:   # compiled in the same round
                runner.model(ids[:short], positions[:short], short_meta,
                             None if intermediate is None else tuple(t[:short] for t in intermediate))
            for step in mixed:   # the decode rows of mixed steps: their launch has no rotary inside
                size = step.slot_mapping.shape[0]
                runner.model(ids[:size], positions[:size], step, None)
            if graphs is not None:
                graphs.dry_run()
        compiled = compile_ahead(dry_run)
        if graphs is not None:
            graphs.compiled = compiled
    hidden, logits = forward()
    if logits is not None:
        runner.sampler(logits[:sample_rows], profiled_sampling_tensors(sample_rows, device))
        greedy_ids(logits[:sample_rows])   # its Triton argmax compiles (or is loaded) here, not in the first request
    del hidden, logits


def profiled_sampling_tensors(rows: int, device: torch.device) -> SamplingTensors:
    """The sampler's largest working set, which the memory profile measures: the sort-based path
    (typical-p takes it; the nucleus path needs far less) with top-p, min-p and 20 logprobs."""
    def full(value: float) -> torch.Tensor:
        return torch.full((rows,), value, device=device)
    return SamplingTensors(temperature=full(1.0), top_p=full(0.9), min_p=full(0.05), typical_p=full(0.9),
                           max_num_logprobs=20)


def mixed_step_metas(runner: ModelRunner, backend, meta: AttentionMetadata, num_tokens: int
                     ) -> list[AttentionMetadata]:
    """One eager step's metadata (on the scratch cache, stores skipped) per kernel specialisation
    that a mixed step's decode rows can take (paged_launch.decode_launch_shapes): rows
    decodes of the returned longest context, beside one prompt chunk of the backend's
    prefill_min_query_len tokens, as a step of max_num_batched_tokens = num_tokens can hold;
    with the cascade on (runner.cascade), those of decode rows that share a prefix too."""
    chunk = getattr(backend, "prefill_min_query_len", None)
    if chunk is None:
        return []
    from pagedserve.attention.paged_launch import decode_launch_shapes
    layer = next(iter(runner.model.attention_layers()), None)
    if layer is None:
        return []
    sched, device = runner.scheduler_config, meta.slot_mapping.device
    max_rows = min(sched.max_num_seqs - 1, num_tokens - chunk)
    if max_rows < 1 or chunk > sched.max_model_len:
        return []
    kinds = [(False, 1)]   # (cascade, fewest rows): decode rows sharing a prefix take the cascade's launches
    if runner.cascade and max_rows >= cascade_plan.CASCADE_MIN_ROWS:
        kinds.append((True, cascade_plan.CASCADE_MIN_ROWS))
    shapes = [(rows, longest, cascade) for cascade, min_rows in kinds for rows, longest in decode_launch_shapes(
        layer.num_heads, layer.num_kv_heads, layer.head_dim, runner.model_config.dtype, device, max_rows, chunk,
        sched.max_model_len, cascade=cascade, min_rows=min_rows)]
    metas = []
    for rows, longest, cascade in shapes:
        seq_lens = [longest] * rows + [chunk]
        starts = list(range(rows + 1)) + [rows + chunk]
        shared = tuple(torch.from_numpy(a).to(device) for a in cascade_plan.cascade_arrays(
            np.full(rows, longest - 1), [np.arange(rows)]).values()) if cascade else None
        metas.append(AttentionMetadata(
            slot_mapping=torch.full((rows + chunk,), -1, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.zeros((rows + 1, -(-sched.max_model_len // runner.block_size)), dtype=torch.int32,
                                     device=device),
            max_query_len=chunk, max_seq_len=longest, num_decodes=rows, num_decode_tokens=rows,
            query_start_loc_host=starts, seq_lens_host=seq_lens, cascade=shared))
    return metas
