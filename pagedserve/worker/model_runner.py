"""Persistent batch state -> inputs -> forward -> sample. Never decides policy: it does what
the SchedulerOutput says and reports sampled tokens in a ModelRunnerOutput.

Under tensor parallelism every rank runs one of these on the same SchedulerOutput; only
rank 0 gets logits and samples (the others return None). Under pipeline parallelism each
stage runs its layers (`pipeline`: hidden states in from the previous stage, out to the next,
worker/pipeline.py) and the last stage's TP rank 0 samples. Async TP (`share_sampled`, PP=1
only): rank 0 broadcasts each step's sampled ids on the device and every rank keeps the same
placeholders and `_prev_sampled`; a worker fills a placeholder when a SchedulerOutput carries
its token.

Sampled ids reach the host through a PendingRunnerOutput (a pinned copy and an event):
`execute_model(so)` waits for it; with async scheduling (`non_block=True`) it is returned at
once and resolved by the engine after the next step is launched.
Each sampled row gets a -1 placeholder token in its state; if the next step is built before
the placeholder is resolved, that token's input id is taken from the device tensor of the
previous step's samples (no host round trip).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from pagedserve.attention.backend import TritonBackend, select_backend
from pagedserve.config import (CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, WeightSource, kv_cache_torch_dtype,
                               shares_sampled_ids)
from pagedserve.engine_io import ModelRunnerOutput, RequestId, SchedulerOutput, WindowOutput
from pagedserve.layers.linear import set_gemv_max_rows
from pagedserve.layers.parallel import broadcast_from_rank0, is_last_stage, pp_world_size, tp_rank, tp_world_size
from pagedserve.layers.sampler import Sampler, SamplerOutput
from pagedserve.lora_request import LoadedLoRA
from pagedserve.models.loader import load_weights
from pagedserve.models.registry import resolve_model_class
from pagedserve.worker.compile_ahead import watch_late_compiles
from pagedserve.worker.cuda_graph import CudaGraphRunner
from pagedserve.worker.grammar_mask import DeferredSample, GrammarMask, grammar_rows
from pagedserve.worker.input_batch import (BlockTable, CachedRequestState, StepInputs, build_step_inputs,
                                           feed_inflight_tokens)
from pagedserve.worker.kv_pool import kv_zeros
from pagedserve.worker.lora_manager import LoraManager
from pagedserve.worker.pending_output import PendingRunnerOutput, PendingWindow, to_host
from pagedserve.worker.output_history import OutputHistory
from pagedserve.worker.prompt_logprobs import compute_prompt_logprobs
from pagedserve.worker.sampling_inputs import sample

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: ModelConfig, cache: CacheConfig, scheduler: SchedulerConfig,
                 device_config: DeviceConfig, weights: WeightSource, device: torch.device) -> None:
        self.model_config = model
        self.scheduler_config = scheduler
        self.device_config = device_config
        self.weights = weights
        self.device = device
        self.block_size = cache.block_size
        self.kv_dtype = kv_cache_torch_dtype(cache.cache_dtype, model.dtype)   # the KV cache's elements
        self.states: dict[RequestId, CachedRequestState] = {}
        self.block_table = BlockTable(-(-scheduler.max_model_len // self.block_size))
        self.generators: dict[RequestId, torch.Generator] = {}
        self.sampler = Sampler()
        self.model: nn.Module | None = None
        self.weight_bytes = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_cache: torch.Tensor | None = None   # every layer's K and V (init_kv_cache)
        self.num_host_blocks = 0
        self.host_cache = None   # HostKVCache (init_host_cache)
        self.is_driver = tp_rank() == 0 and is_last_stage()
        self.pipeline = None   # PipelineLinks under pipeline parallelism (set by tp_worker.build_runner)
        # async TP: every rank takes each step's sampled ids from rank 0's broadcast (decode windows need it)
        self.share_sampled = shares_sampled_ids(device_config.async_scheduling, tp_world_size(), pp_world_size())
        self._forked: dict[RequestId, RequestId] = {}   # this step's new siblings -> parent
        self.graph_runner = None
        self.uncaptured_graphs: CudaGraphRunner | None = None   # made by profile_run, captured by finish_setup
        # the last launched step's sampled ids on the device (each state's `sampled_row` in them)
        self._prev_sampled: torch.Tensor | None = None
        self.grammar_mask = GrammarMask(device, scheduler.max_num_seqs)   # structured outputs' bitmasks
        self.history = OutputHistory(device)   # penalised rows' outputs, where they are sampled
        self.lora: LoraManager | None = None   # enable_lora: the adapters in the model's slots

    # ---- set-up -----------------------------------------------------------------------
    def load_model(self) -> None:
        start = time.monotonic()
        cls = resolve_model_class(self.model_config.architecture)
        set_gemv_max_rows(self.device_config.gemv_max_rows)
        torch.manual_seed(self.device_config.seed)
        with torch.device(self.device):
            model = cls(self.model_config)
        load_weights(model, self.weights, self.model_config.dtype)
        sched = self.scheduler_config
        if sched.lora is not None:   # a step's tokens: at most the budget, or a decode graph's bucket
            self.lora = LoraManager(model, sched.lora, max(sched.max_num_batched_tokens, sched.max_num_seqs),
                                    self.device)
        self.model = model.eval()
        # what the weights hold on this rank (the KV cache budget is what is left after them)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        quant = self.model_config.quantization
        logger.info("model loaded in %.1f s: weights %.3f GiB on this rank (%s)", time.monotonic() - start,
                    self.weight_bytes / 2**30, f"quantization {quant.method}" if quant else "not quantized")

    def kv_bytes_per_block(self) -> int:
        layer = self.model.attention_layers()[0]
        element = torch.tensor([], dtype=self.kv_dtype).element_size()
        num_layers = len(self.model.attention_layers())   # this pipeline stage's
        return 2 * num_layers * self.block_size * layer.num_kv_heads * layer.head_dim * element

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate K and V per layer, [num_blocks, block_size, num_kv_heads, head_dim], zeroed
        (masked-out reads must never meet NaN; on the CPU a page is resident once a block on it
        is written: kv_pool.kv_zeros), and bind them to the attention layers. They are
        the planes of one tensor [2 * num_layers, num_blocks, ...] (`kv_cache`), so the host
        tier copies a block of every layer in one op."""
        backend = select_backend(self.device)
        layers = self.model.attention_layers()
        shape = (num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        self.kv_cache = kv_zeros((2 * len(layers), *shape), self.kv_dtype, self.device)
        self.kv_caches = []
        for i, layer in enumerate(layers):
            k, v = self.kv_cache[2 * i], self.kv_cache[2 * i + 1]
            layer.k_cache, layer.v_cache, layer.backend = k, v, backend
            self.kv_caches.append((k, v))

    def init_host_cache(self, num_blocks: int) -> None:
        """The host tier's `num_blocks` blocks (worker/host_kv_cache.py); after init_kv_cache."""
        from pagedserve.worker.host_kv_cache import HostKVCache
        self.num_host_blocks = num_blocks
        self.host_cache = HostKVCache(self.kv_cache, num_blocks) if num_blocks else None
        if self.host_cache is not None and self.device.type == "cuda":
            logger.info("host KV tier: %d blocks, %.1f GiB, copies %s", num_blocks,
                        self.host_cache.host.numel() * self.host_cache.host.element_size() / 2**30,
                        self.host_cache.copy_mode)

    def finish_setup(self) -> None:
        """After the KV cache exists: capture decode and prefill CUDA graphs on GPU (unless
        enforce_eager), and with DeviceConfig.mixed_graphs the mixed steps' pieces; a pipeline
        stage captures its own layers (worker/cuda_graph.py). Then any later Triton compile is
        logged (compile_ahead.watch_late_compiles)."""
        if self.device.type != "cuda":
            return
        if not self.device_config.enforce_eager:
            graphs, self.uncaptured_graphs = self.uncaptured_graphs or self.make_graph_runner(), None
            graphs.capture()
            self.graph_runner = graphs
        self._prepare_fa4()
        if self.host_cache is not None:
            # the host tier pinned now, while idle: the first swaps of a busy engine through staged
            # pageable copies, with registrations stalling its CUDA calls, made ttft1024 after thr512
            # 113-280 ms against 23 (H100; benchmarks/RESULTS.md, issue 22, session 38)
            self.host_cache.start_pinning()
        watch_late_compiles()

    def _prepare_fa4(self) -> None:
        """FlashAttention-4's prefill kernel compiled for the layers' backend (attention/fa4_prefill.py)
        where it is installed and prompts of fa4_prefill.MIN_MODEL_LEN tokens fit."""
        from pagedserve.attention.fa4_prefill import MIN_MODEL_LEN
        layer = self.model.attention_layers()[0]
        if self.scheduler_config.max_model_len >= MIN_MODEL_LEN and hasattr(layer.backend, "prepare_fa4"):
            layer.backend.prepare_fa4(self.model_config.dtype, layer.num_heads, layer.num_kv_heads, layer.head_dim,
                                      self.device)

    def make_graph_runner(self) -> CudaGraphRunner:
        """The graph runner of this model (uncaptured); a stage after the first gets static
        inputs for the hidden states it receives."""
        sched, model = self.scheduler_config, self.model_config
        takes_hidden = self.pipeline is not None and self.pipeline.prev is not None
        # mixed-step pieces: one rank, one stage (their eager attention between replays is untested under TP / PP)
        mixed = self.device_config.mixed_graphs and tp_world_size() == 1 and self.pipeline is None
        return CudaGraphRunner(self.model, sched.max_num_seqs, sched.max_model_len, self.block_size, self.device,
                               sched.max_num_batched_tokens, (model.hidden_size, model.dtype) if takes_hidden else None,
                               mixed, self.cascade)

    @property
    def cascade(self) -> bool:
        """Whether a step's decode rows look for a shared prefix to read once (attention/triton_cascade.py:
        the Triton backend's decode launches, CUDA; off with disable_cascade_attn; benchmarks flip
        TritonBackend.cascade for an A/B in one engine)."""
        return self.device.type == "cuda" and TritonBackend.cascade and self.device_config.cascade_attn

    # ---- LoRA adapters' host copies (between steps) ----------------------------------------
    def add_lora(self, lora: LoadedLoRA) -> None:
        self.lora.add(lora)

    def remove_lora(self, lora_int_id: int) -> None:
        self.lora.remove(lora_int_id)

    # ---- one step ---------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | WindowOutput | PendingRunnerOutput | PendingWindow | None:
        """Run one step, or so.num_steps of them (a decode window: a WindowOutput). `non_block`
        (driver only): return a PendingRunnerOutput (PendingWindow) without waiting for the device."""
        self._update_states(so)
        for slot, lora_request in so.lora_loads:
            self.lora.load(slot, lora_request)
        if self.host_cache is not None and self.host_cache.stream is not None:
            self.host_cache.await_loads()   # the last step's swap-ins land before this forward
        if so.blocks_to_swap_out or so.blocks_to_swap_in:
            self.host_cache.swap(so.blocks_to_swap_out, so.blocks_to_swap_in, so.num_swap_out_behind)
        if so.blocks_to_copy:
            self._copy_blocks(so.blocks_to_copy)
        scheduled = [state for state in map(self.states.get, so.num_scheduled_tokens)
                     if state is not None and state.req_id not in self._forked]
        if not scheduled:
            return ModelRunnerOutput() if self.is_driver else None
        if so.num_steps == 1:
            return self._run_step(so, scheduled, non_block)
        # a decode window: each step is an ordinary async step, its inputs built from the states
        # the last one left (positions one on, its sampled ids fed on the device, each row from
        # its own row of them); nothing waits. A row with all its tokens leaves the window.
        steps, short = [], so.window_row_steps
        for step in range(so.num_steps):
            if short and step:
                scheduled = [state for state in scheduled if short.get(state.req_id, step + 1) > step]
                if not scheduled:   # every row has its tokens (the longest was preempted)
                    break
            steps.append(self._run_step(so, scheduled, True))
        if not self.is_driver:
            return None
        window = PendingWindow(steps)
        if non_block:
            return window
        self._prev_sampled = None   # resolved at once: no placeholder left to feed
        return window.get()

    def _run_step(self, so: SchedulerOutput, scheduled: list[CachedRequestState], non_block: bool
                  ) -> ModelRunnerOutput | PendingRunnerOutput | DeferredSample | None:
        """One forward and its sampling for the `scheduled` states, with so's token counts."""
        num_scheduled = so.num_scheduled_tokens
        graphs = self.graph_runner
        inputs = build_step_inputs(scheduled, [num_scheduled[state.req_id] for state in scheduled],
                                   self.block_size, self.device, self.block_table,
                                   self._stage_decode if graphs is not None else None, self.cascade)
        if not inputs.staged and self._prev_sampled is not None:   # a staged step's graph feeds them itself
            feed_inflight_tokens(inputs, self._prev_sampled)
        if self.lora is not None:
            self.lora.set_step(inputs)
        prompt_logprobs = {}
        wants_prompt_logprobs = any(row.sampling_params.prompt_logprobs is not None for row in inputs.rows)
        if inputs.staged:
            hidden, logits = None, self._replay(graphs.run, inputs)
        elif graphs is not None and not wants_prompt_logprobs and graphs.can_run_prefill(inputs):
            hidden, logits = None, self._replay(graphs.run_prefill, inputs)
        elif graphs is not None and graphs.mixed.can_run(inputs):
            hidden = graphs.mixed.run(inputs)
            logits = self._logits(hidden, inputs.logits_indices)
        elif self.pipeline is not None:
            hidden = self._stage_forward(inputs)
            logits = None if hidden is None else self._logits(hidden, inputs.logits_indices)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
            logits = self._logits(hidden, inputs.logits_indices)
        for row, q_len in zip(inputs.rows, inputs.query_lens):
            row.num_computed_tokens += q_len
        if wants_prompt_logprobs and hidden is not None:
            prompt_logprobs = compute_prompt_logprobs(self.model, inputs, hidden)
        sample_states = [inputs.rows[r] for r in inputs.sample_rows]
        row_of_logits = list(range(len(sample_states)))
        for child_id, parent_id in self._forked.items():   # siblings sample from the parent's row
            parent = self.states[parent_id]
            if parent in sample_states:
                row_of_logits.append(sample_states.index(parent))
                sample_states.append(self.states[child_id])
                self.states[child_id].num_computed_tokens = parent.num_computed_tokens
        if not self.is_driver:
            if self.share_sampled:
                self._receive_sampled(sample_states)
            return None   # otherwise workers learn sampled tokens from the next SchedulerOutput
        output = ModelRunnerOutput(prompt_logprobs=prompt_logprobs)
        if sample_states:
            if len(row_of_logits) != logits.shape[0]:
                logits = logits[torch.tensor(row_of_logits, device=logits.device)]
            if non_block and so.structured_req_ids and so.grammar_bitmask is None:
                return DeferredSample(self._sample, output, logits, sample_states, so.structured_req_ids)
            rows = grammar_rows(sample_states, so.structured_req_ids) if so.grammar_bitmask is not None else []
            greedy = None
            if inputs.staged and not rows and not so.structured_req_ids and len(sample_states) == len(inputs.rows) \
                    and len(row_of_logits) == len(inputs.rows) and all(state.plain_greedy for state in sample_states):
                greedy = graphs.greedy_ids(len(inputs.rows))   # the graph's own argmax, if it ends in one
            pending = self._sample(output, logits, sample_states, rows, so.grammar_bitmask, greedy=greedy)
            if non_block:
                return pending
            self._prev_sampled = None   # resolved at once: no placeholder left to feed
            return pending.get()
        self._prev_sampled = None
        return output

    def _replay(self, run, inputs: StepInputs) -> torch.Tensor | None:
        """A CUDA graph's logits. Under PP a later stage's graph reads the previous stage's
        hidden states from its static inputs (received into them), and an earlier stage's
        static outputs are sent on as copies: the next replay overwrites them, maybe before
        the send has read them. Stages pick graph or eager each on its own: rows travel unpadded."""
        pipe = self.pipeline
        if pipe is None:
            return run(inputs)
        out = run(inputs, pipe.recv_into if pipe.prev is not None else None)
        if pipe.next is None:
            return out
        pipe.send_intermediate(out[0].clone(), out[1].clone())
        return None

    def _stage_forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """This pipeline stage's layers: hidden states in from the previous stage (none on the
        first), out to the next; the last stage returns its final hidden states, others None."""
        pipe = self.pipeline
        intermediate = None
        if pipe.prev is not None:
            intermediate = pipe.recv_intermediate(inputs.input_ids.shape[0], self.model_config.hidden_size,
                                                  self.model_config.dtype)
        out = self.model(inputs.input_ids, inputs.positions, inputs.meta, intermediate)
        if pipe.next is None:
            return out
        pipe.send_intermediate(*out)
        return None

    def _sample(self, output: ModelRunnerOutput, logits: torch.Tensor, states: list[CachedRequestState],
                grammar_rows: list[int], grammar_bitmask: torch.Tensor | None,
                sampled_ids: torch.Tensor | None = None, greedy: torch.Tensor | None = None) -> PendingRunnerOutput:
        """Rank 0: sample the rows (grammar masks first: mask row i on logits row grammar_rows[i]).
        Under async TP the ids go to every rank on the device; zeros if sampling raised, since
        the workers wait for them. `sampled_ids`: a host buffer the ids are copied into.
        `greedy`: the rows' argmax already taken (a decode graph's; every row plain greedy)."""
        try:
            mask = None
            if greedy is not None:   # the graph's static ids: a CPU "host copy" would be the tensor itself (tests)
                sampled = SamplerOutput(greedy if greedy.is_cuda else greedy.clone())
            else:
                if grammar_bitmask is not None:
                    mask = self.grammar_mask.to_device(logits, grammar_rows, grammar_bitmask)
                sampled = sample(self.sampler, logits, states, self.model_config.vocab_size, self.device,
                                 self.model_config.eos_token_ids, mask, self._prev_sampled, self.history)
                self.history.append(states, sampled.token_ids)
        except Exception:
            if self.share_sampled:
                broadcast_from_rank0(torch.zeros(len(states), dtype=torch.int64, device=self.device))
            raise
        if self.share_sampled:
            broadcast_from_rank0(sampled.token_ids)
        if sampled_ids is not None:
            self.grammar_mask.host_registered(sampled_ids)   # the grammar process's segment: page-locked once
        return self._defer(output, states, sampled, sampled_ids)

    @staticmethod
    def _add_placeholders(states: list[CachedRequestState]) -> list[int]:
        """A -1 token at the end of each sampled row (its position returned), sampled_row set."""
        positions = []
        for row, state in enumerate(states):
            pos = state.pending_pos = len(state.token_ids)
            state.token_ids.append(-1)
            state.sampled_row = row
            positions.append(pos)
        return positions

    def _receive_sampled(self, states: list[CachedRequestState]) -> None:
        """A worker under async TP: this step's sampled ids from rank 0, on the device, with the
        placeholders rank 0 keeps (filled later from a SchedulerOutput's last_token_id)."""
        if not states:
            self._prev_sampled = None
            return
        ids = torch.empty(len(states), dtype=torch.int64, device=self.device)
        self._prev_sampled = broadcast_from_rank0(ids)
        self._add_placeholders(states)

    def _defer(self, output: ModelRunnerOutput, states: list[CachedRequestState], sampled,
               sampled_ids: torch.Tensor | None = None) -> PendingRunnerOutput:
        positions = self._add_placeholders(states)   # filled by PendingRunnerOutput.get()
        self._prev_sampled = sampled.token_ids
        token_ids = to_host(sampled.token_ids, sampled_ids)
        logprobs = None
        if sampled.logprobs is not None:
            logprobs = tuple(to_host(t) for t in (sampled.logprob_token_ids, sampled.logprobs,
                                                   sampled.sampled_ranks))
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return PendingRunnerOutput(output, states, positions, token_ids, logprobs, event)

    def _stage_decode(self, rows: list[CachedRequestState], arrays: dict[str, np.ndarray]
                      ) -> dict[str, torch.Tensor] | None:
        """build_step_inputs' decode_stage: an all-decode step that replays a decode graph has
        its inputs copied into the graph's static inputs at once, with the feed: for each row
        whose token is still on the device (its placeholder, the last launched step's sample),
        the row of that step's sampled ids the graph takes it from."""
        graphs = self.graph_runner
        if not graphs.can_stage(len(rows), int(arrays["seq_lens"].max())):
            return None
        if self._prev_sampled is None:
            feed = np.full(len(rows), -1, dtype=np.int32)
        else:
            feed = np.array([state.sampled_row if state.pending_pos == state.num_computed_tokens else -1
                             for state in rows], dtype=np.int32)
            if (feed >= 0).any():
                feed = graphs.take_sampled(self._prev_sampled, feed)
        arrays["feed"] = feed
        return graphs.stage(arrays)

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self._drop_state(rid)
            self.generators.pop(rid, None)
        for rid in so.preempted_req_ids:
            self._drop_state(rid)
        for new in so.new_requests:
            generator = self.generators.get(new.req_id)
            if generator is None and new.sampling_params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(new.sampling_params.seed)
                self.generators[new.req_id] = generator
            state = CachedRequestState(new.req_id, list(new.token_ids), new.num_prompt_tokens,
                                       new.sampling_params, list(new.block_ids), new.num_computed_tokens,
                                       generator)
            state.lora_slot = new.lora_slot
            self._add_state(state)
            if state.counts_outputs and self.is_driver:   # the rank that samples
                self.history.add(state)
        states = self.states
        for cached in so.cached_requests:   # every running row, every step: kept lean
            state = states[cached.req_id]
            if cached.replaced_last_block is not None:
                state.block_ids[-1] = cached.replaced_last_block
                self.block_table.write(state.block_row, len(state.block_ids) - 1, [cached.replaced_last_block])
            if cached.new_block_ids:
                self.block_table.write(state.block_row, len(state.block_ids), cached.new_block_ids)
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.last_token_id is not None:
                state.learn_token(cached.num_tokens - 1, cached.last_token_id)
        self._forked = {}
        for fork in so.forked_requests:
            parent = self.states[fork.parent_req_id]
            generator = None
            if fork.sampling_params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(fork.sampling_params.seed)
                self.generators[fork.req_id] = generator
            child = CachedRequestState(fork.req_id, list(parent.token_ids), parent.num_prompt_tokens,
                                       fork.sampling_params, list(parent.block_ids), parent.num_computed_tokens,
                                       generator)
            child.lora_slot = parent.lora_slot
            self._add_state(child)
            if child.counts_outputs and self.is_driver:
                self.history.fork(child, parent)
            self._forked[fork.req_id] = fork.parent_req_id

    def _add_state(self, state: CachedRequestState) -> None:
        self._drop_state(state.req_id)
        state.block_row = self.block_table.add(state.block_ids)
        self.states[state.req_id] = state

    def _drop_state(self, req_id: RequestId) -> None:
        state = self.states.pop(req_id, None)
        if state is not None:
            self.block_table.remove(state.block_row)
            self.history.remove(state)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def _logits(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """compute_logits(hidden[indices]) for a step outside the decode graphs. With decode
        graphs, a row count in cuBLAS's range (past the gemv's) is padded to the decode bucket
        at or above it (row 0 repeated, its logits dropped): the LM head's matmul then has an M
        that capture already ran. cuBLAS spends 5-9 ms of host time on its first matmul of a new
        M, and mixed / eager steps sample every count of rows: before this, ~5 ms before each
        prefill step of a first llama-1b engine's thr512 on the H200 (benchmarks/RESULTS.md,
        session 18), and a fresh server paid it for each new count of rows."""
        rows = indices.shape[0]
        padded = rows if self.graph_runner is None else self.graph_runner.logits_rows(rows)
        if padded == rows:
            return self.model.compute_logits(hidden[indices])
        logits = self.model.compute_logits(hidden[torch.nn.functional.pad(indices, (0, padded - rows))])
        return None if logits is None else logits[:rows]
