"""load_tokenizer's short way (PreTrainedTokenizerFast straight from tokenizer.json, no
AutoConfig) gives what AutoTokenizer gives: the same class, ids, special tokens, decoding and
chat template output, on the default model's tokenizer and on a Llama-3-style fixture (a
byte-level BPE tokenizer.json made here, with added special tokens and a chat template)."""
from __future__ import annotations

import json
import os

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import AutoTokenizer

from pagedserve.models.loader import ModelSource, load_tokenizer, materialize_gguf, plain_tokenizer, resolve_model

TEXTS = ["Hello world!", "  leading spaces\tand tabs\nnew lines\n\n", "naïve café 日本語 🙂 ∑x²",
         "<|begin_of_text|>special <|eot_id|> inside", "12345 + 678 = 13023", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def write_llama3_style(directory: str) -> str:
    """A byte-level BPE (Llama-3's pre-tokenizer) trained on TEXTS, Llama-3's special tokens,
    tokenizer_config.json as Meta ships it (PreTrainedTokenizerFast, bos/eos, chat template)."""
    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator(TEXTS * 20 + [m["content"] for m in CHAT],
                            trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    tok.add_special_tokens(special)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                   "model_input_names": ["input_ids", "attention_mask"], "chat_template": LLAMA3_TEMPLATE}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512}, f)
    return directory


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return {"default": materialize_gguf(resolve_model(None)).directory,
            "llama3_style": write_llama3_style(str(tmp_path_factory.mktemp("llama3_style")))}


@pytest.mark.parametrize("name", ["default", "llama3_style"])
def test_short_way_equals_auto_tokenizer(folders, name):
    directory = folders[name]
    assert plain_tokenizer(directory)
    fast, auto = load_tokenizer(ModelSource(directory)), AutoTokenizer.from_pretrained(directory)
    assert type(fast) is type(auto)
    assert fast.get_vocab() == auto.get_vocab() and len(fast) == len(auto)
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id, fast.unk_token_id) == \
        (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.unk_token_id)
    assert fast.all_special_tokens == auto.all_special_tokens
    assert fast.added_tokens_decoder.keys() == auto.added_tokens_decoder.keys()
    for text in TEXTS:
        for special in (True, False):
            ids = fast.encode(text, add_special_tokens=special)
            assert ids == auto.encode(text, add_special_tokens=special)
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
        assert fast.convert_ids_to_tokens(fast.encode(text)) == auto.convert_ids_to_tokens(auto.encode(text))
    assert fast.chat_template == auto.chat_template and fast.chat_template
    for generation_prompt in (True, False):
        rendered = fast.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
        assert rendered == auto.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
        assert fast.encode(rendered, add_special_tokens=False) == auto.encode(rendered, add_special_tokens=False)


def test_other_folders_take_auto_tokenizer(folders, tmp_path):
    """A model type outside PLAIN_TOKENIZER_MODEL_TYPES, a model-specific tokenizer class or
    custom code: AutoTokenizer decides, as before."""
    source = folders["llama3_style"]
    for change in ({"config.json": {"model_type": "qwen2"}}, {"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer"}},
                   {"tokenizer_config.json": {"auto_map": {"AutoTokenizer": ["x.Y", None]}}}):
        directory = tmp_path / str(len(os.listdir(tmp_path)))
        directory.mkdir()
        for file in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            data = open(os.path.join(source, file)).read()
            if file in change:
                data = json.dumps({**json.loads(data), **change[file]})
            (directory / file).write_text(data)
        assert not plain_tokenizer(str(directory))
    assert not plain_tokenizer(str(tmp_path / "missing"))
