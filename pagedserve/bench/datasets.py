"""Benchmark request sets: what to send (token ids or text) and how many tokens to ask for.

    random      token ids, seeded; lengths fixed or drawn from [L*(1-r), L*(1+r)], after a prefix
                of --random-prefix-len ids every prompt shares (vLLM's flag: a system prompt)
    peers       the workload of ../shared/bench/peers.py: workload(n, seed) -- input U[64,1024],
                output U[16,512], ids randrange(3, 32000), one random.Random(seed)
    random-text random token ids from the tokenizer's ordinary vocabulary, decoded to text;
                prompt_len is the length of the text re-encoded
    sharegpt    a ShareGPT-format JSON file: prompt = first human turn, output length = token
                count of the first gpt turn after it (vLLM's rule; pairs under 4 tokens skipped)
    prefix_repetition  vLLM's: --prefix-repetition-num-prefixes random prefixes (system prompts) of
                --prefix-repetition-prefix-len token ids, --num-prompts // num-prefixes requests
                each (that prefix + a suffix of --prefix-repetition-suffix-len ids), each asking
                --prefix-repetition-output-len tokens, shuffled
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from pagedserve.errors import ValidationError

DATASET_NAMES = ("random", "peers", "random-text", "sharegpt", "prefix_repetition")
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")
MIN_SHAREGPT_TOKENS = 4


@dataclass
class SampleRequest:
    """One request: `prompt_token_ids` or `prompt_text` (or both), the prompt's length in
    tokens, and the number of output tokens to force (ignore_eos)."""

    prompt_len: int
    output_len: int
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None

    def offline_prompt(self) -> Any:
        """The form LLM.generate takes: token ids when known (no re-tokenization)."""
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        return self.prompt_text


def _lengths(rng: random.Random, length: int, range_ratio: float) -> int:
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.randint(low, high)


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0,
                    vocab_low: int = 3, vocab_high: int = 32000, prefix_len: int = 0) -> list[SampleRequest]:
    """Token-id prompts; ids uniform in [vocab_low, vocab_high). `prefix_len` ids drawn first
    begin every prompt (its length adds to the drawn one, as vLLM's --random-prefix-len)."""
    _check_random(num, input_len, output_len, range_ratio, vocab_low, vocab_high)
    if prefix_len < 0:
        raise ValidationError(f"--random-prefix-len must be >= 0, got {prefix_len}", "random_prefix_len")
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_low, vocab_high) for _ in range(prefix_len)]
    requests = []
    for _ in range(num):
        prompt_len = _lengths(rng, input_len, range_ratio)
        out_len = _lengths(rng, output_len, range_ratio)
        ids = prefix + [rng.randrange(vocab_low, vocab_high) for _ in range(prompt_len)]
        requests.append(SampleRequest(len(ids), out_len, prompt_token_ids=ids))
    return requests


def prefix_repetition_requests(num: int, prefix_len: int = 256, suffix_len: int = 256, num_prefixes: int = 10,
                               output_len: int = 128, seed: int = 0, vocab_low: int = 3,
                               vocab_high: int = 32000) -> list[SampleRequest]:
    """Token-id prompts in num_prefixes groups of num // num_prefixes (vLLM's rule: the rest
    dropped), each group's prompts beginning with its own prefix_len ids, then suffix_len ids of
    their own; output_len tokens each; shuffled (seeded)."""
    if num < 1:
        raise ValidationError(f"--num-prompts must be >= 1, got {num}", "num_prompts")
    for name, value, least in (("prefix_len", prefix_len, 0), ("suffix_len", suffix_len, 0),
                               ("output_len", output_len, 1), ("num_prefixes", num_prefixes, 1)):
        if value < least:
            raise ValidationError(f"--prefix-repetition-{name.replace('_', '-')} must be >= {least}, got {value}",
                                  f"prefix_repetition_{name}")
    if num_prefixes > num or prefix_len + suffix_len < 1:
        raise ValidationError(f"--prefix-repetition-num-prefixes ({num_prefixes}) must be at most --num-prompts "
                              f"({num}) and the prompts at least one token long", "prefix_repetition_num_prefixes")
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(vocab_low, vocab_high) for _ in range(n)]   # noqa: E731
    requests = []
    for _ in range(num_prefixes):
        prefix = draw(prefix_len)
        for _ in range(num // num_prefixes):
            ids = prefix + draw(suffix_len)
            requests.append(SampleRequest(len(ids), output_len, prompt_token_ids=ids))
    rng.shuffle(requests)
    return requests


def peers_requests(num: int, seed: int = 0) -> list[SampleRequest]:
    """Exactly peers.py's workload(num, seed), draw for draw."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        prompt_len = rng.randint(64, 1024)
        out_len = rng.randint(16, 512)
        ids = [rng.randrange(3, 32000) for _ in range(prompt_len)]
        requests.append(SampleRequest(prompt_len, out_len, prompt_token_ids=ids))
    return requests


def _check_random(num: int, input_len: int, output_len: int, range_ratio: float, low: int, high: int) -> None:
    if num < 1:
        raise ValidationError(f"--num-prompts must be >= 1, got {num}", "num_prompts")
    if input_len < 1 or output_len < 1:
        raise ValidationError(f"--random-input-len and --random-output-len must be >= 1, "
                              f"got {input_len} and {output_len}", "random_input_len")
    if not 0.0 <= range_ratio < 1.0:
        raise ValidationError(f"--random-range-ratio must be in [0, 1), got {range_ratio}", "random_range_ratio")
    if not 0 <= low < high:
        raise ValidationError(f"the token id range [{low}, {high}) is empty", "vocab_size")


def ordinary_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's vocabulary minus special and added tokens, sorted."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(getattr(tokenizer, "get_added_vocab", dict)().values())
    return sorted(i for i in tokenizer.get_vocab().values() if i not in special)


def random_text_requests(tokenizer: Any, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                         seed: int = 0) -> list[SampleRequest]:
    """Text prompts decoded from random ordinary token ids. Decoding then re-encoding can
    merge or split tokens, so prompt_len is measured on the text, not assumed."""
    vocab = ordinary_token_ids(tokenizer)
    _check_random(num, input_len, output_len, range_ratio, 0, len(vocab))
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        prompt_len = _lengths(rng, input_len, range_ratio)
        out_len = _lengths(rng, output_len, range_ratio)
        text = tokenizer.decode([vocab[rng.randrange(len(vocab))] for _ in range(prompt_len)])
        measured = len(tokenizer(text, add_special_tokens=False).input_ids)
        requests.append(SampleRequest(measured, out_len, prompt_text=text))
    return requests


def first_exchange(conversation: list[dict]) -> tuple[str, str] | None:
    """(first human turn, first gpt turn after it), or None when the conversation lacks one."""
    prompt = None
    for turn in conversation:
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            continue
        if prompt is None and role in HUMAN_ROLES:
            prompt = text
        elif prompt is not None and role in GPT_ROLES:
            return prompt, text
    return None


def sharegpt_requests(path: str, tokenizer: Any, num: int, seed: int = 0, output_len: int | None = None,
                      max_model_len: int | None = None) -> list[SampleRequest]:
    """The first `num` usable conversations after a seeded shuffle. `output_len` overrides
    the gpt turn's token count; pairs whose prompt + output exceed `max_model_len` are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValidationError(f"cannot read the ShareGPT file {path!r}: {exc}", "dataset_path") from None
    if not isinstance(data, list):
        raise ValidationError(f"{path!r} is not a ShareGPT file (a JSON list of conversations)", "dataset_path")
    entries = [e.get("conversations", e.get("conversation")) for e in data if isinstance(e, dict)]
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    requests = []
    for index in order:
        if len(requests) == num:
            break
        pair = first_exchange(entries[index]) if isinstance(entries[index], list) else None
        if pair is None:
            continue
        prompt_ids = tokenizer(pair[0], add_special_tokens=False).input_ids
        completion_len = len(tokenizer(pair[1], add_special_tokens=False).input_ids)
        out_len = output_len if output_len is not None else completion_len
        if len(prompt_ids) < MIN_SHAREGPT_TOKENS or out_len < MIN_SHAREGPT_TOKENS:
            continue
        if max_model_len is not None and len(prompt_ids) + out_len > max_model_len:
            continue
        requests.append(SampleRequest(len(prompt_ids), out_len, prompt_token_ids=prompt_ids, prompt_text=pair[0]))
    if not requests:
        raise ValidationError(f"no usable conversation in {path!r}", "dataset_path")
    return requests


def load_requests(args: Any, tokenizer: Any | None, vocab_size: int | None = None,
                  max_model_len: int | None = None) -> list[SampleRequest]:
    """The dataset the CLI flags name (--dataset-name and its options)."""
    name = args.dataset_name
    if name == "peers":
        return peers_requests(args.num_prompts, args.seed)
    high = min(32000, vocab_size) if vocab_size else 32000
    if name == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, vocab_high=high,
                               prefix_len=getattr(args, "random_prefix_len", 0))
    if name == "prefix_repetition":
        return prefix_repetition_requests(args.num_prompts, args.prefix_repetition_prefix_len,
                                          args.prefix_repetition_suffix_len, args.prefix_repetition_num_prefixes,
                                          args.prefix_repetition_output_len, args.seed, vocab_high=high)
    if tokenizer is None:
        raise ValidationError(f"--dataset-name {name} needs a tokenizer (drop --skip-tokenizer-init, "
                              "or give --tokenizer)", "dataset_name")
    if name == "random-text":
        return random_text_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                                    args.random_range_ratio, args.seed)
    if name == "sharegpt":
        if not args.dataset_path:
            raise ValidationError("--dataset-name sharegpt needs --dataset-path", "dataset_path")
        return sharegpt_requests(args.dataset_path, tokenizer, args.num_prompts, args.seed,
                                 getattr(args, "sharegpt_output_len", None), max_model_len)
    raise ValidationError(f"--dataset-name must be one of {', '.join(DATASET_NAMES)}, got {name!r}", "dataset_name")
