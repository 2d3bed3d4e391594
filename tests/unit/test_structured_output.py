"""Structured outputs, the engine mechanics, on a tiny random llama that uses the default
model's tokenizer (so xgrammar sees a real byte-level vocabulary): the bitmask op, grammar
compliance of sampled outputs, isolation from unconstrained requests in the same batch
(async and lockstep), parallel samples, bad grammars, and unsatisfiable grammars."""
from __future__ import annotations

import os
import re

import pytest
import torch

from pagedserve import LLM, SamplingParams, StructuredOutputsParams, ValidationError
from pagedserve.layers.sampler import apply_token_bitmask, greedy_ids, token_bitmask_to_device
from tests.helpers import random_prompts

VOCAB = 49152


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from pagedserve.models.default_model import default_model_path
    from tests.helpers import TINY_COMMON
    path = str(tmp_path_factory.mktemp("tiny_tok"))
    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_COMMON, "vocab_size": VOCAB, "eos_token_id": tokenizer.eos_token_id},
                         rope_theta=10000.0, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["async", "lockstep"])
def llm(request, checkpoint) -> LLM:
    return LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=256, block_size=16,
               num_kv_blocks=256, async_scheduling=request.param)


def _gen(llm: LLM, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("staging", [False, True], ids=["indices", "full-height staging"])
def test_bitmask_masks_only_the_constrained_rows(staging):
    import xgrammar
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=g)
    original = logits.clone()
    bitmask = torch.zeros(2, 4, dtype=torch.int32)   # 128 bits, 100 used
    bitmask[0, 0] = 0b1011           # row 0 of the mask allows tokens 0, 1, 3
    bitmask[1, 3] = 1 << 2           # row 1 allows token 98
    buffer = torch.zeros(6, 4, dtype=torch.int32) if staging else None   # stale content: must not leak
    mask = token_bitmask_to_device(logits, bitmask, rows=[3, 1], staging=buffer)   # mask row 0 -> logits row 3, 1 -> 1
    assert mask.shape == (4, 4) and (mask[0] == -1).all() and (mask[2] == -1).all()
    assert greedy_ids(logits.clone(), mask)[[1, 3]].tolist() == [98, [0, 1, 3][
        int(original[3, [0, 1, 3]].argmax())]]
    apply_token_bitmask(logits, mask)
    allowed = [torch.isfinite(logits[r]).nonzero().flatten().tolist() for r in range(4)]
    assert allowed[3] == [0, 1, 3] and allowed[1] == [98]
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    assert torch.equal(logits[3, [0, 1, 3]], original[3, [0, 1, 3]])
    assert torch.equal(greedy_ids(original.clone(), mask), logits.argmax(dim=-1))
    assert xgrammar.bitmask_dtype == torch.int32


def test_json_strings_refuse_raw_control_characters(checkpoint):
    """JSON forbids unescaped U+0000-U+001F in strings; xgrammar's rule for strings with a
    maxLength lets them through (random weights on an H200 produced them: 63 of 64 outputs
    failed json.loads). The engine's JSON-schema grammar refuses them in bounded and unbounded
    strings alike and still takes escapes where xgrammar allows them."""
    from transformers import AutoTokenizer

    from pagedserve.frontend.structured_output import GrammarCompiler
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    compiler = GrammarCompiler(tokenizer, VOCAB, (tokenizer.eos_token_id,))
    schema = {"type": "object", "properties": {"short": {"type": "string", "maxLength": 8},
                                               "long": {"type": "string"}}, "required": ["short", "long"]}
    grammar = compiler.compile(StructuredOutputsParams(json=schema))

    def accepts(text: str) -> bool:
        import xgrammar
        matcher = xgrammar.GrammarMatcher(grammar, terminate_without_stop_token=True)
        return matcher.accept_string(text) and matcher.is_completed()

    assert accepts('{"short": "ab c", "long": "x\\ty\\u0041"}')
    for bad in ('{"short": "a\x12b", "long": ""}', '{"short": "a\tb", "long": ""}',
                '{"short": "ab", "long": "x\x1cy"}'):
        assert not accepts(bad), repr(bad)


def test_choice_outputs_are_choices_with_parallel_samples(llm):
    choices = ["yes", "no", "maybe not", 'a "quoted" one']
    params = SamplingParams(n=2, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    outs = _gen(llm, ["Answer:", "Is it?", "Well"], params)
    for out in outs:
        assert len(out.outputs) == 2
        for completion in out.outputs:
            assert completion.text in choices
            # ignore_eos: the matcher's termination still ends it, as a stop
            assert completion.finish_reason == "stop"


def test_regex_and_grammar_outputs_match(llm):
    regex = r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    outs = _gen(llm, ["Email:", "Sum:"], [
        SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured_outputs=StructuredOutputsParams(regex=regex)),
        SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=StructuredOutputsParams(grammar=grammar))])
    assert re.fullmatch(regex, outs[0].outputs[0].text), outs[0].outputs[0].text
    grammar_out = outs[1].outputs[0]
    if grammar_out.finish_reason == "stop":
        assert re.fullmatch(r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)", grammar_out.text), grammar_out.text
    else:   # the random model may keep adding terms: a prefix of the language
        assert re.fullmatch(r"\((?:[1-9][0-9]?\+?)*", grammar_out.text), grammar_out.text


def test_constrained_request_leaves_the_others_unchanged(llm):
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, VOCAB, 3, 30, seed=5)]
    plain = [SamplingParams(max_tokens=6 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(4)]
    alone = [o.outputs[0].token_ids for o in _gen(llm, prompts, plain)]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constrained = SamplingParams(max_tokens=30, temperature=0.0,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    mixed = _gen(llm, prompts[:2] + ["Give JSON:"] + prompts[2:], plain[:2] + [constrained] + plain[2:])
    assert [o.outputs[0].token_ids for i, o in enumerate(mixed) if i != 2] == alone
    text = mixed[2].outputs[0].text
    assert text.startswith('{"a": '), text


def test_json_object_starts_an_object(llm):
    out = _gen(llm, ["JSON:"], SamplingParams(max_tokens=8, temperature=1.0, seed=0,
                                              structured_outputs=StructuredOutputsParams(json_object=True)))
    assert out[0].outputs[0].text.startswith("{")


def test_unsatisfiable_within_max_tokens_ends_by_length(llm):
    out = _gen(llm, ["a"], SamplingParams(max_tokens=5, temperature=1.0, seed=1,
                                          structured_outputs=StructuredOutputsParams(regex="a{300}")))
    completion = out[0].outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 5
    assert set(completion.text) == {"a"}


@pytest.mark.parametrize("field, value", [
    ("json", {"type": "object", "properties": {"a": {"type": "strin"}}}),
    ("regex", "a(b"),
    ("grammar", "root ::= undefined_rule"),
])
def test_invalid_grammar_is_a_validation_error_naming_the_field(llm, field, value):
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**{field: value}))
    with pytest.raises(ValidationError) as info:
        llm.engine.add_request("bad", "x", params)
    assert info.value.param == field
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("value", ["null", "", "[1]", "3", "\"x\"", [1], 3])
def test_json_must_be_a_schema_object(value):
    """json given as anything but an object (a JSON text of one, or one) names the field: "null"
    once left no constraint at all, and the request's compile, on a pool thread, raised StopIteration
    from `kind`, which hung it (a pool future cannot hand that exception to asyncio)."""
    with pytest.raises(ValidationError) as info:
        StructuredOutputsParams(json=value)
    assert info.value.param == "json"


def test_no_tokenizer_rejects_structured_outputs(checkpoint):
    llm = LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=64, skip_tokenizer_init=True,
              num_kv_blocks=16)
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="a+"))
    with pytest.raises(ValidationError) as info:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    assert info.value.param == "structured_outputs"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async-process"])
def test_preemption_keeps_the_matcher_state(checkpoint, async_scheduling):
    """Recompute after preemption replays tokens the matcher already accepted: the outputs
    equal those of a run with room for everyone (seeded), and still match the grammar (async:
    the grammar process takes only the tokens of requests still running)."""
    regex = r"\[(\d{1,3}, ){3,12}\d{1,3}\]"
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, VOCAB, 20, 40, seed=9)]
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=i,
                             structured_outputs=StructuredOutputsParams(regex=regex)) for i in range(6)]

    def run(num_kv_blocks):
        llm = LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=128, block_size=16,
                  num_kv_blocks=num_kv_blocks, async_scheduling=async_scheduling)
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        return outs, llm.engine.stats().num_preemptions

    roomy, _ = run(256)
    tight, preemptions = run(12)
    assert preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert any(out.finish_reason == "stop" for out in tight)
    for out in tight:
        assert re.fullmatch(regex, out.text) or out.finish_reason == "length", out.text


def test_async_samples_a_constrained_request_every_step(checkpoint):
    """Async scheduling defers the bitmask until the previous token is applied, so the
    constrained request is scheduled in every step (not every other one) and its greedy
    output equals lockstep's, beside an unconstrained request."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yy"]}},
              "required": ["a", "b"]}
    params = [SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)]
    prompts = ["Give JSON:", {"prompt_token_ids": random_prompts(1, VOCAB, 12, 13, seed=3)[0]}]

    def run(async_scheduling):
        llm = LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=128, block_size=16,
                  num_kv_blocks=64, async_scheduling=async_scheduling)
        scheduler, steps = llm.engine.core.scheduler, []
        schedule = scheduler.schedule

        def counting_schedule():
            out = schedule()
            steps.append(list(out.structured_req_ids))
            return out
        scheduler.schedule = counting_schedule
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        return outs, [i for i, ids in enumerate(steps) if ids]

    (lock_json, lock_plain), lock_steps = run(False)
    (async_json, async_plain), async_steps = run(True)
    assert async_json.token_ids == lock_json.token_ids and async_plain.token_ids == lock_plain.token_ids
    assert async_json.text.startswith('{"a": ') and len(async_json.token_ids) < 30
    # in consecutive steps, one per sampled token (async may schedule one more, then drop it)
    for constrained_steps in (lock_steps, async_steps):
        assert constrained_steps == list(range(constrained_steps[0], constrained_steps[-1] + 1))
    assert len(lock_steps) == len(lock_json.token_ids)
    assert len(async_json.token_ids) <= len(async_steps) <= len(async_json.token_ids) + 1


def test_pipeline_stages_fill_the_bitmask_at_schedule_time(checkpoint):
    """Under PP the grammar is not deferred (a micro-batch never holds a request whose token is
    in flight): the constrained greedy output equals a single process's, beside a plain one."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = [SamplingParams(max_tokens=30, temperature=0.0, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]
    prompts = ["Give JSON:", {"prompt_token_ids": random_prompts(1, VOCAB, 12, 13, seed=3)[0]}]

    def run(**kwargs):
        llm = LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=128, block_size=16,
                  num_kv_blocks=64, **kwargs)
        try:
            assert llm.engine.core.scheduler.defer_grammar is False
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()

    assert run(pipeline_parallel_size=2) == run(async_scheduling=False)


class _Row:
    """What core/structured_output reads from a Request: its grammar, matcher and status."""

    def __init__(self, grammar, finished: bool = False) -> None:
        import xgrammar
        self.grammar, self.grammar_matcher, self.finished = grammar, xgrammar.GrammarMatcher(grammar), finished

    def is_finished(self) -> bool:
        return self.finished


def _json_grammar(checkpoint):
    from transformers import AutoTokenizer

    from pagedserve.frontend.structured_output import GrammarCompiler
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}, "tags": {"type": "array", "items": {
                                                   "enum": ["a", "bb"]}, "maxItems": 3}},
              "required": ["name", "n", "tags"]}
    return tokenizer, GrammarCompiler(tokenizer, VOCAB, (tokenizer.eos_token_id,)).compile(
        StructuredOutputsParams(json=schema))


def test_batched_fill_equals_the_row_by_row_one(checkpoint):
    """fill_bitmask (one xgrammar batch call) gives, bit for bit, what each matcher's own
    fill_next_token_bitmask gives, for rows at staggered states; a finished request's row
    (its matcher may have terminated: xgrammar refuses to fill those) is all-allowed."""
    from pagedserve.core import structured_output
    tokenizer, grammar = _json_grammar(checkpoint)
    ids = tokenizer.encode('{"name": "Ada L", "n": -42, "tags": ["bb", "a"]}', add_special_tokens=False)
    rows = [_Row(grammar, finished=i % 7 == 3) for i in range(24)]
    for i, row in enumerate(rows):
        for token in ids[:i % (len(ids) + 1)]:
            assert row.grammar_matcher.accept_token(token)
    rows[-1] = _Row(grammar, finished=True)   # terminated: the whole object, then the stop token
    assert all(rows[-1].grammar_matcher.accept_token(t) for t in ids + [tokenizer.eos_token_id])
    assert rows[-1].grammar_matcher.is_terminated()
    expected = reference_bitmask(rows)
    buffer = structured_output.bitmask_buffer(rows)
    assert buffer.shape[0] >= 64
    buffer.fill_(7)   # stale content of a reused buffer must not leak
    filled = structured_output.fill_bitmask(rows, buffer)
    assert filled.shape == expected.shape and torch.equal(filled, expected)


def reference_bitmask(rows) -> torch.Tensor:
    """xgrammar's own fill, row by row, of rows with `grammar_matcher` and `finished`; a
    finished row is all-allowed."""
    import xgrammar
    mask = xgrammar.allocate_token_bitmask(len(rows), VOCAB)
    for i, row in enumerate(rows):
        if row.finished:
            mask[i].fill_(-1)
        else:
            row.grammar_matcher.fill_next_token_bitmask(mask, i)
    return mask


def test_a_deferred_fill_that_raises_fails_its_request_alone(checkpoint, monkeypatch):
    """Async scheduling, the deferred fill raises: the step is sampled unmasked and dropped,
    the constrained request fails (recomputed alone first), and the plain request beside it
    finishes with the ids it has alone; the engine serves on."""
    from pagedserve.core.grammar_process import GrammarProcess, GrammarProcessError

    def broken(self, timeout=0.0):
        raise GrammarProcessError("fill broke")

    llm = LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=128, block_size=16,
              num_kv_blocks=64, async_scheduling=True)
    prompt = {"prompt_token_ids": random_prompts(1, VOCAB, 12, 13, seed=3)[0]}
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = _gen(llm, [prompt], plain)[0].outputs[0].token_ids
    monkeypatch.setattr(GrammarProcess, "wait", broken)
    constrained = SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    failed, ok = _gen(llm, ["Word:", prompt], [constrained, plain])
    assert failed.error == "GrammarProcessError: fill broke" and failed.outputs[0].finish_reason == "abort"
    assert ok.error is None and ok.outputs[0].token_ids == alone
    monkeypatch.undo()
    assert re.fullmatch("[a-z]+", _gen(llm, ["Word:"], constrained)[0].outputs[0].text)
