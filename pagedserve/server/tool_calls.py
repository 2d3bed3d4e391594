"""Tool calling in chat (OpenAI's `tools` / `tool_choice`, vLLM's behaviour): the request's
tools checked into `Tool`s, `tool_choice` resolved into a `ToolPlan`, the JSON schema that
constrains the output for "required" or a named function, and the named parsers of
`--tool-call-parser` (hermes, llama3_json, pythonic) that find calls in free text ("auto").
Parsers never raise: text they cannot read whole is plain content."""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from pagedserve.errors import ValidationError

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "pythonic")
MAX_TOOLS = 128
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str   # a JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: new_tool_call_id())

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- request side

def check_tools(tools: list[Any] | None) -> list[Tool]:
    """OpenAI function tools -> Tools; a 400 naming `tools` on a bad shape. TGI's spelling
    `arguments` for the parameter schema is accepted too."""
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise ValidationError(f"tools supports up to {MAX_TOOLS} tools; given {len(tools)}", "tools")
    checked: list[Tool] = []
    for position, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValidationError(f'tools[{position}] must be {{"type": "function", "function": {{"name", ...}}}}',
                                  "tools")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValidationError(f"tools[{position}].function.name must be a non-empty string", "tools")
        parameters = function.get("parameters", function.get("arguments"))
        if parameters is None:
            parameters = EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise ValidationError(f"tools[{position}].function.parameters must be a JSON schema object", "tools")
        if any(t.name == name for t in checked):
            raise ValidationError(f"tools: the function name {name!r} is given twice", "tools")
        checked.append(Tool(name, parameters))
    return checked


def template_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """The tools as chat templates expect them (HF convention: OpenAI's shape)."""
    if not tools:
        return None
    return [{"type": "function", "function": tool["function"]} for tool in tools]


@dataclass(frozen=True)
class ToolPlan:
    """What to do with the output: mode "none" (plain text), "auto" (parse with `parser`),
    "required" (an array of calls, constrained) or "named" (`name`'s arguments, constrained)."""
    mode: str
    tools: tuple[Tool, ...] = ()
    name: str | None = None
    parser: str | None = None

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow ("required" / "named"), else None."""
        if self.mode == "named":
            return next(t.parameters for t in self.tools if t.name == self.name)
        if self.mode == "required":
            return required_schema(list(self.tools))
        return None

    def parse(self, text: str) -> ParsedOutput:
        """The finished output text -> content and calls (never raises)."""
        if self.mode == "named":
            return ParsedOutput(None, [ToolCall(self.name or "", text)]) if isinstance(_loads(text), dict) \
                else ParsedOutput(text, [])
        if self.mode == "required":
            return parse_required(text)
        if self.mode == "auto" and self.parser is not None:
            return PARSERS[self.parser](text)
        return ParsedOutput(text, [])


def resolve_tool_choice(tools: list[Tool], tool_choice: Any, enable_auto: bool, parser: str | None) -> ToolPlan:
    """vLLM's rules: no tool_choice with tools means "auto"; "auto" needs the server's
    --enable-auto-tool-choice and --tool-call-parser; a named function must be one of the
    tools. TGI's spellings (a function dict without "type", a bare function name) work too."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolPlan("none", tuple(tools))
    if not tools:
        raise ValidationError(f"tool_choice {json.dumps(tool_choice)} needs tools", "tool_choice")
    if tool_choice == "auto":
        if not enable_auto or parser is None:
            raise ValidationError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                  'to be set on the server (or send tool_choice "none", "required" or a named '
                                  'function)', "tool_choice")
        return ToolPlan("auto", tuple(tools), parser=parser)
    if tool_choice == "required":
        return ToolPlan("required", tuple(tools))
    name = _named_choice(tool_choice)
    if not any(tool.name == name for tool in tools):
        raise ValidationError(f"tool_choice names the function {name!r}, which is not among the tools "
                              f"({', '.join(t.name for t in tools)})", "tool_choice")
    return ToolPlan("named", tuple(tools), name=name)


def _named_choice(tool_choice: Any) -> str:
    if isinstance(tool_choice, str):   # TGI: a bare function name
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type", "function") != "function" \
            or not isinstance(function.get("name"), str):
        raise ValidationError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                              '"function": {"name": ...}}', "tool_choice")
    return function["name"]


def required_schema(tools: list[Tool]) -> dict[str, Any]:
    """"required": a non-empty array of {"name": one tool's name, "parameters": its schema}."""
    variants = [{"properties": {"name": {"type": "string", "enum": [tool.name]}, "parameters": tool.parameters},
                 "required": ["name", "parameters"]} for tool in tools]
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}


def parse_required(text: str) -> ParsedOutput:
    try:
        calls = json.loads(text)
    except ValueError:
        return ParsedOutput(text, [])
    if not isinstance(calls, list) or not calls:
        return ParsedOutput(text, [])
    found = [_call(item.get("name"), item.get("parameters")) for item in calls if isinstance(item, dict)]
    if len(found) != len(calls) or None in found:
        return ParsedOutput(text, [])
    return ParsedOutput(None, found)   # type: ignore[arg-type]


def check_history_tool_calls(tool_calls: list[Any], position: int) -> list[dict[str, Any]]:
    """An earlier assistant turn's tool_calls -> the HF template convention (arguments as a
    dict, as vLLM passes them); a 400 naming messages on a bad shape."""
    converted = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValidationError(f"messages[{position}].tool_calls entries must be {{\"id\", \"type\": "
                                  f"\"function\", \"function\": {{\"name\", \"arguments\"}}}}", "messages")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ValidationError(f"messages[{position}].tool_calls: function.arguments is not valid JSON",
                                      "messages") from None
        converted.append({**call, "type": "function", "function": {**function, "arguments": arguments}})
    return converted


# ---------------------------------------------------------------- parsers ("auto")

_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def parse_hermes(text: str) -> ParsedOutput:
    """Hermes / Qwen: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number of
    them (the last may be unterminated at the end); the text before the first is content."""
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedOutput(text, [])
    calls = []
    for match in _HERMES_CALL.finditer(text, start):
        body = _loads(match.group(1).strip())
        call = _call(body.get("name"), body.get("arguments")) if isinstance(body, dict) else None
        if call is None:
            return ParsedOutput(text, [])
        calls.append(call)
    content = text[:start]
    return ParsedOutput(content if content.strip() else None, calls)


def parse_llama3_json(text: str) -> ParsedOutput:
    """Llama 3.x JSON calls: {"name": ..., "parameters"|"arguments": {...}}, possibly after
    <|python_tag|>, several separated by ";". The whole text must be calls."""
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].lstrip()
    if not body.startswith("{"):
        return ParsedOutput(text, [])
    decoder, position, calls = json.JSONDecoder(), 0, []
    while position < len(body):
        try:
            item, end = decoder.raw_decode(body, position)
        except ValueError:
            return ParsedOutput(text, [])
        arguments = item.get("parameters", item.get("arguments")) if isinstance(item, dict) else None
        call = _call(item.get("name"), arguments) if isinstance(item, dict) else None
        if call is None:
            return ParsedOutput(text, [])
        calls.append(call)
        position = _skip(body, end, " \t\r\n")
        if position < len(body):
            if body[position] != ";":
                return ParsedOutput(text, [])
            position = _skip(body, position + 1, " \t\r\n")
    return ParsedOutput(None, calls)


def parse_pythonic(text: str) -> ParsedOutput:
    """Pythonic calls: [get_weather(city="Paris"), f(a=1)] (Llama 3.2 / 4 style), read with
    ast (literals only, never evaluated); keyword arguments only. The whole text must be calls."""
    body = text.strip()
    if body.startswith("<|python_start|>"):
        body = body[len("<|python_start|>"):]
        body = body[:-len("<|python_end|>")] if body.endswith("<|python_end|>") else body
        body = body.strip()
    if not (body.startswith("[") and body.endswith("]")):
        return ParsedOutput(text, [])
    try:
        tree = ast.parse(body, mode="eval")
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return ParsedOutput(text, [])
        calls = [_pythonic_call(node) for node in tree.body.elts]
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return ParsedOutput(text, [])
    return ParsedOutput(None, calls)


def _pythonic_call(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("not a call with keyword arguments")
    name = _dotted_name(node.func)
    arguments = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError("**kwargs")
        arguments[keyword.arg] = ast.literal_eval(keyword.value)
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise ValueError("not a function name")


PARSERS: dict[str, Callable[[str], ParsedOutput]] = {
    "hermes": parse_hermes, "llama3_json": parse_llama3_json, "pythonic": parse_pythonic}
# How a call begins, for streaming "auto": a marker after any content, or the whole output's start
_MARKER_PARSERS = {"hermes": "<tool_call>"}
_WHOLE_OUTPUT_OPENERS = {"llama3_json": ("{", "<|python_tag|>"), "pythonic": ("[", "<|python_start|>")}


def _call(name: Any, arguments: Any) -> ToolCall | None:
    """A call from a parsed name and arguments (a dict, or a JSON text of one); None if bad."""
    if not isinstance(name, str) or not name:
        return None
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


class ToolCallStream:
    """One choice's streamed deltas under a plan: a named function's arguments stream as they
    come (after one delta with the call's id and name); "required" output is held until the
    choice finishes, then parsed and sent as tool-call deltas (or as content). "auto" streams
    content while it cannot be a call: up to the parser's marker (hermes: `<tool_call>`,
    holding back a partial one at the end), or, for parsers whose calls are the whole output
    (llama3_json, pythonic), all of it once its start is not a call's start; what may be calls
    is held and parsed when the choice finishes."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held: list[str] = []
        self.sent = 0           # characters of the output already sent as content ("auto")
        self.holding = False    # "auto": a call may have started; the rest waits for the end
        self.called = False

    def feed(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The deltas to send for this output's text (`finished`: the choice's last output)."""
        if self.plan.mode == "named":
            deltas = []
            if not self.called and (text or finished):
                self.called = True
                deltas.append(_call_delta(0, ToolCall(self.plan.name or "", "")))
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas
        self.held.append(text)
        full = "".join(self.held)
        if not finished:
            if self.plan.mode != "auto" or self.holding:
                return []
            end = self._content_end(full)
            if end <= self.sent:
                return []
            piece, self.sent = full[self.sent:end], end
            return [{"content": piece}]
        parsed = self.plan.parse(full)
        content = full if not parsed.tool_calls else (parsed.content or "")
        deltas = [{"content": content[self.sent:]}] if content[self.sent:] else []
        for index, call in enumerate(parsed.tool_calls):
            deltas.append(_call_delta(index, call))
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
        self.called = bool(parsed.tool_calls)
        return deltas

    def _content_end(self, full: str) -> int:
        """How much of the unfinished output is surely content; sets `holding` once a call
        may have begun."""
        opener = _MARKER_PARSERS.get(self.plan.parser or "")
        if opener is not None:   # calls after content: stream up to the marker
            start = full.find(opener)
            if start >= 0:
                self.holding = True
                return start
            return len(full) - _partial_suffix(full, opener)
        body = full.lstrip()   # calls are the whole output: decided by how it starts
        if not body or any(o.startswith(body[:len(o)]) for o in _WHOLE_OUTPUT_OPENERS.get(self.plan.parser or "", ())):
            self.holding = bool(body)
            return self.sent
        return len(full)

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (held back: it may be one)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _call_delta(index: int, call: ToolCall) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}]}
