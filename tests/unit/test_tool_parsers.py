"""Tool calling pieces without a server (issue 20, part 4): the named parsers (exact calls;
malformed text is plain content, never an exception), tool_choice resolution and its 400s,
the constraint schemas, the history conversion and the streamed deltas."""
from __future__ import annotations

import json

import pytest

from pagedserve.errors import ValidationError
from pagedserve.server.tool_calls import (ToolCallStream, ToolPlan, check_history_tool_calls, check_tools,
                                          parse_hermes, parse_llama3_json, parse_pythonic, resolve_tool_choice)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def calls(parsed):
    return [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls]


def test_hermes_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>')
    parsed = parse_hermes(text)
    assert parsed.content == "Let me check.\n"
    assert calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    assert all(call.id.startswith("chatcmpl-tool-") for call in parsed.tool_calls)
    assert parsed.tool_calls[0].id != parsed.tool_calls[1].id


def test_hermes_unterminated_last_call_and_no_content():
    parsed = parse_hermes('<tool_call>{"name": "f", "arguments": {}}')
    assert parsed.content is None and calls(parsed) == [("f", {})]


@pytest.mark.parametrize("text", ["just words", "<tool_call>{not json}</tool_call>", "<tool_call>[1, 2]</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "f", "arguments": 3}',
                                  "<tool_call>", ""])
def test_hermes_malformed_is_plain_content(text):
    parsed = parse_hermes(text)
    assert parsed.content == text and parsed.tool_calls == []


def test_llama3_json_forms():
    assert calls(parse_llama3_json('{"name": "get_weather", "parameters": {"city": "Oslo"}}')) == \
        [("get_weather", {"city": "Oslo"})]
    parsed = parse_llama3_json('<|python_tag|>{"name": "a", "arguments": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert parsed.content is None and calls(parsed) == [("a", {"x": 1}), ("b", {})]


@pytest.mark.parametrize("text", ["Hello {", '{"name": "a", "parameters": {}} and more', '{"name": "a"',
                                  '{"parameters": {}}', '{"name": "a", "parameters": []}', "[1]", '{"name": 1}'])
def test_llama3_json_malformed_is_plain_content(text):
    parsed = parse_llama3_json(text)
    assert parsed.content == text and parsed.tool_calls == []


def test_pythonic_calls():
    parsed = parse_pythonic('[get_weather(city="Paris", days=3, metric=True), get_time(), ns.f(x=[1, {"a": None}])]')
    assert parsed.content is None
    assert calls(parsed) == [("get_weather", {"city": "Paris", "days": 3, "metric": True}), ("get_time", {}),
                             ("ns.f", {"x": [1, {"a": None}]})]
    assert calls(parse_pythonic("<|python_start|>[f(a='b')]<|python_end|>")) == [("f", {"a": "b"})]


@pytest.mark.parametrize("text", ["[f(1)]", "[f(**k)]", "[f(a=g())]", "[f(a=__import__('os').system('x'))]",
                                  "[1, 2]", "[]", "f(a=1)", "[f(a=1)", "plain text", "[lambda: 1]"])
def test_pythonic_malformed_is_plain_content_never_evaluated(text):
    parsed = parse_pythonic(text)
    assert parsed.content == text and parsed.tool_calls == []


def test_tool_choice_resolution():
    tools = check_tools([WEATHER, TIME])
    assert [t.name for t in tools] == ["get_weather", "get_time"]
    assert tools[1].parameters == {"type": "object", "properties": {}}
    assert resolve_tool_choice(tools, None, True, "hermes") == ToolPlan("auto", tuple(tools), parser="hermes")
    assert resolve_tool_choice([], None, False, None).mode == "none"
    assert resolve_tool_choice(tools, "none", False, None).mode == "none"
    assert resolve_tool_choice(tools, "required", False, None).mode == "required"
    named = resolve_tool_choice(tools, {"type": "function", "function": {"name": "get_weather"}}, False, None)
    assert named.mode == "named" and named.schema() == WEATHER["function"]["parameters"]
    # TGI's spellings: no "type", or the bare name
    assert resolve_tool_choice(tools, {"function": {"name": "get_time"}}, False, None).name == "get_time"
    assert resolve_tool_choice(tools, "get_time", False, None).name == "get_time"


@pytest.mark.parametrize("tools, choice, enable, parser, field, words", [
    ([WEATHER], None, False, None, "tool_choice", "--enable-auto-tool-choice"),
    ([WEATHER], "auto", True, None, "tool_choice", "--tool-call-parser"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, True, "hermes", "tool_choice", "'nope'"),
    ([WEATHER], {"type": "function"}, True, "hermes", "tool_choice", "must be"),
    ([], "required", True, "hermes", "tool_choice", "needs tools"),
])
def test_tool_choice_errors_name_the_field(tools, choice, enable, parser, field, words):
    with pytest.raises(ValidationError) as info:
        resolve_tool_choice(check_tools(tools), choice, enable, parser)
    assert info.value.param == field and words in info.value.message


@pytest.mark.parametrize("tools", [[{"type": "retrieval"}], [{"type": "function", "function": {}}],
                                   [{"type": "function", "function": {"name": "f", "parameters": []}}], [WEATHER, WEATHER],
                                   ["f"]])
def test_bad_tools_name_tools(tools):
    with pytest.raises(ValidationError) as info:
        check_tools(tools)
    assert info.value.param == "tools"


def test_required_schema_and_parse():
    plan = ToolPlan("required", tuple(check_tools([WEATHER, TIME])))
    schema = plan.schema()
    assert schema["type"] == "array" and schema["minItems"] == 1
    variants = schema["items"]["anyOf"]
    assert [v["properties"]["name"]["enum"] for v in variants] == [["get_weather"], ["get_time"]]
    assert variants[0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    parsed = plan.parse('[{"name": "get_weather", "parameters": {"city": "Rome"}}]')
    assert parsed.content is None and calls(parsed) == [("get_weather", {"city": "Rome"})]
    assert plan.parse('[{"name": "get_weather", "param').tool_calls == []   # cut off: plain content


def test_history_tool_calls_become_dicts():
    history = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert check_history_tool_calls(history, 1) == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    with pytest.raises(ValidationError) as info:
        check_history_tool_calls([{"function": {"name": "f", "arguments": "{bad"}}], 2)
    assert info.value.param == "messages" and "messages[2]" in info.value.message


def test_stream_named_streams_arguments_as_they_come():
    stream = ToolCallStream(ToolPlan("named", tuple(check_tools([WEATHER])), name="get_weather"))
    first = stream.feed('{"city": ', False)
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first[0]["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    assert first[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}
    assert stream.feed('"Paris"}', True) == [{"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]
    assert stream.finish_reason("stop") == "tool_calls"


def test_stream_auto_streams_content_up_to_the_hermes_marker():
    stream = ToolCallStream(ToolPlan("auto", tuple(check_tools([WEATHER])), parser="hermes"))
    assert stream.feed("Sure, let me <tool", False) == [{"content": "Sure, let me "}]   # "<tool" may begin one
    assert stream.feed("_call>{\"name\": \"get_weather\", ", False) == []
    deltas = stream.feed('"arguments": {"city": "Rome"}}</tool_call>', True)
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Rome"}'}}]}
    assert len(deltas) == 2 and stream.finish_reason("stop") == "tool_calls"
    plain = ToolCallStream(ToolPlan("auto", (), parser="hermes"))
    assert plain.feed("hel", False) == [{"content": "hel"}]
    assert plain.feed("lo <b> <to", False) == [{"content": "lo <b> "}]   # "<to" held back a moment
    assert plain.feed("p", True) == [{"content": "<top"}] and plain.finish_reason("stop") == "stop"
    broken = ToolCallStream(ToolPlan("auto", (), parser="hermes"))
    assert broken.feed("a <tool_call>{oops", False) == [{"content": "a "}]
    assert broken.feed("}", True) == [{"content": "<tool_call>{oops}"}]   # not a call: content after all


@pytest.mark.parametrize("parser, call", [("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
                                          ("pythonic", '[get_weather(city="Oslo")]')])
def test_stream_auto_whole_output_parsers(parser, call):
    stream = ToolCallStream(ToolPlan("auto", tuple(check_tools([WEATHER])), parser=parser))
    assert stream.feed(" ", False) == [] and stream.feed(call[:5], False) == []
    deltas = stream.feed(call[5:], True)
    assert [d["tool_calls"][0]["function"] for d in deltas] == [{"name": "get_weather", "arguments": ""},
                                                                {"arguments": '{"city": "Oslo"}'}]
    text = ToolCallStream(ToolPlan("auto", (), parser=parser))
    assert text.feed(" It is", False) == [{"content": " It is"}]
    assert text.feed(" sunny", True) == [{"content": " sunny"}] and text.finish_reason("stop") == "stop"


def test_serve_flags_reach_the_settings():
    from pagedserve.server.serve import make_parser, server_settings_from
    parser = make_parser()
    settings = server_settings_from(parser.parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]))
    assert settings.enable_auto_tool_choice and settings.tool_call_parser == "pythonic"
    assert not server_settings_from(parser.parse_args([])).enable_auto_tool_choice
    with pytest.raises(ValidationError) as info:   # vLLM's rule: the flag needs a parser
        server_settings_from(parser.parse_args(["--enable-auto-tool-choice"]))
    assert info.value.param == "tool_call_parser"
    with pytest.raises(SystemExit):
        parser.parse_args(["--tool-call-parser", "mistral"])   # argparse: not one of the choices
