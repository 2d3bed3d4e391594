"""LLM.chat on the default model: the rendered prompt (text and token ids) equals
transformers' apply_chat_template with the template from the GGUF metadata; single and
multi-turn conversations, several in one call, custom templates, and bad messages."""
from __future__ import annotations

import os

import gguf
import pytest
from transformers import AutoTokenizer

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ValidationError
from pagedserve.models.default_model import default_model_path

SINGLE = [{"role": "user", "content": "What is the capital of France?"}]
MULTI = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? 🇮🇹 ñ"},
]
NO_SYSTEM_MULTI = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Count to three."},
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def llm():
    engine = LLM(device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=64, seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def hf_render(tokenizer, conversation, **kwargs) -> tuple[str, list[int]]:
    kwargs.setdefault("add_generation_prompt", True)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    return text, list(ids)


def test_template_comes_from_the_gguf_metadata(llm):
    reader = gguf.GGUFReader(default_model_path())
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert llm.get_tokenizer().chat_template == template
    assert "<|im_start|>" in template


@pytest.mark.parametrize("conversation", [SINGLE, MULTI, NO_SYSTEM_MULTI], ids=["single", "multi", "no-system"])
def test_rendered_prompt_equals_transformers(llm, hf_tokenizer, conversation):
    (out,) = llm.chat(conversation, GREEDY, use_tqdm=False)
    text, ids = hf_render(hf_tokenizer, conversation)
    assert out.prompt == text
    assert out.prompt_token_ids == ids
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == len(conversation) + (conversation[0]["role"] != "system") + 1
    assert out.outputs[0].token_ids   # and it generated from it


def test_several_conversations_in_one_call(llm, hf_tokenizer):
    conversations = [SINGLE, MULTI, NO_SYSTEM_MULTI]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (3, 4, 5)]
    outs = llm.chat(conversations, params, use_tqdm=False)
    assert [o.prompt for o in outs] == [hf_render(hf_tokenizer, c)[0] for c in conversations]
    assert [o.prompt_token_ids for o in outs] == [hf_render(hf_tokenizer, c)[1] for c in conversations]
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 4, 5]
    # each equals the same conversation on its own, and generate() on the rendered ids
    alone = llm.chat(MULTI, params[1], use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[1].outputs[0].token_ids
    (direct,) = llm.generate({"prompt_token_ids": outs[1].prompt_token_ids}, params[1], use_tqdm=False)
    assert direct.outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_without_generation_prompt_and_continue_final_message(llm, hf_tokenizer):
    (out,) = llm.chat(MULTI, GREEDY, add_generation_prompt=False, use_tqdm=False)
    assert out.prompt == hf_render(hf_tokenizer, MULTI, add_generation_prompt=False)[0]
    assert out.prompt.endswith("<|im_end|>\n")
    (cont,) = llm.chat(MULTI[:2] + [{"role": "assistant", "content": "The capital is"}], GREEDY,
                       add_generation_prompt=False, continue_final_message=True, use_tqdm=False)
    expected = hf_render(hf_tokenizer, MULTI[:2] + [{"role": "assistant", "content": "The capital is"}],
                         add_generation_prompt=False, continue_final_message=True)[0]
    assert cont.prompt == expected and cont.prompt.endswith("The capital is")


def test_custom_chat_template(llm):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    (out,) = llm.chat(MULTI[1:3], GREEDY, chat_template=template, use_tqdm=False)
    assert out.prompt == "[user] Capital of France?\n[assistant] Paris.\n[assistant]"


def test_text_content_parts_are_joined(llm, hf_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"},
                                          {"type": "text", "text": "the capital of France?"}]}]
    (out,) = llm.chat(parts, GREEDY, use_tqdm=False)
    assert out.prompt == hf_render(hf_tokenizer, [{"role": "user",
                                                   "content": "What is\nthe capital of France?"}])[0]


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"content": "no role"}], "messages"),
    ([{"role": "user", "content": 42}], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages"),
    ([["not a dict"]], "messages"),
])
def test_bad_messages_name_the_parameter(llm, messages, param):
    with pytest.raises(ValidationError) as info:
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert info.value.param == param


def test_bad_template_and_flags_name_the_parameter(llm):
    with pytest.raises(ValidationError) as info:
        llm.chat(SINGLE, GREEDY, chat_template="{% for %}", use_tqdm=False)
    assert info.value.param == "chat_template"
    with pytest.raises(ValidationError) as info:
        llm.chat(SINGLE, GREEDY, continue_final_message=True, use_tqdm=False)
    assert info.value.param == "continue_final_message"
    assert not llm.engine.has_unfinished_requests()


def test_template_variables_tools_documents_and_kwargs(llm, hf_tokenizer):
    """tools, documents and chat_template_kwargs reach the template as vLLM's LLM.chat passes them:
    the model's own template renders exactly as transformers' apply_chat_template with the same
    arguments, and a custom template sees each variable."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    documents = [{"title": "Paris", "text": "Paris is the capital of France."}]
    (own,) = llm.chat(SINGLE, GREEDY, tools=tools, documents=documents, chat_template_kwargs={"enable_thinking": False},
                      use_tqdm=False)
    assert own.prompt == hf_render(hf_tokenizer, SINGLE, tools=tools, documents=documents, enable_thinking=False)[0]
    template = ("{% for d in documents %}<doc {{ d.title }}>{{ d.text }}</doc>{% endfor %}"
                "{% for t in tools %}<tool {{ t.function.name }}>{% endfor %}"
                "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
                "{% if enable_thinking %}<think>{% else %}<no_think>{% endif %}")
    outs = [llm.chat(SINGLE, GREEDY, chat_template=template, tools=tools, documents=documents,
                     chat_template_kwargs={"enable_thinking": thinking}, use_tqdm=False)[0] for thinking in (True, False)]
    body = "<doc Paris>Paris is the capital of France.</doc><tool get_weather>[user] What is the capital of France?"
    assert [o.prompt for o in outs] == [body + "<think>", body + "<no_think>"]


@pytest.mark.parametrize("kwargs,param", [
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),   # reserved: its own field
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"not an identifier": 1}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"documents": [{"title": 3}]}, "documents"),
    ({"documents": "text"}, "documents"),
])
def test_bad_template_variables_name_the_parameter(llm, kwargs, param):
    with pytest.raises(ValidationError) as info:
        llm.chat(SINGLE, GREEDY, use_tqdm=False, **kwargs)
    assert info.value.param == param
