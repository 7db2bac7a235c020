"""The language model over OpenAI's Responses API (``POST /v1/responses``, streamed), for a
backend that has it (``PIPELINE_LLM_API=responses``); ``pipeline.openai_providers`` speaks Chat
Completions.

I/O layer, like its sibling: one streaming method through the SDK's client (its auth, base URL
and stream parsing into ``ResponseStreamEvent``), the SDK's exceptions mapped to
``ProviderError`` and nothing more (the client has ``max_retries=0``; retries are the
resilience wrapper's). Each request carries the whole conversation, as the chat request does:

- leading system messages are the request's ``instructions``; the rest are ``input`` items:
  user and assistant ``message``s (a user's images as ``input_image`` parts after its
  ``input_text``), an assistant's tool calls as ``function_call`` items and
  their results as ``function_call_output`` (a later system message stays a ``system``
  message);
- tools are function tools in the flat Responses shape, ``strict: false`` (as a chat tool is:
  a client's schema need not be a strict one); a tool choice other than "auto" is sent, and
  ``parallel_tool_calls: false`` and ``reasoning: {effort}`` as the chat request sends theirs
  (``OpenAIModelClient``);
- ``store: false``: the backend keeps nothing, as nothing refers to it later;
- the response's own ``max_output_tokens`` is not sent: the engine counts the stream and stops
  reading at the session's limit, for either API (the Responses minimum of 16 would refuse a
  smaller limit a session may set).

The stream's events: ``response.output_text.delta`` is text; a ``function_call`` output item
is a tool call once ``response.output_item.done`` carries it whole (its arguments from
``response.function_call_arguments.delta``/``done`` are checked against it);
``response.completed`` or ``response.incomplete`` end it with the usage; ``response.failed``
and ``error`` are the server's failure (retryable); a stream that ends without any of them too.
The SDK builds each event without checking it: an event that is not a JSON object, or a field
read here of another type than the API's, is the server's failure too (``streamed_json``: not
retryable, the message names the field).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any

import openai
from openai.types.responses import (
    EasyInputMessageParam,
    FunctionToolParam,
    Response,
    ResponseFunctionToolCall,
    ResponseInputItemParam,
    ResponseInputMessageContentListParam,
    ResponseStreamEvent,
    ToolChoiceFunctionParam,
)
from openai.types.responses.response_create_params import (
    ResponseCreateParamsStreaming,
)
from openai.types.responses.response_create_params import ToolChoice as ToolChoiceParam
from openai.types.responses.response_input_item_param import FunctionCallOutput

from pipeline.openai_providers import (
    TRANSPORT_ERRORS,
    OpenAIModelClient,
    decoded,
    provider_error,
)
from pipeline.providers import (
    ForcedTool,
    LanguageModelEvent,
    Message,
    ProviderError,
    TextDelta,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)
from pipeline.streamed_json import StreamShapeError, count_of, kind, text_of


class OpenAIResponsesLanguageModel(OpenAIModelClient):
    """The Responses API, streamed: text deltas as they come, tool calls once complete, usage."""

    KIND = "openai-responses"

    def effort_field(self, effort: str) -> dict[str, Any]:
        """A reasoning effort as the Responses API takes it: ``reasoning: {effort}``."""
        return {"reasoning": {"effort": effort}}

    async def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], choice: ToolChoice = "auto"
    ) -> AsyncGenerator[LanguageModelEvent, None]:
        try:
            # Posted as is, as the chat body is (``openai_providers``): the SDK's
            # ``responses.create`` would first walk it through its TypedDict transformer,
            # measured at 185 ms of event-loop CPU for 300 input items on this machine.
            stream = await self._client.post(
                "/responses",
                body={
                    **request_body(self.model, messages, tools, choice),
                    **self.option_fields(tools),
                },
                cast_to=Response,
                stream=True,
                stream_cls=openai.AsyncStream[ResponseStreamEvent],
            )
            async with stream:
                async for event in self._events(decoded(stream, "Responses event")):
                    yield event
        except (openai.OpenAIError, StreamShapeError, *TRANSPORT_ERRORS) as error:
            raise provider_error(self.name, error) from error

    async def _events(self, stream: AsyncIterator[object]) -> AsyncIterator[LanguageModelEvent]:
        arguments: dict[str, str] = {}  # function_call item id -> its arguments as streamed
        async for value in stream:
            event, kind = _event(value)
            if kind == "response.output_text.delta":
                yield TextDelta(_text(event, "delta"))
            elif kind == "response.function_call_arguments.delta":
                item_id = _text(event, "item_id")
                arguments[item_id] = arguments.get(item_id, "") + _text(event, "delta")
            elif kind == "response.function_call_arguments.done":
                arguments[_text(event, "item_id")] = _text(event, "arguments")
            elif kind == "response.output_item.done":
                if isinstance(item := _item(event), ResponseFunctionToolCall):
                    yield self._tool_call(item, arguments)
            elif kind in ("response.completed", "response.incomplete"):
                if (usage := _usage(event)) is not None:
                    yield usage
                return
            elif kind in ("response.failed", "error"):
                raise ProviderError(self.name, _failure(event, kind), retryable=True)
        raise ProviderError(self.name, "stream ended without response.completed", retryable=True)

    def _tool_call(self, item: ResponseFunctionToolCall, streamed: dict[str, str]) -> ToolCall:
        """The call as its done item carries it; streamed arguments that differ are an error."""
        call_id, name, arguments = (_text(item, f) for f in ("call_id", "name", "arguments"))
        item_id = _text(item, "id") or None
        if item_id is not None and streamed.get(item_id, arguments) != arguments:
            message = f"function call {call_id}: streamed arguments differ from the item's"
            raise ProviderError(self.name, message, retryable=True)
        return ToolCall(call_id, name, arguments)


def _event(value: object) -> tuple[openai.BaseModel, str]:
    """A streamed event as the SDK built it, and its type; StreamShapeError when the server's
    JSON was not an object with a string ``type``."""
    if not isinstance(value, openai.BaseModel):
        raise StreamShapeError(f"Responses event is {kind(value)}, not an object")
    return value, text_of(getattr(value, "type", None), "Responses event.type")


def _text(model: openai.BaseModel, name: str) -> str:
    """A string field of an event or item ("" when absent or null)."""
    where = f"{text_of(getattr(model, 'type', None), 'type')}.{name}"
    return text_of(getattr(model, name, None), where)


def _item(event: openai.BaseModel) -> openai.BaseModel | None:
    """The item a ``response.output_item.done`` event carries (None when absent or null);
    StreamShapeError when it is not an object."""
    item = getattr(event, "item", None)
    if item is not None and not isinstance(item, openai.BaseModel):
        raise StreamShapeError(f"{_text(event, 'type')}.item is {kind(item)}, not an object")
    return item


def _usage(event: openai.BaseModel) -> Usage | None:
    """The usage a ``response.completed`` or ``response.incomplete`` event carries, if any."""
    response = getattr(event, "response", None)
    if response is not None and not isinstance(response, openai.BaseModel):
        raise StreamShapeError(
            f"{_text(event, 'type')}.response is {kind(response)}, not an object"
        )
    usage = getattr(response, "usage", None)
    if usage is None:
        return None
    if not isinstance(usage, openai.BaseModel):
        raise StreamShapeError(f"the response's usage is {kind(usage)}, not an object")
    where = "the response's usage"
    input_tokens = count_of(getattr(usage, "input_tokens", None), f"{where}.input_tokens")
    output_tokens = count_of(getattr(usage, "output_tokens", None), f"{where}.output_tokens")
    return Usage(input_tokens, output_tokens)


def _failure(event: openai.BaseModel, kind: str) -> str:
    """What a ``response.failed`` or ``error`` event says went wrong (its fields as sent)."""
    if kind == "error":
        return f"error event: {getattr(event, 'code', None)}: {getattr(event, 'message', None)}"
    error = getattr(getattr(event, "response", None), "error", None)
    if error is not None:
        return f"response.failed: {getattr(error, 'code', None)}: {getattr(error, 'message', None)}"
    return kind


# --- the request ----------------------------------------------------------------------------


def request_body(
    model: str, messages: Sequence[Message], tools: Sequence[ToolSpec], choice: ToolChoice
) -> ResponseCreateParamsStreaming:
    """The streamed request, in wire shape (what ``responses.create`` would send)."""
    instructions, rest = split_instructions(messages)
    body: ResponseCreateParamsStreaming = {
        "model": model,
        "input": input_items(rest),
        "store": False,
        "stream": True,
    }
    if instructions:
        body["instructions"] = instructions
    if tools:
        body["tools"] = [function_tool(tool) for tool in tools]
        if choice != "auto":
            body["tool_choice"] = choice_param(choice)
    return body


def split_instructions(messages: Sequence[Message]) -> tuple[str, Sequence[Message]]:
    """The leading system messages, joined (the request's ``instructions``), and the rest."""
    lead = 0
    while lead < len(messages) and messages[lead].role == "system":
        lead += 1
    return "\n\n".join(m.content for m in messages[:lead] if m.content), messages[lead:]


def input_items(messages: Sequence[Message]) -> list[ResponseInputItemParam]:
    """The conversation as Responses ``input`` items."""
    return [item for message in messages for item in _items(message)]


def _items(message: Message) -> Iterator[ResponseInputItemParam]:
    if message.role == "tool":
        output: FunctionCallOutput = {
            "type": "function_call_output",
            "call_id": message.tool_call_id,
            "output": message.content,
        }
        yield output
        return
    if message.images:
        yield {"type": "message", "role": "user", "content": _user_content(message)}
    elif message.content or not message.tool_calls:
        text: EasyInputMessageParam = {
            "type": "message",
            "role": message.role,
            "content": message.content,
        }
        yield text
    for call in message.tool_calls:
        yield {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        }


def _user_content(message: Message) -> ResponseInputMessageContentListParam:
    """A user message's text, then its images, as ``input_text`` and ``input_image`` parts."""
    content: ResponseInputMessageContentListParam = []
    if message.content:
        content.append({"type": "input_text", "text": message.content})
    for image in message.images:
        detail: Any = image.detail
        content.append({"type": "input_image", "image_url": image.data_url, "detail": detail})
    return content


def function_tool(tool: ToolSpec) -> FunctionToolParam:
    """A ``ToolSpec`` as a Responses function tool (flat: no nested ``function``)."""
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": dict(tool.parameters),
        "strict": False,
    }


def choice_param(choice: ToolChoice) -> ToolChoiceParam:
    """A tool choice in the Responses shape."""
    if isinstance(choice, ForcedTool):
        forced: ToolChoiceFunctionParam = {"type": "function", "name": choice.name}
        return forced
    return choice
