"""Benchmark datasets: the seeded random sets, the peers.py preset draw for draw, text
prompts from a tokenizer, and the ShareGPT loader on a small file the test writes.

The tokenizer is a whitespace word-level one built here, so every word is one token and
the expected token counts are the word counts."""
from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from pagedserve.bench.datasets import (first_exchange, load_requests, ordinary_token_ids, peers_requests,
                                       prefix_repetition_requests,
                                       random_requests, random_text_requests, sharegpt_requests)
from pagedserve.errors import ValidationError

PEERS_PY = "/work/shared/bench/peers.py"

SHAREGPT = [
    {"id": "plain", "conversations": [{"from": "human", "value": "a b c d e"}, {"from": "gpt", "value": "f g h i"}]},
    {"id": "system-first", "conversations": [{"from": "system", "value": "be brief"},
                                             {"from": "human", "value": "p q r s"},
                                             {"from": "gpt", "value": "t u v w x y"}]},
    {"id": "no-answer", "conversations": [{"from": "human", "value": "a b c d e f"}]},
    {"id": "short-prompt", "conversations": [{"from": "human", "value": "a b"}, {"from": "gpt", "value": "c d e f"}]},
    {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "ignored opening words"},
                                          {"from": "human", "value": "h1 h2 h3 h4"},
                                          {"from": "gpt", "value": "g1 g2 g3 g4 g5"}]},
    {"id": "two-humans", "conversations": [{"from": "human", "value": "a1 a2 a3 a4"},
                                           {"from": "human", "value": "b1 b2"},
                                           {"from": "gpt", "value": "c1 c2 c3 c4 c5 c6 c7"}]},
    {"id": "role-content", "conversations": [{"role": "user", "content": "m1 m2 m3 m4 m5"},
                                             {"role": "assistant", "content": "n1 n2 n3 n4"}]},
    {"id": "short-answer", "conversations": [{"from": "human", "value": "a b c d"}, {"from": "gpt", "value": "ok"}]},
]
# (prompt text, prompt tokens, output tokens) of the usable conversations
EXPECTED = {("a b c d e", 5, 4), ("p q r s", 4, 6), ("h1 h2 h3 h4", 4, 5), ("a1 a2 a3 a4", 4, 7),
            ("m1 m2 m3 m4 m5", 5, 4)}


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for entry in SHAREGPT for turn in entry["conversations"]
                    for w in turn.get("value", turn.get("content", "")).split()})
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture
def sharegpt_file(tmp_path) -> str:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    return str(path)


def test_sharegpt_first_human_turn_and_first_gpt_turn(sharegpt_file, word_tokenizer) -> None:
    requests = sharegpt_requests(sharegpt_file, word_tokenizer, num=100, seed=0)
    assert {(r.prompt_text, r.prompt_len, r.output_len) for r in requests} == EXPECTED
    for r in requests:
        assert r.prompt_token_ids == word_tokenizer(r.prompt_text, add_special_tokens=False).input_ids
        assert 0 not in r.prompt_token_ids   # no unknown words: the counts above are real tokens


def test_sharegpt_seeded_order_count_and_limits(sharegpt_file, word_tokenizer) -> None:
    first = sharegpt_requests(sharegpt_file, word_tokenizer, num=100, seed=7)
    again = sharegpt_requests(sharegpt_file, word_tokenizer, num=100, seed=7)
    assert [r.prompt_text for r in first] == [r.prompt_text for r in again]
    assert len(sharegpt_requests(sharegpt_file, word_tokenizer, num=2, seed=7)) == 2
    # prompt + output above max_model_len is skipped: only "a1 a2 a3 a4" (4 + 7 = 11) goes
    fitted = sharegpt_requests(sharegpt_file, word_tokenizer, num=100, max_model_len=10)
    assert {r.prompt_text for r in fitted} == {t for t, _, _ in EXPECTED} - {"a1 a2 a3 a4"}
    # an explicit output length replaces the gpt turn's count (and lets "short-answer" in)
    forced = sharegpt_requests(sharegpt_file, word_tokenizer, num=100, output_len=9)
    assert {(r.prompt_text, r.output_len) for r in forced} == {(t, 9) for t, _, _ in EXPECTED} | {("a b c d", 9)}


def test_sharegpt_bad_files(tmp_path, word_tokenizer) -> None:
    cases = {"missing.json": None, "not-json.json": "{nope", "not-a-list.json": json.dumps({"a": 1}),
             "no-usable.json": json.dumps([SHAREGPT[2], SHAREGPT[3]])}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(ValidationError) as info:
            sharegpt_requests(str(path), word_tokenizer, num=4)
        assert info.value.param == "dataset_path", name


def test_first_exchange() -> None:
    assert first_exchange([{"from": "gpt", "value": "x"}]) is None
    assert first_exchange([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]) == ("q", "a")


def test_random_fixed_and_ranged_lengths() -> None:
    fixed = random_requests(5, 32, 8, seed=1, vocab_high=512)
    assert [(r.prompt_len, r.output_len, len(r.prompt_token_ids)) for r in fixed] == [(32, 8, 32)] * 5
    assert all(3 <= t < 512 for r in fixed for t in r.prompt_token_ids)
    assert [r.prompt_token_ids for r in fixed] == [r.prompt_token_ids for r in random_requests(5, 32, 8, seed=1,
                                                                                              vocab_high=512)]
    assert fixed[0].prompt_token_ids != random_requests(1, 32, 8, seed=2, vocab_high=512)[0].prompt_token_ids
    ranged = random_requests(400, 100, 20, range_ratio=0.5, seed=0)
    assert {r.prompt_len for r in ranged} <= set(range(50, 151))
    assert {r.output_len for r in ranged} <= set(range(10, 31))
    assert min(r.prompt_len for r in ranged) < 60 and max(r.prompt_len for r in ranged) > 140
    assert ranged[0].offline_prompt() == {"prompt_token_ids": ranged[0].prompt_token_ids}
    shared = random_requests(4, 10, 5, seed=3, prefix_len=16)   # vLLM's --random-prefix-len
    assert [(r.prompt_len, len(r.prompt_token_ids)) for r in shared] == [(26, 26)] * 4
    assert len({tuple(r.prompt_token_ids[:16]) for r in shared}) == 1
    assert len({tuple(r.prompt_token_ids[16:]) for r in shared}) == 4
    for bad in (dict(num=0), dict(input_len=0), dict(range_ratio=1.0), dict(range_ratio=-0.1), dict(prefix_len=-1)):
        kwargs = dict(num=2, input_len=8, output_len=4, range_ratio=0.0) | bad
        with pytest.raises(ValidationError):
            random_requests(**kwargs)


def test_prefix_repetition_groups_prompts_behind_their_prefixes() -> None:
    """vLLM's prefix_repetition: num_prefixes prefixes, num // num_prefixes prompts each (the rest
    dropped), each prefix + its own suffix, a fixed output length, shuffled; seeded."""
    requests = prefix_repetition_requests(11, prefix_len=12, suffix_len=5, num_prefixes=3, output_len=7, seed=4,
                                          vocab_high=512)
    assert len(requests) == 9 and {(r.prompt_len, r.output_len, len(r.prompt_token_ids)) for r in requests} == {
        (17, 7, 17)}
    assert all(3 <= t < 512 for r in requests for t in r.prompt_token_ids)
    by_prefix = {}
    for r in requests:
        by_prefix.setdefault(tuple(r.prompt_token_ids[:12]), []).append(tuple(r.prompt_token_ids[12:]))
    assert sorted(len(v) for v in by_prefix.values()) == [3, 3, 3]
    assert len({s for v in by_prefix.values() for s in v}) == 9   # each prompt its own suffix
    assert [tuple(r.prompt_token_ids[:12]) for r in requests[:3]] != [next(iter(by_prefix))] * 3   # shuffled
    again = prefix_repetition_requests(11, prefix_len=12, suffix_len=5, num_prefixes=3, output_len=7, seed=4,
                                       vocab_high=512)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in requests]
    for bad, param in ((dict(num_prefixes=0), "num_prefixes"), (dict(num_prefixes=12), "num_prefixes"),
                       (dict(prefix_len=-1), "prefix_len"), (dict(output_len=0), "output_len"),
                       (dict(prefix_len=0, suffix_len=0), "num_prefixes")):
        with pytest.raises(ValidationError) as err:
            prefix_repetition_requests(**(dict(num=11) | bad))
        assert err.value.param == f"prefix_repetition_{param}"


def test_peers_preset_pinned() -> None:
    requests = peers_requests(3)
    assert [(r.prompt_len, r.output_len, r.prompt_token_ids[:3]) for r in requests] == [
        (928, 213, [24839, 29174, 13784]), (600, 231, [16619, 10007, 30984]), (270, 380, [9723, 25478, 14479])]


@pytest.mark.skipif(not os.path.isfile(PEERS_PY), reason="../shared/bench/peers.py is not on this machine")
def test_peers_preset_is_peers_py_workload() -> None:
    spec = importlib.util.spec_from_file_location("peers", PEERS_PY)
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    ours = peers_requests(64)
    assert [(r.prompt_token_ids, r.output_len) for r in ours] == [(p, o) for p, o in peers.workload(64)]


def test_random_text_prompts_from_the_tokenizer(word_tokenizer) -> None:
    vocab = ordinary_token_ids(word_tokenizer)
    assert 0 not in vocab and 1 not in vocab and len(vocab) == len(word_tokenizer.get_vocab()) - 2
    requests = random_text_requests(word_tokenizer, 4, input_len=12, output_len=5, seed=0)
    for r in requests:
        assert r.prompt_token_ids is None and r.output_len == 5
        assert r.prompt_len == len(r.prompt_text.split()) == 12   # one word per token, re-encoded
        assert r.offline_prompt() == r.prompt_text
    assert [r.prompt_text for r in requests] == [r.prompt_text for r in
                                                 random_text_requests(word_tokenizer, 4, 12, 5, seed=0)]


def test_load_requests_by_name(sharegpt_file, word_tokenizer) -> None:
    args = SimpleNamespace(dataset_name="random", num_prompts=3, random_input_len=8, random_output_len=4,
                           random_range_ratio=0.0, seed=0, dataset_path=None)
    assert all(max(r.prompt_token_ids) < 50 for r in load_requests(args, None, vocab_size=50))
    assert len(load_requests(SimpleNamespace(**{**vars(args), "dataset_name": "peers"}), None)) == 3
    assert len(load_requests(SimpleNamespace(**{**vars(args), "dataset_name": "sharegpt",
                                                "dataset_path": sharegpt_file}), word_tokenizer)) == 3
    import argparse

    from pagedserve.bench.cli import add_throughput_arguments
    parser = argparse.ArgumentParser()
    add_throughput_arguments(parser)   # the CLI's flags (vLLM's names) reach the dataset
    cli = parser.parse_args(["--dataset-name", "prefix_repetition", "--num-prompts", "8",
                             "--prefix-repetition-prefix-len", "32", "--prefix-repetition-suffix-len", "4",
                             "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "5"])
    repeated = load_requests(cli, None, vocab_size=50)
    assert len(repeated) == 8 and {(r.prompt_len, r.output_len) for r in repeated} == {(36, 5)}
    assert len({tuple(r.prompt_token_ids[:32]) for r in repeated}) == 2 and max(
        t for r in repeated for t in r.prompt_token_ids) < 50
    for name, tokenizer in (("sharegpt", word_tokenizer), ("sharegpt", None), ("random-text", None)):
        with pytest.raises(ValidationError):
            load_requests(SimpleNamespace(**{**vars(args), "dataset_name": name}), tokenizer)
