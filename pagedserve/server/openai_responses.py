"""POST /v1/responses: OpenAI's Responses API (as vLLM serves it) over the chat route's machinery.
`instructions` (a system message) and `input` (a text, or a list of role / content messages) are
rendered by the chat template; `max_output_tokens`, `temperature`, `top_p`, `seed`, and
`text.format` json_schema / json_object (structured outputs) map to the chat request's fields.
The answer is one `message` output item with one `output_text` part; a stream sends OpenAI's
events (response.created ... response.output_text.delta ... response.completed), each with its
sequence_number. Function tools (`tools` of type function, `tool_choice`) are the chat route's
(its rules, its parsers): calls come back as `function_call` items (a stream holds the output until
it ends, then sends the items), and earlier turns' `function_call` / `function_call_output` input
items reach the template as the assistant's tool_calls and tool messages. Nothing is stored:
`previous_response_id` and `background` are refused naming the field. With --reasoning-parser the
chain of thought comes first as a `reasoning` item (its text as `reasoning_text`, streamed as
response.reasoning_text.delta events), the answer as the message. `reasoning` (null or {effort,
summary}) is vLLM's: effort reaches the chat template. `include: ["message.output_text.logprobs"]`
with `top_logprobs` (0-20) puts the tokens' logprobs in the output_text part and its delta events
(vLLM's: top_logprobs alone asks for nothing). Every error names this request's own fields (input[i],
instructions, text.format..., max_output_tokens), those of the chat machinery below included."""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, AsyncIterator, Literal, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from pagedserve.errors import ValidationError
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.server import structured
from pagedserve.server.context import ServerContext, new_request_id
from pagedserve.server.errors import response_error_fields
from pagedserve.server.openai_common import truncate_prompts
from pagedserve.server.openai_logprobs import chat_logprobs
from pagedserve.server.openai_protocol import ChatCompletionRequest, ReasoningEffort, _Strict, effort_template_kwargs
from pagedserve.server.request_body import parse_body
from pagedserve.server.streaming import (SSEResponse, add_prompts, close_all, final_outputs, merge_streams,
                                         unless_disconnected)
from pagedserve.server.openai_chat import tool_constraint
from pagedserve.server.reasoning import ReasoningStream, split
from pagedserve.server.tool_calls import ToolPlan, template_tools


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[InputText]]
    id: str | None = None
    status: str | None = None

    def as_chat(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class FunctionCallItem(_Strict):
    """An earlier turn's call, as the Responses API echoes it back in `input`."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


def _chat_messages(items: list[Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """Input items -> chat messages: consecutive function_call items become one assistant turn's
    tool_calls, a function_call_output a tool message; and for each message the index of the
    (first) input item it came from (errors about a message name that item)."""
    messages: list[dict[str, Any]] = []
    sources: list[int] = []
    for position, item in enumerate(items):
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            messages.append(item.as_chat())
        sources.append(position)
    return messages, sources


class Reasoning(_Strict):
    """OpenAI's reasoning options. As vLLM does, `effort` reaches the chat template
    (effort_template_kwargs)."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None   # summary's older name

    def template_kwargs(self) -> dict[str, Any] | None:
        return effort_template_kwargs(self.effort) or None


OUTPUT_LOGPROBS = "message.output_text.logprobs"   # the one `include` value served


def _rename(text: str, sources: list[str]) -> str:
    """The chat request's field names in `text` -> this request's: messages[i] -> the input item
    (or `instructions`) it came from, response_format -> text.format, a chat tool's function.X
    -> the flat tool's X, max_tokens -> max_output_tokens, logprobs -> top_logprobs, the
    rendered prompt -> input."""
    def message(match: re.Match) -> str:
        position = int(match.group(1) or match.group(2))
        return sources[position] if position < len(sources) else "input"

    text = re.sub(r"\bmessages(?:\[(\d+)\]|\.(\d+))(?:\.tool_calls(?:\[\d+\]|\.\d+)?(?:\.function)?)?", message, text)
    text = re.sub(r"\bresponse_format\.json_schema\b", "text.format", text)
    text = re.sub(r"\bresponse_format\b", "text.format", text)
    text = re.sub(r"\b(tools(?:\[\d+\]|\.\d+))\.function\b", r"\1", text)
    text = re.sub(r"\btool_choice\.function\b", "tool_choice", text)
    for chat, ours in (("max_tokens", "max_output_tokens"), ("messages", "input"), ("prompt", "input"),
                       ("chat_template", "input"), ("logprobs", "top_logprobs")):
        text = re.sub(rf"(?<![\w.]){chat}\b", ours, text)
    return text


class ResponsesRequest(_Strict):
    input: Union[str, list[Union[InputMessage, FunctionCallItem, FunctionCallOutputItem]]]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None                      # vLLM's extra
    stream: bool = False
    store: bool | None = None                    # accepted: nothing is stored either way
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None           # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    service_tier: str | None = None
    previous_response_id: None = None
    background: Literal[False] | None = None
    include: list[str] | None = None
    reasoning: Reasoning | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)   # with include message.output_text.logprobs
    mm_processor_kwargs: dict[str, Any] | None = None     # vLLM's: only null or {} (the model takes text only)
    request_id: str | None = None
    priority: int = 0

    def check_supported(self) -> None:
        if any(tool.get("type") != "function" for tool in self.tools or ()):
            raise ValidationError("tools: only function tools are supported", "tools")
        unserved = [value for value in self.include or () if value != OUTPUT_LOGPROBS]
        if unserved:
            raise ValidationError(f"include {unserved} is not supported (only {OUTPUT_LOGPROBS!r})", "include")
        if self.mm_processor_kwargs:
            raise ValidationError("mm_processor_kwargs is not supported by this server: the model takes text only "
                                  "(only null or {} is accepted)", "mm_processor_kwargs")
        if isinstance(self.input, list) and not self.input:
            raise ValidationError("input must not be empty", "input")
        for position, item in enumerate(self.input if isinstance(self.input, list) else ()):
            if isinstance(item, FunctionCallItem) and item.arguments.strip():
                try:
                    json.loads(item.arguments)
                except ValueError:
                    raise ValidationError(f"input[{position}].arguments is not valid JSON",
                                          f"input[{position}].arguments") from None

    @property
    def output_logprobs(self) -> bool:
        """include names message.output_text.logprobs: the message's text parts carry them."""
        return OUTPUT_LOGPROBS in (self.include or ())

    def _sources(self) -> list[str]:
        """For each message of chat_request(), the field of this request it came from."""
        sources = ["instructions"] if self.instructions else []
        if isinstance(self.input, str):
            return sources + ["input"]
        return sources + [f"input[{position}]" for position in _chat_messages(self.input)[1]]

    def renamed(self, exc: ValidationError) -> ValidationError:
        """An error of the chat route's machinery, naming this request's own fields."""
        sources = self._sources()
        param = exc.param
        if param == "messages":   # the chat route names the list; its message names the entry
            named = re.match(r"messages(?:\[\d+\]|\.\d+)", exc.message)
            param = named.group(0) if named else param
        return ValidationError(_rename(exc.message, sources), _rename(param, sources) if param else param)

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request this one is (its checks and sampling parameters are the chat route's)."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += [{"role": "user", "content": self.input}] if isinstance(self.input, str) \
            else _chat_messages(self.input)[0]
        body: dict[str, Any] = {"messages": messages, "priority": self.priority}
        if self.tools:   # the Responses API's flat function tools -> the chat route's
            body["tools"] = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
                             for tool in self.tools]
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
            choice = {"type": "function", "function": {"name": choice["name"]}}
        if choice is not None:
            body["tool_choice"] = choice
        for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                             ("top_p", "top_p"), ("seed", "seed")):
            if getattr(self, ours) is not None:
                body[theirs] = getattr(self, ours)
        if self.output_logprobs:   # vLLM's: top_logprobs counts only with the include
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs or 0
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ValidationError("text.format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}",
                                  "text.format")
        if fmt["type"] == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt["type"] == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}}
        return parse_body(ChatCompletionRequest, body)


async def create_response(ctx: ServerContext, request: ResponsesRequest, raw_request: Request) -> Response:
    lora = ctx.check_model(request.model)
    response_id, engine_id = new_request_id("resp", request.request_id)
    try:   # the chat route's machinery: its errors name this request's fields
        plan, streams = await _start(ctx, request, engine_id, lora)
    except ValidationError as exc:
        raise request.renamed(exc) from None
    builder = _ResponseBuilder(ctx, request, response_id, plan)
    if request.stream:
        return SSEResponse(builder.stream(streams))
    try:
        [final] = await unless_disconnected(final_outputs(streams), raw_request)
    finally:
        close_all(streams)
    completion = final.outputs[0]
    return JSONResponse(builder.body(completion.text, len(final.prompt_token_ids), len(completion.token_ids),
                                     completion.finish_reason, logprobs=builder.logprobs(completion)))


async def _start(ctx: ServerContext, request: ResponsesRequest, engine_id: str, lora: Any) -> tuple[ToolPlan, list]:
    """The chat request this one is, through the chat route's checks, template and engine."""
    chat = request.chat_request()
    params = chat.to_sampling_params()
    plan = chat.tool_plan(ctx.settings.enable_auto_tool_choice, ctx.settings.tool_call_parser)
    if request.output_logprobs and (plan.active or ctx.settings.reasoning_parser is not None):
        raise ValidationError(f"include {OUTPUT_LOGPROBS!r} cannot be used with function tools (tool_choice other "
                              "than \"none\") or on a server with --reasoning-parser", "include")
    constraint = tool_constraint(plan, params) or chat.structured_constraint()
    kwargs = request.reasoning.template_kwargs() if request.reasoning is not None else None
    prompt = await ctx.engine.render_chat_async([m.as_template_message(i) for i, m in enumerate(chat.messages)],
                                                ctx.settings.chat_template, tools=template_tools(chat.tools),
                                                chat_template_kwargs=kwargs)
    [prompt] = await truncate_prompts(ctx, [prompt], None, chat.add_special_tokens)
    kind = OutputKind.DELTA if request.stream else OutputKind.FINAL_ONLY
    with structured.naming(constraint):
        streams = await add_prompts(ctx.engine, engine_id, [chat.engine_prompt(prompt)], params, kind,
                                    chat.add_special_tokens, chat.priority, lora)
    return plan, structured.named_streams(streams, constraint)


class _Tally:
    """A streamed choice's totals as its outputs (deltas) come: text, tokens, finish reason."""

    def __init__(self, builder: "_ResponseBuilder") -> None:
        self.builder = builder
        self.text, self.prompt_tokens, self.output_tokens, self.finish_reason = "", 0, 0, None
        self.logprobs: list[dict[str, Any]] = []   # with include message.output_text.logprobs
        self.logprobs_sent = 0                      # how many of them delta events carried

    def add(self, output: Any) -> Any:
        """Count one output; returns its completion (the delta)."""
        completion = output.outputs[0]
        self.prompt_tokens = len(output.prompt_token_ids)
        self.output_tokens += len(completion.token_ids)
        self.finish_reason = completion.finish_reason or self.finish_reason
        self.text += completion.text
        self.logprobs += self.builder.logprobs(completion)
        return completion

    def unsent_logprobs(self) -> list[dict[str, Any]]:
        """The logprobs no delta event carried yet (a delta event carries those of its text)."""
        unsent, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return unsent

    def body(self) -> dict[str, Any]:
        return self.builder.body(self.text, self.prompt_tokens, self.output_tokens, self.finish_reason,
                                 logprobs=self.logprobs)


class _ResponseBuilder:
    def __init__(self, ctx: ServerContext, request: ResponsesRequest, response_id: str, plan: ToolPlan) -> None:
        self.ctx, self.request, self.id, self.plan = ctx, request, response_id, plan
        self.model = ctx.response_model(request.model)   # fixed at the start: an adapter unloaded meanwhile keeps it
        self.created = int(time.time())
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"
        self.sequence = 0

    def logprobs(self, completion: Any) -> list[dict[str, Any]]:
        """With include message.output_text.logprobs, the completion's tokens as OpenAI's
        output_text logprobs ({token, logprob, bytes, top_logprobs}, the chat route's entries)."""
        if not self.request.output_logprobs or not completion.logprobs:
            return []
        return chat_logprobs(self.ctx, completion.token_ids, completion.logprobs, self.request.top_logprobs or 0)[
            "content"]

    def output_items(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The finished output: a reasoning item (with a reasoning parser, when the model
        reasoned), the message (unless only calls were made or only reasoning came) and a
        function_call item per tool call found in (or forced on) the answer."""
        items = []
        parser = self.ctx.settings.reasoning_parser
        if parser is not None:
            reasoning, answer = split(text, parser)
            text = answer or ""
            if reasoning is not None:
                items.append(self.reasoning_item("completed", reasoning))
        if not self.plan.active:   # (with logprobs neither reasoning nor tools: the text is the whole output)
            return items + ([self.item("completed", text, logprobs)] if text or not items else [])
        parsed = self.plan.parse(text)
        if parsed.content or not (parsed.tool_calls or items):
            items.append(self.item("completed", parsed.content or ""))
        for call in parsed.tool_calls:   # (a stream builds the body once and sends these very items)
            items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
                          "name": call.name, "arguments": call.arguments, "status": "completed"})
        return items

    def body(self, text: str | None, prompt_tokens: int, output_tokens: int, finish_reason: str | None,
             status: str | None = None, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The Response object; `text` None: in progress (no output yet)."""
        if status is None:
            status = "completed" if finish_reason != "length" else "incomplete"
        request = self.request
        output = [] if text is None else self.output_items(text, logprobs)
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "error": None, "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "metadata": request.metadata or {},
                "parallel_tool_calls": request.parallel_tool_calls is not False,
                "tool_choice": request.tool_choice or ("auto" if request.tools else "none"),
                "tools": request.tools or [], "text": request.text or {"format": {"type": "text"}}, "truncation": "disabled",
                "previous_response_id": None, "store": False, "user": request.user,
                "reasoning": None if request.reasoning is None else request.reasoning.model_dump(),
                "top_logprobs": request.top_logprobs,
                "usage": None if text is None else {
                    "input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prompt_tokens + output_tokens}}

    def reasoning_item(self, status: str, text: str | None) -> dict[str, Any]:
        return {"id": self.reasoning_id, "type": "reasoning", "status": status, "summary": [],
                "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}

    def item(self, status: str, text: str | None, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        content = [] if text is None else [self.part(text, logprobs)]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs or [])}

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def stream(self, streams: list) -> AsyncIterator[str]:
        """OpenAI's events: created, in_progress, the output's items, completed (or incomplete);
        an error after the 200 is an `error` event."""
        try:
            yield self.event("response.created", response=self.body(None, 0, 0, None, "in_progress"))
            yield self.event("response.in_progress", response=self.body(None, 0, 0, None, "in_progress"))
            async for event in (self._held_events(streams) if self.plan.active else self._live_events(streams)):
                yield event
        except Exception as exc:
            yield self.event("error", **response_error_fields(exc))
        finally:
            close_all(streams)

    def _finished(self, final: dict[str, Any]) -> str:
        return self.event("response.completed" if final["status"] == "completed" else "response.incomplete",
                          response=final)

    async def _live_events(self, streams: list) -> AsyncIterator[str]:
        """No tools: the text delta by delta as it is generated, into the message item (with a
        reasoning parser, the thought first into a reasoning item, the answer then into the
        message; items open as their first text comes)."""
        parser = self.ctx.settings.reasoning_parser
        split_stream = ReasoningStream(parser) if parser is not None else None
        tally = _Tally(self)
        texts = {"reasoning": "", "content": ""}
        opened: list[str] = []   # the kinds of item opened, in output order

        def events(kind: str, part: str) -> list[str]:
            out = []
            if kind not in opened:
                if opened:   # the reasoning item ends as the answer begins
                    out += self._close_live("reasoning", 0, texts["reasoning"], [])
                opened.append(kind)
                index = len(opened) - 1
                if kind == "reasoning":
                    out.append(self.event("response.output_item.added", output_index=index,
                                          item=self.reasoning_item("in_progress", None)))
                else:
                    out.append(self.event("response.output_item.added", output_index=index,
                                          item=self.item("in_progress", None)))
                    out.append(self.event("response.content_part.added", item_id=self.item_id, output_index=index,
                                          content_index=0, part=self.part("")))
            texts[kind] += part
            index = opened.index(kind)
            if kind == "reasoning":
                out.append(self.event("response.reasoning_text.delta", item_id=self.reasoning_id, output_index=index,
                                      content_index=0, delta=part))
            else:
                out.append(self.event("response.output_text.delta", item_id=self.item_id, output_index=index,
                                      content_index=0, delta=part, logprobs=tally.unsent_logprobs()))
            return out

        async for _, output in merge_streams(streams):
            completion = tally.add(output)
            parts = split_stream.feed(completion.text, completion.finish_reason is not None) if split_stream \
                else [("content", completion.text)] if completion.text else []
            for kind, part in parts:
                for event in events(kind, part):
                    yield event
        if not opened:   # nothing came: an empty message, as the whole response has
            opened.append("content")
            yield self.event("response.output_item.added", output_index=0, item=self.item("in_progress", None))
            yield self.event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                             part=self.part(""))
        for event in self._close_live(opened[-1], len(opened) - 1, texts[opened[-1]], tally.logprobs):
            yield event
        yield self._finished(tally.body())

    def _close_live(self, kind: str, index: int, text: str, logprobs: list[dict[str, Any]]) -> list[str]:
        if kind == "reasoning":
            return [self.event("response.reasoning_text.done", item_id=self.reasoning_id, output_index=index,
                               content_index=0, text=text),
                    self.event("response.output_item.done", output_index=index,
                               item=self.reasoning_item("completed", text))]
        where = {"item_id": self.item_id, "output_index": index, "content_index": 0}
        return [self.event("response.output_text.done", **where, text=text, logprobs=logprobs),
                self.event("response.content_part.done", **where, part=self.part(text, logprobs)),
                self.event("response.output_item.done", output_index=index,
                           item=self.item("completed", text, logprobs))]

    async def _held_events(self, streams: list) -> AsyncIterator[str]:
        """With tools: the output is parsed once it ends, then each item is sent as OpenAI streams it
        (a message's text in one delta, a call's arguments in one delta)."""
        tally = _Tally(self)
        async for _, output in merge_streams(streams):
            tally.add(output)
        final = tally.body()
        for index, item in enumerate(final["output"]):
            yield self.event("response.output_item.added", output_index=index,
                             item={**item, "status": "in_progress",
                                   **({"arguments": ""} if item["type"] == "function_call" else {"content": []})})
            if item["type"] == "reasoning":
                thought = item["content"][0]["text"]
                yield self.event("response.reasoning_text.delta", item_id=item["id"], output_index=index,
                                 content_index=0, delta=thought)
                yield self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                 content_index=0, text=thought)
            elif item["type"] == "message":
                where = {"item_id": item["id"], "output_index": index, "content_index": 0}
                content = item["content"][0]["text"]
                yield self.event("response.content_part.added", **where, part=self.part(""))
                yield self.event("response.output_text.delta", **where, delta=content, logprobs=[])
                yield self.event("response.output_text.done", **where, text=content, logprobs=[])
                yield self.event("response.content_part.done", **where, part=self.part(content))
            else:
                where = {"item_id": item["id"], "output_index": index}
                yield self.event("response.function_call_arguments.delta", **where, delta=item["arguments"])
                yield self.event("response.function_call_arguments.done", **where, arguments=item["arguments"],
                                 name=item["name"])
            yield self.event("response.output_item.done", output_index=index, item=item)
        yield self._finished(final)
