"""The synchronous engine shared by the offline LLM and the async server engine:
input processing -> EngineCore -> output processing (+ request metrics). Not thread-safe;
one driver thread. With `engine_process` (the server's --engine-process) the core runs in a
process of its own, driven through frontend/core_client.py's CoreClient."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pagedserve.core.engine_core import EngineCore
from pagedserve.core.outputs import EngineStats
from pagedserve.core.request import Request, RequestStatus
from pagedserve.engine_args import EngineArgs
from pagedserve.engine_io import RequestId
from pagedserve.frontend.core_client import CoreClient
from pagedserve.frontend.core_process import StepSpan
from pagedserve.frontend.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pagedserve.frontend.lora_registry import LoraRegistry
from pagedserve.frontend.output_processor import OutputKind, OutputProcessor
from pagedserve.frontend.request_metrics import FinishListener, FirstTokenListener, RequestMetrics
from pagedserve.frontend.structured_output import GrammarCompiler
from pagedserve.lora_request import LoadedLoRA, LoRARequest
from pagedserve.models.loader import load_tokenizer
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ProcessedRequest:
    """A request tokenized and validated (LLMEngine.process_request), ready to queue."""
    request_id: str
    processed: ProcessedPrompt
    params: SamplingParams        # as the engine runs it (logprobs -1 resolved, best_of's logprobs)
    parent: Request
    forks: list[Request]
    output_kind: OutputKind
    report_logprobs: bool
    arrival_time: float
    lora: LoadedLoRA | None = None   # its LoRA adapter, read (LoraRegistry.get): the ranks get it first


class LLMEngine:
    def __init__(self, args: EngineArgs, engine_process: bool = False, offline: bool = False) -> None:
        """`offline`: for LLM (its defaults may differ from a server's: default_max_num_batched_tokens)."""
        self.args = args
        self.engine_process = engine_process
        self.config, self.hf_config, source = args.create_config(offline)
        # the tokenizer (transformers' import, tokenizer.json: seconds) loads on a thread while
        # the core builds the model and its KV cache, which mostly waits on the device
        with ThreadPoolExecutor(1, thread_name_prefix="tokenizer-load") as pool:
            tokenizer = None if args.skip_tokenizer_init else pool.submit(load_tokenizer, source, args.tokenizer)
            self.core: EngineCore | CoreClient = CoreClient(self.config) if engine_process else EngineCore(self.config)
            try:
                self.tokenizer = tokenizer.result() if tokenizer is not None else None
            except BaseException:
                self.core.shutdown()
                raise
        model = self.config.model
        eos = set(model.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.input_processor = InputProcessor(self.tokenizer, model.vocab_size, self.config.scheduler.max_model_len,
                                              self.eos_token_ids, args.max_logprobs,
                                              self.config.scheduler.max_num_seqs,
                                              self.config.scheduler.policy == "priority")
        self.output_processor = OutputProcessor(self.tokenizer)
        self.grammar_compiler = GrammarCompiler(self.tokenizer, model.vocab_size, self.eos_token_ids)
        self.request_metrics = RequestMetrics()
        self.loras = LoraRegistry(model, self.config.scheduler.lora)   # LoRA adapters, read once (add_lora)
        self.children: dict[str, list[RequestId]] = {}
        self.step_spans: list[tuple[StepSpan, EngineStats]] = []   # the core steps behind the last step()

    @property
    def max_num_seqs(self) -> int:
        return self.config.scheduler.max_num_seqs

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def add_finish_listener(self, listener: FinishListener) -> None:
        """Called (on the driver thread) with each finished, aborted or failed request's stats."""
        self.request_metrics.listeners.append(listener)

    def add_first_token_listener(self, listener: FirstTokenListener) -> None:
        """Called (on the driver thread) with each request's time to first token as it arrives."""
        self.request_metrics.first_token_listeners.append(listener)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    output_kind: OutputKind = OutputKind.FINAL_ONLY, strict_length: bool = False,
                    add_special_tokens: bool = True, priority: int = 0, lora_request: LoRARequest | None = None
                    ) -> None:
        """Validate and queue; raises ValidationError (nothing is queued then)."""
        self.add_processed(self.process_request(request_id, prompt, params, output_kind, strict_length,
                                                add_special_tokens, priority, lora_request))

    def process_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        output_kind: OutputKind = OutputKind.FINAL_ONLY, strict_length: bool = False,
                        add_special_tokens: bool = True, priority: int = 0,
                        lora_request: LoRARequest | None = None, grammar: Any = None) -> ProcessedRequest:
        """Tokenize and validate, touching no engine state: safe on any thread, concurrently
        (the AsyncEngine runs it in a worker pool). Raises ValidationError. `priority`: under
        scheduling policy "priority", lower runs first (else it must be 0, as in vLLM).
        `lora_request`: the LoRA adapter to run with (an engine with enable_lora). `grammar`:
        params.structured_outputs already compiled (the AsyncEngine compiles apart); else it
        is compiled here."""
        arrival_time = time.monotonic()
        lora = self.loras.get(lora_request)   # a new adapter is read here, off the engine thread
        processed = self.input_processor.process_prompt(prompt, add_special_tokens)
        report_logprobs = params.logprobs is not None
        params = self._internal_params(params)
        parent, forks = self.input_processor.make_requests(request_id, processed, params, strict_length, priority)
        for request in (parent, *forks):
            request.lora_request = lora_request
        if output_kind == OutputKind.FINAL_ONLY and not params.stop and params.logprobs is None \
                and params.prompt_logprobs is None:   # nothing to see before the end: one output, at the end
            for request in (parent, *forks):
                request.report_final_only = True
        if params.structured_outputs is not None:   # off the engine thread (cached)
            if grammar is None:
                grammar = self.grammar_compiler.compile(params.structured_outputs)
            for request in (parent, *forks):
                request.grammar = grammar
        return ProcessedRequest(request_id, processed, parent.sampling_params, parent, forks, output_kind,
                                report_logprobs, arrival_time, lora)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Register a LoRA adapter (vLLM's add_lora: the server's load route, --lora-modules):
        read whole and checked against the model now, on the caller's thread (any: it touches no
        engine state), and kept on the host (frontend/lora_registry.py); requests naming it never
        wait for its files. Raises ValidationError naming lora_request (and the adapter)."""
        self.loras.get(lora_request)

    def add_processed(self, request: ProcessedRequest) -> None:
        """Queue a processed request (driver thread only); raises ValidationError if it can
        never fit the KV cache, ValueError if its id is in use (nothing is queued then)."""
        request_id, processed = request.request_id, request.processed
        if request_id in self.children:
            raise ValueError(f"request id {request_id!r} is already in use")
        if request.lora is not None:   # every rank's host cache holds the adapter before its request
            self.loras.install(request.lora, self.core)
        self.core.add_request(request.parent, request.forks)
        if request.lora is not None:
            self.loras.hold(request_id, request.lora.lora_int_id)
        ids = [request.parent.request_id] + [f.request_id for f in request.forks]
        self.children[request_id] = ids
        self.output_processor.add_request(request_id, ids, processed.prompt, processed.prompt_token_ids,
                                          request.params, request.output_kind, request.report_logprobs)
        self.request_metrics.add(request_id, ids, len(processed.prompt_token_ids),
                                 request.output_kind == OutputKind.DELTA, request.arrival_time,
                                 request.parent.report_final_only)

    def is_alive(self) -> bool:
        """Whether the executor (every TP rank) is alive; cheap, safe from any thread."""
        return self.core.is_alive()

    @staticmethod
    def _internal_params(params: SamplingParams) -> SamplingParams:
        """best_of > n ranks sequences by cumulative logprob, so their logprobs are needed."""
        if params.best_of is not None and params.best_of > params.n and params.logprobs is None:
            params = params.clone()
            params.logprobs = 0
        return params

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request; its last output (finish_reason "abort"), or None if it is unknown
        or already finished."""
        ids = self.children.pop(request_id, [])
        if self.loras.has_held:
            self.loras.release(request_id, self.core)
        # the core's answer: FINISHED events with the token counts a final-only request's output
        # lacks (a core process's come later, as a step's events)
        answer = self.core.abort_requests(ids)
        output = self.output_processor.abort_request(request_id)
        if output is not None:
            self.request_metrics.observe(output, await_counts=True)
        self.request_metrics.record(answer)
        return output

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.output_processor.has_unfinished()

    def has_work(self) -> bool:
        """Whether a step would do anything (the core's view; an idle driver need not step)."""
        return self.core.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def request_snapshot(self) -> None:
        """The next stats (a step's or stats()) carry an EngineSnapshot (core/snapshot.py);
        steps are logged for it until stop_snapshots()."""
        self.core.request_snapshot()

    def stop_snapshots(self) -> None:
        self.core.stop_snapshots()

    def step(self) -> list[RequestOutput]:
        return self.step_with_stats()[0]

    def step_with_stats(self) -> tuple[list[RequestOutput], EngineStats]:
        """One step: the RequestOutputs to deliver and the core's stats after it."""
        begin = time.perf_counter()
        core_outputs = self.core.step()
        self.step_spans = self.core.step_spans if self.engine_process else \
            [(StepSpan(begin, time.perf_counter(), 0.0), core_outputs.stats)]
        if core_outputs.events:
            self.request_metrics.record(core_outputs.events)
        results, stopped = self.output_processor.process_outputs(core_outputs.outputs)
        if stopped:
            self.core.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for result in results:
            self.request_metrics.observe(result)
            if result.finished:
                self.children.pop(result.request_id, None)
                if self.loras.has_held:
                    self.loras.release(result.request_id, self.core)
        return results, core_outputs.stats

    def shutdown(self) -> None:
        self.grammar_compiler.close()
        self.core.shutdown()
