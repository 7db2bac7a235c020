"""The GA session's fields beyond audio, tools and instructions: ``truncation``, ``reasoning``,
``parallel_tool_calls``, ``tracing``, ``prompt`` and ``include``
(``openai.types.realtime.RealtimeSessionCreateRequest``; ``client_events`` reads the rest).

Pure protocol layer: a ``session`` object's values in, validated settings out, an
``EventError`` naming the field otherwise. What each does here:

- ``truncation``: ``"auto"`` (the default), ``"disabled"`` or ``{"type": "retention_ratio",
  "retention_ratio", "token_limits": {"post_instructions"}}``: how much of the conversation the
  model is sent (``pipeline.context_window``; ``policy`` maps it). ``auto`` cuts at
  ``AUTO_BUDGET_TOKENS``, keeping all it can; ``disabled`` never cuts.
- ``reasoning`` ``{effort}``: validated and reported; sent to an OpenAI-compatible language
  model that takes an effort (by its name's family, unless the deployment says:
  ``PIPELINE_OPENAI_LLM_REASONING``), else not sent; the offline models ignore it.
- ``parallel_tool_calls``: a boolean; ``false`` is sent to an OpenAI-compatible model with the
  tools, and the engine makes only the first call of a model turn that still makes several
  (``pipeline.response``); ``true`` (the default) runs every call, one after another.
  OpenAI's session object does not report it.
- ``tracing``: ``"auto"``, ``{workflow_name, group_id, metadata}`` or ``null``, reported as
  set; traces go to OpenTelemetry when ``OTEL_*`` asks, never to OpenAI's dashboard.
- ``prompt``: a saved prompt lives on OpenAI's platform, which this server does not reach:
  refused (``null`` is accepted). ``include``: its one value asks for the input
  transcription's logprobs (``[]`` and ``null``: none); the policy refuses it when the
  deployment's speech-to-text gives none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transceiver.realtime.event_errors import EventError, refuse_unknown

# OpenAI's example in the SDK: a 32k-token model with 4,096 output tokens keeps 28,224 tokens
# of conversation after the instructions.
AUTO_BUDGET_TOKENS = 28_224
TRUNCATION_KEYS = frozenset({"type", "retention_ratio", "token_limits"})
REASONING_EFFORTS = ("minimal", "low", "medium", "high", "xhigh")
TRACING_KEYS = frozenset({"workflow_name", "group_id", "metadata"})
LOGPROBS = "item.input_audio_transcription.logprobs"  # ``include``'s one value
FIELDS = ("truncation", "reasoning", "parallel_tool_calls", "tracing", "prompt", "include")


@dataclass(frozen=True)
class Truncation:
    type: str = "auto"  # "auto", "disabled", "retention_ratio"
    retention_ratio: float = 1.0
    post_instructions_tokens: int | None = None  # None: AUTO_BUDGET_TOKENS

    @property
    def budget_tokens(self) -> int | None:
        """The conversation's budget (None: never cut)."""
        if self.type == "disabled":
            return None
        return self.post_instructions_tokens or AUTO_BUDGET_TOKENS

    def to_json(self) -> str | dict[str, Any]:
        if self.type != "retention_ratio":
            return self.type
        body: dict[str, Any] = {"type": self.type, "retention_ratio": self.retention_ratio}
        if self.post_instructions_tokens is not None:
            body["token_limits"] = {"post_instructions": self.post_instructions_tokens}
        return body


def parse_fields(session: Mapping[str, Any]) -> dict[str, Any]:
    """The ``SessionConfig`` changes these fields of a ``session`` object make."""
    changes: dict[str, Any] = {}
    if session.get("truncation") is not None:
        changes["truncation"] = _truncation(session["truncation"])
    if "reasoning" in session:
        changes["reasoning_effort"] = _reasoning(session["reasoning"])
    if session.get("parallel_tool_calls") is not None:
        changes["parallel_tool_calls"] = _boolean(session, "parallel_tool_calls")
    if "tracing" in session:
        changes["tracing"] = _tracing(session["tracing"])
    if session.get("prompt") is not None:
        message = "saved prompts are not available here: put the prompt in 'instructions'"
        raise EventError("invalid_value", message, "session.prompt")
    if "include" in session:
        changes["include_logprobs"] = _include(session["include"])
    return changes


def _truncation(value: Any) -> Truncation:
    path = "session.truncation"
    if value in ("auto", "disabled"):
        return Truncation(value)
    if not isinstance(value, dict):
        supported = "'auto', 'disabled' or a retention_ratio object"
        raise EventError("invalid_value", f"{path} must be {supported}", path)
    refuse_unknown(value, TRUNCATION_KEYS, path + ".")
    if value.get("type") != "retention_ratio":
        message = f"Invalid value: {value.get('type')!r}. Supported values are: 'retention_ratio'."
        raise EventError("invalid_value", message, path + ".type")
    ratio = value.get("retention_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        message = "retention_ratio must be a number in [0.0, 1.0]"
        raise EventError("invalid_value", message, path + ".retention_ratio")
    return Truncation("retention_ratio", float(ratio), _post_instructions(value, path))


def _post_instructions(value: Mapping[str, Any], path: str) -> int | None:
    limits = value.get("token_limits")
    if limits is None:
        return None
    path += ".token_limits"
    if not isinstance(limits, dict):
        raise EventError("invalid_type", f"{path} must be an object", path)
    refuse_unknown(limits, frozenset({"post_instructions"}), path + ".")
    tokens = limits.get("post_instructions")
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        message = "post_instructions must be a positive integer (tokens)"
        raise EventError("invalid_value", message, path + ".post_instructions")
    return tokens


def _reasoning(value: Any) -> str | None:
    path = "session.reasoning"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"{path} must be an object or null", path)
    refuse_unknown(value, frozenset({"effort"}), path + ".")
    effort = value.get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        names = ", ".join(repr(name) for name in REASONING_EFFORTS)
        message = f"Invalid value: {effort!r}. Supported values are: {names}."
        raise EventError("invalid_value", message, path + ".effort")
    return str(effort) if effort is not None else None


def _boolean(session: Mapping[str, Any], key: str) -> bool:
    value = session[key]
    if not isinstance(value, bool):
        raise EventError("invalid_type", f"session.{key} must be a boolean", f"session.{key}")
    return value


def _tracing(value: Any) -> str | dict[str, Any] | None:
    path = "session.tracing"
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    if not isinstance(value, dict):
        raise EventError("invalid_value", f"{path} must be 'auto', an object or null", path)
    refuse_unknown(value, TRACING_KEYS, path + ".")
    for key in ("workflow_name", "group_id"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise EventError("invalid_type", f"{path}.{key} must be a string", f"{path}.{key}")
    return dict(value)


def _include(value: Any) -> bool:
    """Whether ``include`` asks for the transcription's logprobs (its one value)."""
    return include_logprobs(value, "session.include")


def include_logprobs(value: Any, path: str) -> bool:
    """An ``include`` array (or null) read: whether it names ``LOGPROBS``, the one value OpenAI
    takes (EventError naming ``path`` otherwise). Whether the speech-to-text gives them is
    the deployment's to say (``policy``)."""
    if value is None:
        return False
    if not isinstance(value, list):
        raise EventError("invalid_type", f"{path} must be an array", path)
    for index, item in enumerate(value):
        if item != LOGPROBS:
            message = f"Invalid value: {item!r}. Supported values are: {LOGPROBS!r}."
            raise EventError("invalid_value", message, f"{path}[{index}]")
    return bool(value)
