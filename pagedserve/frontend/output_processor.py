"""The one per-step loop over engine outputs: detokenize, match stop strings, gather
logprobs, and assemble RequestOutputs (in index order for n > 1; best_of > n reports
nothing until every candidate is done, then the n best by cumulative logprob, best first).

Output kinds: FINAL_ONLY (offline generate), DELTA (streaming: only what is new),
CUMULATIVE (everything so far, every step).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.outputs import EngineCoreOutput
from pagedserve.engine_io import RequestId, TokenLogprobs
from pagedserve.frontend.detokenizer import IncrementalDetokenizer
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


_FINAL_ONLY = OutputKind.FINAL_ONLY   # enum attribute lookups are slow on the per-step path


@dataclass
class SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_kind: OutputKind
    sequences: list[SequenceState]
    report_logprobs: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None   # why the engine failed it
    error_param: str | None = None   # the request's parameter that caused that, if one did
    prompt_logprobs_sent: bool = False

    def finished(self) -> bool:
        for seq in self.sequences:
            if seq.finish_reason is None:
                return False
        return True


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.seq_of: dict[RequestId, tuple[RequestState, SequenceState]] = {}

    def add_request(self, request_id: str, child_ids: list[RequestId], prompt: str | None,
                    prompt_token_ids: list[int], params: SamplingParams, output_kind: OutputKind,
                    report_logprobs: bool | None = None) -> RequestState:
        sequences = []
        for index, child_id in enumerate(child_ids):
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                               params.spaces_between_special_tokens, params.stop,
                                               params.include_stop_str_in_output)
            seq = SequenceState(index, detok, logprobs=[] if params.logprobs is not None else None)
            sequences.append(seq)
        report = params.logprobs is not None if report_logprobs is None else report_logprobs
        state = RequestState(request_id, prompt, prompt_token_ids, params, output_kind, sequences, report,
                             prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.states[request_id] = state
        for child_id, seq in zip(child_ids, sequences):
            self.seq_of[child_id] = (state, seq)
        return state

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[RequestId]]:
        """Returns the RequestOutputs to deliver and the engine ids to stop (stop strings)."""
        touched: dict[str, RequestState] = {}
        to_stop: list[RequestId] = []
        for out in outputs:
            entry = self.seq_of.get(out.req_id)
            if entry is None:
                continue
            state, seq = entry
            touched[state.request_id] = state
            if out.error:
                state.error, state.error_param = out.error, out.error_param
            if out.new_prompt_logprobs and state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(self._logprob_dicts(e) for e in out.new_prompt_logprobs)
            state.num_cached_tokens = out.num_cached_tokens
            if self._apply(seq, out):
                to_stop.append(out.req_id)
            if seq.finish_reason is not None:
                del self.seq_of[out.req_id]
        results = []
        for state in touched.values():
            finished = state.finished()
            if finished or state.output_kind is not _FINAL_ONLY:
                result = self._make_output(state)
                if result is not None:
                    results.append(result)
            if finished:
                self.states.pop(state.request_id, None)
        return results, to_stop

    def _apply(self, seq: SequenceState, out: EngineCoreOutput) -> bool:
        """Append one engine output to a sequence; True if a stop string ended it."""
        stopped_by_string = False
        if out.new_token_ids:
            seq.token_ids.extend(out.new_token_ids)
            if out.new_logprobs is not None:
                seq.cumulative_logprob += out.new_logprobs[1][0]   # the chosen token's logprob
                if seq.logprobs is not None:
                    seq.logprobs.append(self._logprob_dicts(out.new_logprobs))
            if seq.detokenizer is not None:
                stop_terminated = out.finish_reason == "stop" and out.stop_reason is None \
                    or isinstance(out.stop_reason, int)
                stop_str = seq.detokenizer.update(out.new_token_ids, stop_terminated)
                if stop_str is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop_str
                    stopped_by_string = out.finish_reason is None
        if out.finish_reason is not None and seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return stopped_by_string

    def _logprob_dicts(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        ids, lps, rank = entry
        result = {ids[0]: Logprob(lps[0], rank, self._decode(ids[0]))}
        for position, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            if tid not in result:
                result[tid] = Logprob(lp, position, self._decode(tid))
        return result

    def _decode(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """The caller aborted the whole request: finish every open sequence with 'abort'."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        for rid in [rid for rid, (s, _) in self.seq_of.items() if s is state]:
            del self.seq_of[rid]
        return self._make_output(state)

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        finished = state.finished()
        kind = state.output_kind
        if kind == OutputKind.FINAL_ONLY and not finished:
            return None
        sequences = state.sequences
        if len(sequences) > state.params.n:
            # best_of (vLLM's): nothing until all are done, then the n best by cumulative
            # logprob, best first, numbered 0..n-1 in that order
            if not finished:
                return None
            sequences = sorted(sequences, key=lambda s: s.cumulative_logprob, reverse=True)[:state.params.n]
            indices = list(range(len(sequences)))
        else:
            indices = [seq.index for seq in sequences]
        completions = [self._completion(state, seq, kind == OutputKind.DELTA, finished, index)
                       for index, seq in zip(indices, sequences)]
        if kind == OutputKind.DELTA:
            completions = [c for c in completions if c.token_ids or c.text or c.finish_reason]
        prompt_logprobs = state.prompt_logprobs
        if kind == OutputKind.DELTA and state.prompt_logprobs_sent:
            prompt_logprobs = None
        state.prompt_logprobs_sent = prompt_logprobs is not None or state.prompt_logprobs_sent
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, finished,
                             prompt_logprobs, state.num_cached_tokens, error=state.error,
                             error_param=state.error_param)

    def _completion(self, state: RequestState, seq: SequenceState, delta: bool, finished: bool,
                    index: int) -> CompletionOutput:
        seq_finished = seq.finish_reason is not None
        if seq.detokenizer is not None:
            text = seq.detokenizer.get_next_output_text(seq_finished, delta)
        else:
            text = ""
        token_ids = seq.token_ids[seq.num_sent_tokens:] if delta else list(seq.token_ids)
        logprobs = None
        if state.report_logprobs and seq.logprobs is not None:
            logprobs = seq.logprobs[seq.num_sent_logprobs:] if delta else list(seq.logprobs)
        if delta:
            seq.num_sent_tokens = len(seq.token_ids)
            seq.num_sent_logprobs = len(seq.logprobs or [])
        cumulative = seq.cumulative_logprob if state.report_logprobs else None
        return CompletionOutput(index, text, token_ids, cumulative, logprobs, seq.finish_reason, seq.stop_reason)
