"""The grammar process (core/grammar_process.py, used under async scheduling): its masks and
outputs equal the in-engine ones, a token the grammar refuses ends the request with a clear
error one step late, a dead process fails only the requests whose matchers it held and is
restarted, and the process never outlives the engine (shutdown, or the parent killed)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from tests.helpers import random_prompts
from tests.unit.test_structured_output import VOCAB, checkpoint, reference_bitmask  # noqa: F401  (the fixture)


def _llm(path: str, async_scheduling: bool = True) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", max_model_len=128, block_size=16,
               num_kv_blocks=64, async_scheduling=async_scheduling)


def _grammars(llm: LLM):
    return llm.engine.core.scheduler.grammars


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_process_and_inline_give_the_same_ids(checkpoint):  # noqa: F811
    """The same requests (a JSON schema at temperature 1, a regex, a plain one) through the
    grammar process and through in-engine matchers, both async: the same ids."""
    from pagedserve.core.structured_output import InlineGrammars, ProcessGrammars
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yy"]},
                                               "c": {"type": "array", "items": {"type": "string"}}},
              "required": ["a", "b", "c"]}
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                             structured_outputs=StructuredOutputsParams(json=schema)) for i in range(4)]
    params += [SamplingParams(max_tokens=20, temperature=0.0, structured_outputs=StructuredOutputsParams(regex="[a-z]{2,9}")),
               SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]
    prompts = ["Give JSON:"] * 4 + ["Word:", {"prompt_token_ids": random_prompts(1, VOCAB, 12, 13, seed=3)[0]}]
    llm = _llm(checkpoint)
    assert isinstance(_grammars(llm), ProcessGrammars)
    by_process = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert _grammars(llm).process.alive
    llm.engine.core.scheduler.grammars = InlineGrammars()
    inline = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert by_process == inline


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["process", "inline-lockstep"])
def test_a_refused_token_fails_its_request_with_a_clear_error(checkpoint, monkeypatch, async_scheduling):  # noqa: F811
    """With the masking switched off, the random model samples a token the regex refuses: the
    request ends "abort" with an error naming the token (in the process: learned one step
    late, the step's token dropped, so the same output as in-engine), the plain request beside
    it is untouched, nothing hangs."""
    from pagedserve.worker.grammar_mask import GrammarMask
    llm = _llm(checkpoint, async_scheduling)
    prompt = {"prompt_token_ids": random_prompts(1, VOCAB, 12, 13, seed=3)[0]}
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    monkeypatch.setattr(GrammarMask, "to_device", lambda self, *args: None)
    constrained = SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=StructuredOutputsParams(regex="z{5}"))
    failed, ok = llm.generate([prompt, prompt], [constrained, plain], use_tqdm=False)
    assert failed.outputs[0].finish_reason == "abort"
    token = failed.outputs[0].token_ids[0]
    assert failed.error == f"sampled token {token} does not match the request's structured_outputs grammar"
    assert failed.error_param is None   # the engine's failure (its mask was lost), not the request's
    assert failed.outputs[0].token_ids == [alone[0]]   # the refused token, nothing after it
    assert ok.error is None and ok.outputs[0].token_ids == alone


def test_a_dead_process_fails_its_requests_and_is_replaced(checkpoint):  # noqa: F811
    """The grammar process is killed while a constrained request runs: that request ends
    "abort" with an error, the plain one finishes as alone, and the next constrained request
    gets a new process and a valid output."""
    llm = _llm(checkpoint)
    engine = llm.engine
    regex = "[a-z]{40}"
    constrained = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=StructuredOutputsParams(regex=regex))
    prompt = {"prompt_token_ids": random_prompts(1, VOCAB, 12, 13, seed=3)[0]}
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    alone = llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("c", "Word:", constrained)
    engine.add_request("p", prompt, plain)
    finished = {}
    for _ in range(5):
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    first = _grammars(llm).process
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=10)
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {"c", "p"}
    assert finished["c"].outputs[0].finish_reason == "abort" and "grammar process" in finished["c"].error
    assert finished["p"].error is None and finished["p"].outputs[0].token_ids == alone
    again = llm.generate(["Word:"], constrained, use_tqdm=False)[0]
    assert _grammars(llm).process is not first and again.error is None
    assert re.fullmatch(regex, again.outputs[0].text)


def test_shutdown_stops_the_process_and_frees_its_memory(checkpoint):  # noqa: F811
    llm = _llm(checkpoint)
    constrained = SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    llm.generate(["Word:"], constrained, use_tqdm=False)
    process = _grammars(llm).process
    pid, name = process.popen.pid, process.shm.name
    assert not _gone(pid, 0.1)
    llm.shutdown()
    assert process.popen.poll() is not None and _gone(pid, 5)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_the_process_exits_when_its_parent_is_killed(checkpoint):  # noqa: F811
    """No orphan: a parent killed outright (no clean-up at all) leaves no grammar process."""
    script = textwrap.dedent(f"""
        import sys, time
        from transformers import AutoTokenizer
        import xgrammar
        from pagedserve.core.grammar_process import GrammarProcess
        tokenizer = AutoTokenizer.from_pretrained({checkpoint!r})
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size={VOCAB})
        process = GrammarProcess(info, 4, xgrammar.get_bitmask_shape(1, {VOCAB})[1])
        process.post([], [], [])
        process.wait()
        print(process.popen.pid, process.shm.name, flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid, _ = parent.stdout.readline().split()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _gone(int(pid), 10)
    finally:
        parent.kill()


def test_the_frontend_hands_out_one_object_per_constraint(checkpoint):  # noqa: F811
    """The core sends a grammar to its process once per CompiledGrammar object."""
    from transformers import AutoTokenizer

    from pagedserve.frontend.structured_output import GrammarCompiler
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    compiler = GrammarCompiler(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    a = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    b = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    c = compiler.compile(StructuredOutputsParams(regex="[a-z]+"))
    assert a is b and c is not a


def test_more_slots_than_rows_and_tokens_that_land_after_the_post(checkpoint, monkeypatch):  # noqa: F811
    """ProcessGrammars with room for 2 rows a step: 5 live sequences (slots 0-4, as when
    preempted ones keep theirs). Each step posts its rows' ids rows before the ids land (as
    the device's copy does) and in another order than the rows; each mask equals the mask of
    an in-engine matcher fed the same tokens, a finished row is all-allowed, a post waits
    for its token to land, a refused token is reported with its id."""
    import torch
    import xgrammar
    from transformers import AutoTokenizer

    from pagedserve.core.grammar_process import DONE
    from pagedserve.core.request import RequestStatus
    from pagedserve.core.structured_output import ProcessGrammars
    from pagedserve.frontend.structured_output import GrammarCompiler
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    grammar = GrammarCompiler(tokenizer, VOCAB, (tokenizer.eos_token_id,)).compile(
        StructuredOutputsParams(regex="(ab|cd)+"))

    class Row:   # what ProcessGrammars reads from a Request
        def __init__(self, i: int) -> None:
            self.request_id, self.grammar, self.finished = str(i), grammar, False
            self.status = RequestStatus.RUNNING
            self.grammar_matcher = xgrammar.GrammarMatcher(grammar)   # the in-engine reference

        def is_finished(self) -> bool:
            return self.finished

    def fill(rows):
        return grammars.start_fill(rows, [row.request_id for row in rows])

    def step(pair, tokens, fill=(), late=0.0):
        """Post the pair's tokens (ids rows reversed) and a fill; the tokens land `late` s after."""
        ids = grammars.sampled_ids()
        assert (ids == -1).all()
        pending = grammars.start_fill(list(fill), [row.request_id for row in fill], [row.request_id for row in pair],
                                      [len(pair) - 1 - j for j in range(len(pair))], {r.request_id: r for r in rows})
        time.sleep(late)
        for j, token in enumerate(tokens):
            ids[len(pair) - 1 - j] = token
        for row, token in zip(pair, tokens):
            row.grammar_matcher.accept_token(token)
        return pending

    grammars = ProcessGrammars(max_rows=2)
    rows = [Row(i) for i in range(5)]
    try:
        for pair in (rows[0:2], rows[2:4], rows[4:5]):   # opens slots 0..4, two rows a step at most
            assert torch.equal(fill(pair).result(), reference_bitmask(pair))
        for token in tokenizer.encode("ab", add_special_tokens=False):
            for pair in (rows[0:2], rows[2:4], rows[4:5]):
                assert grammars.accept(pair[0], token) == (True, False)
                pending = step(pair, [token] * len(pair), pair, late=0.05)
                assert torch.equal(pending.result(), reference_bitmask(pair)) and pending.failed == []
        pair, previous = rows[0:2], [rows[0].request_id, rows[1].request_id]
        grammars.start_fill(pair, previous).result()
        looked_up = []
        monkeypatch.setattr(grammars, "_fills", lambda *args: looked_up.append(args) or [])
        for token in tokenizer.encode("cdab", add_special_tokens=False):   # a steady decode: the last
            ids = grammars.sampled_ids()                                 # post's slots serve again
            current = list(previous)
            pending = grammars.start_fill(pair, current, previous, [1, 0], {})
            ids[0], ids[1] = token, token
            for row in pair:
                assert row.grammar_matcher.accept_token(token)
            assert torch.equal(pending.result(), reference_bitmask(pair)) and pending.failed == []
            previous = current
        assert looked_up == []
        monkeypatch.undo()
        rows[1].finished = True
        pending = fill([rows[4], rows[1]])
        assert torch.equal(pending.result(), reference_bitmask([rows[4], rows[1]])) and pending.failed == []
        assert grammars.accept(rows[4], tokenizer.eos_token_id) == (True, True)   # a stop token ends it at once
        c = tokenizer.encode("c", add_special_tokens=False)[0]
        ids = grammars.sampled_ids()
        pending = grammars.start_fill([rows[2]], [rows[2].request_id], [rows[2].request_id], [0],
                                      {r.request_id: r for r in rows})
        time.sleep(0.1)
        assert grammars.process.layout.header[DONE] != grammars.process._posted   # waits for the landing
        ids[0] = c
        rows[2].grammar_matcher.accept_token(c)
        assert torch.equal(pending.result(), reference_bitmask([rows[2]]))
        refused = tokenizer.encode("z", add_special_tokens=False)[0]
        pending = step([rows[0], rows[3]], [tokenizer.encode("c", add_special_tokens=False)[0], refused], [rows[3]])
        assert torch.equal(pending.result(), reference_bitmask([rows[3]]))
        assert pending.failed == [(rows[3], f"sampled token {refused} does not match the request's "
                                            "structured_outputs grammar", None)]   # it allowed others: not its own
    finally:
        grammars.shutdown()


def test_a_step_failed_after_its_tokens_were_posted_is_taken_back(checkpoint, monkeypatch):  # noqa: F811
    """The grammar process takes a step's tokens as soon as it is sampled; if that step then
    fails (here: fetching its tokens raises once, mid-generation), its requests are
    recomputed and the process rolls their matchers back by that token: the constrained
    request and the plain one beside it end as in a run without the failure."""
    from pagedserve.worker.pending_output import PendingRunnerOutput
    llm = _llm(checkpoint)
    regex = "[a-z]{6,30}"
    params = [SamplingParams(max_tokens=30, temperature=0.0, structured_outputs=StructuredOutputsParams(regex=regex)),
              SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]
    prompts = ["Word:", {"prompt_token_ids": random_prompts(1, VOCAB, 12, 13, seed=3)[0]}]
    clean = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    get, calls = PendingRunnerOutput.get, []

    def failing_once(self):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("the step's tokens were lost")
        return get(self)
    monkeypatch.setattr(PendingRunnerOutput, "get", failing_once)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(calls) > 6 and all(o.error is None for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == clean
    assert re.fullmatch(regex, outs[0].outputs[0].text)


def test_plain_requests_pay_for_no_grammar_work(checkpoint, monkeypatch):  # noqa: F811
    """Requests without constraints (async, the grammar process's path) start no grammar
    process, defer no sampling, carry no bitmask and reach none of the grammars' per-token
    calls; their ids equal lockstep's."""
    from pagedserve.core.structured_output import ProcessGrammars
    from pagedserve.worker import grammar_mask
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, VOCAB, 5, 20, seed=7)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    lockstep = [o.outputs[0].token_ids for o in _llm(checkpoint, async_scheduling=False).generate(
        prompts, params, use_tqdm=False)]
    llm = _llm(checkpoint)
    grammars, scheduler = _grammars(llm), llm.engine.core.scheduler
    assert isinstance(grammars, ProcessGrammars)
    calls = []
    for name in ("accept", "start_fill", "sampled_ids", "prepare"):
        monkeypatch.setattr(grammars, name, lambda *args, _name=name: calls.append(_name))
    monkeypatch.setattr(grammar_mask.DeferredSample, "__init__", lambda *args: calls.append("deferred"))
    schedule, masks = scheduler.schedule, []

    def recording_schedule():
        out = schedule()
        masks.append((out.structured_req_ids, out.grammar_bitmask))
        return out
    monkeypatch.setattr(scheduler, "schedule", recording_schedule)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == lockstep
    assert calls == [] and grammars.process is None
    assert len(masks) >= 12 and all(not ids and bitmask is None for ids, bitmask in masks)
