"""The local language model's pure parts and its file: the lenient tool-call parser, the gate
that holds a possible call back from the voice, the history kept to the context, and the model
file assembled from its parts, verified, and refused when it is not the file it must be.

No model is loaded here (tests/test_local_llm.py loads the real one)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    ConfigError,
    LocalLlmConfig,
    PipelineConfig,
    default_llm_threads,
    usable_cores,
)
from pipeline.llama_llm import SPIN_COUNT, _Answer, _events, brief_openmp_spin, prompt_threads
from pipeline.local_llm_chat import (
    ToolCallGate,
    bare_tools,
    chat_messages,
    parse_tool_calls,
    recent_history,
    settled_call,
    system_prompt,
    time_answer,
    time_call,
)
from pipeline.local_llm_file import (
    QWEN_CODER_1_5B,
    ModelFile,
    ModelFileError,
    assemble,
    cached_model,
    verify,
)
from pipeline.providers import Message, ToolCall, ToolSpec

TOOLS = ["current_time", "lookup_knowledge"]


# --- the parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '```json\n{\n  "name": "current_time",\n  "arguments": {}\n}\n```',
        '```\n{"name": "current_time", "arguments": {}}\n```',
        '<tool_call>\n{"name": "current_time", "arguments": {}}\n</tool_call>',
        '{"name": "current_time", "arguments": {}}',
        '{{"name": "current_time", "arguments": {{}}}}',
        '```json\n{{"name": "current_time", "arguments": {{}}}}\n```',
        '[{"name": "current_time", "arguments": "{}"}]',
        '{"type": "function", "function": {"name": "current_time", "arguments": "{}"}}',
        '<tool_call>\n{"name": "current_time", "arguments": {}}',  # the closing tag cut off
    ],
    ids=[
        "json-fence",
        "bare-fence",
        "tags",
        "bare",
        "doubled-braces",
        "doubled-in-fence",
        "list-with-string-arguments",
        "openai-shape",
        "unclosed-tag",
    ],
)
def test_every_shape_the_model_writes_a_call_in_is_read(text: str) -> None:
    calls = parse_tool_calls(text, TOOLS)
    assert calls is not None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("current_time", {})
    ]


def test_arguments_survive_doubled_braces_and_the_parameters_key() -> None:
    doubled = '{{"name": "lookup_knowledge", "arguments": {{"query": "library hours"}}}}'
    named = '{"name": "lookup_knowledge", "parameters": {"query": "coffee"}}'
    for text, query in ((doubled, "library hours"), (named, "coffee")):
        (call,) = parse_tool_calls(text, TOOLS) or []
        assert json.loads(call.arguments) == {"query": query}


def test_two_calls_in_two_tags_are_both_read() -> None:
    text = (
        '<tool_call>{"name": "current_time", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "lookup_knowledge", "arguments": {"query": "moon"}}</tool_call>'
    )
    assert [call.name for call in parse_tool_calls(text, TOOLS) or []] == TOOLS


def test_a_call_of_a_tool_not_offered_is_dropped_and_text_is_no_call() -> None:
    assert parse_tool_calls('{"name": "set_timer", "arguments": {"minutes": 5}}', TOOLS) == []
    assert parse_tool_calls("The capital of France is Paris.", TOOLS) is None
    assert parse_tool_calls("```python\nprint(1)\n```", TOOLS) is None
    assert parse_tool_calls('{"name": "current_time", "arguments": {', TOOLS) is None


def test_unreadable_arguments_become_an_empty_object() -> None:
    (call,) = parse_tool_calls('{"name": "current_time", "arguments": "not json"}', TOOLS) or []
    assert call.arguments == "{}"


# --- the gate -------------------------------------------------------------------------------


def pushed(gate: ToolCallGate, pieces: list[str]) -> str:
    return "".join(gate.push(piece) for piece in pieces) + gate.finish()


def test_a_call_of_a_tool_without_arguments_is_settled_once_its_name_is_written() -> None:
    """As Qwen2.5-Coder writes it, token by token: settled after the name's closing quote,
    never before, never for a tool that takes arguments, a list or an echoed result."""
    lookup = ToolSpec("lookup_knowledge", "", {"type": "object", "properties": {"q": {}}})
    bare = bare_tools([ToolSpec("current_time", ""), lookup])
    assert bare == {"current_time"}
    written = '```json\n{\n  "name": "current_time",\n  "arguments": {}\n}\n```'
    end = written.index('current_time"') + len('current_time"')
    assert [settled_call(written[:n], bare) for n in range(end)] == [None] * end
    call = settled_call(written[:end], bare)
    assert call is not None and (call.name, call.arguments) == ("current_time", "{}")
    assert call.call_id.startswith("call_")
    for held in (
        '```json\n{"name": "lookup_knowledge", "arguments": {"q": "x"}}',
        '[{"name": "current_time"}, {"name": "lookup_knowledge"',
        '```json\n[\n  {"name": "current_time"',
        '<tool_response>\n{"name": "current_time", "content": "09:00"}',
        '{"name": "current_tim',
    ):
        assert settled_call(held, bare) is None, held
    for held in ('<tool_call>\n{"name": "current_time"', '{{"name": "current_time",'):
        assert settled_call(held, bare) is not None, held


async def streamed(pieces: list[str], dropped: frozenset[str]) -> tuple[list[Any], bool]:
    """The events ``pieces``, streamed as llama.cpp's chunks, become with the session's tools
    offered and ``dropped`` the tools whose calls are dropped; and whether the stream was told
    to stop."""
    answer = _Answer(asyncio.get_running_loop())
    for piece in pieces:
        answer.queue.put_nowait({"choices": [{"delta": {"content": piece}}]})
    answer.queue.put_nowait(None)
    tools = [ToolSpec("current_time", ""), ToolSpec("lookup_knowledge", "", LOOKUP_PARAMETERS)]
    return [event async for event in _events(answer, tools, dropped)], answer.stop.is_set()


LOOKUP_PARAMETERS = {"type": "object", "properties": {"query": {"type": "string"}}}
# as Qwen2.5-Coder writes a lookup, token by token (shortened)
LOOKUP_WRITTEN = ["```", "json", "\n{\n", '  "', "name", '":', ' "', "lookup", "_knowledge", '",']
LOOKUP_WRITTEN += [
    '\n  "',
    "arguments",
    '":',
    ' {"',
    "query",
    '":',
    ' "',
    "planets",
    '"}\n}',
    "\n```",
]


async def test_a_call_the_caller_drops_is_taken_once_its_name_is_written() -> None:
    """lookup_knowledge, when its calls are dropped anyway (the knowledge is in the prompt): the
    stream stops at the name's closing quote, its arguments never waited for; when they are
    not, the whole call is read, arguments and all."""
    events, stopped = await streamed(LOOKUP_WRITTEN, frozenset({"lookup_knowledge"}))
    assert stopped and [(e.name, e.arguments) for e in events] == [("lookup_knowledge", "{}")]
    events, stopped = await streamed(LOOKUP_WRITTEN, frozenset())
    assert not stopped
    assert [(e.name, json.loads(e.arguments)) for e in events] == [
        ("lookup_knowledge", {"query": "planets"})
    ]
    events, stopped = await streamed(["The ", "answer ", "is ", "144."], frozenset(TOOLS))
    assert not stopped and "".join(e.text for e in events) == "The answer is 144."


def test_text_passes_the_gate_as_soon_as_it_cannot_be_a_call() -> None:
    gate = ToolCallGate(tools_offered=True)
    assert gate.push("The") == "The"
    assert gate.push(" capital") == " capital"
    assert not gate.holding


def test_the_gate_holds_a_fence_a_tag_or_json_until_the_end() -> None:
    for pieces in (
        ["``", "`json\n{", '"name"'],
        ["<", "tool", "_call>"],
        [" ", "{", "{"],
        ["<tool_res", "ponse>\n{}"],  # an echoed tool result: never spoken
    ):
        gate = ToolCallGate(tools_offered=True)
        assert pushed(gate, pieces) == ""
        assert gate.holding and gate.held == "".join(pieces)


def test_an_undecided_start_is_spoken_when_it_turns_out_to_be_text() -> None:
    gate = ToolCallGate(tools_offered=True)
    assert gate.push("<") == ""
    assert gate.push("3 is a heart") == "<3 is a heart"
    assert pushed(ToolCallGate(tools_offered=True), ["`"]) == "`"


def test_without_tools_nothing_is_held() -> None:
    gate = ToolCallGate(tools_offered=False)
    assert gate.push("{not a call}") == "{not a call}"


# --- the request ----------------------------------------------------------------------------


def test_our_system_prompt_comes_first_and_says_what_the_model_cannot_do() -> None:
    prompt = system_prompt(["The moon", "Coffee", "Water"], ["Coffee: It is made of beans."])
    assert "cannot set timers" in prompt and "the moon, coffee or water" in prompt
    assert prompt.endswith("Notes for lookup_knowledge: Coffee: It is made of beans.")
    assert "Notes" not in system_prompt(["Big"], ["x" * 5000])
    messages = chat_messages([Message("system", "Be brief."), Message("user", "Hi")], prompt)
    assert messages[0] == {"role": "system", "content": prompt + "\n\nBe brief."}
    assert messages[1:] == [{"role": "user", "content": "Hi"}]


def test_tool_calls_and_results_keep_their_ids() -> None:
    call = ToolCall("call_1", "current_time", "{}")
    messages = chat_messages(
        [
            Message("user", "Time?"),
            Message("assistant", "", (call,)),
            Message("tool", '{"time": "10:00"}', tool_call_id="call_1"),
        ],
        "S",
    )
    assert messages[2]["tool_calls"][0]["id"] == "call_1"
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "10:00"}'}


def test_the_history_is_cut_from_the_oldest_and_starts_at_a_user_message() -> None:
    call = ToolCall("call_1", "current_time", "{}")
    old = [Message("user", "x" * 3000), Message("assistant", "y" * 3000)]
    recent = [
        Message("user", "Time?"),
        Message("assistant", "", (call,)),
        Message("tool", "{}", tool_call_id="call_1"),
    ]
    kept = recent_history([Message("system", "S"), *old, *recent], budget_tokens=500)
    assert kept == [Message("system", "S"), *recent]
    assert recent_history([Message("user", "z" * 9000)], 10) == [Message("user", "z" * 9000)]


# --- configuration --------------------------------------------------------------------------


def test_the_llm_choices_are_rule_local_and_openai() -> None:
    assert PipelineConfig().resolved({}).llm == "rule"
    assert PipelineConfig.from_env({"PIPELINE_LLM": "local"}).llm == "local"
    with pytest.raises(ConfigError, match="must be one of rule, local, openai"):
        PipelineConfig.from_env({"PIPELINE_LLM": "llama"})
    with pytest.raises(ConfigError, match="max_tokens must be >= 1 and under half"):
        PipelineConfig.from_env({"PIPELINE_LOCAL_LLM_MAX_TOKENS": "4000"})
    config = PipelineConfig.from_env({"PIPELINE_LOCAL_LLM_THREADS": "3"})
    assert config.local_llm_config() == LocalLlmConfig(threads=3)


def test_the_prompt_is_read_on_twice_the_threads_within_the_cores_unless_told() -> None:
    cores = usable_cores()
    assert prompt_threads(LocalLlmConfig(threads=1)) == min(cores, 2)
    assert prompt_threads(LocalLlmConfig(threads=cores)) == cores
    told = PipelineConfig.from_env({"PIPELINE_LOCAL_LLM_PROMPT_THREADS": "1"})
    assert prompt_threads(told.local_llm_config()) == 1
    with pytest.raises(ConfigError, match="prompt_threads must be within 0..64, got 65"):
        PipelineConfig.from_env({"PIPELINE_LOCAL_LLM_PROMPT_THREADS": "65"})


def test_openmp_threads_wait_briefly_unless_libgomp_is_already_loaded_or_told() -> None:
    environ: dict[str, str] = {}
    assert brief_openmp_spin(environ, "7f00-7f01 r-xp /usr/lib/libc.so.6\n") is None
    assert environ == {"GOMP_SPINCOUNT": SPIN_COUNT} and int(SPIN_COUNT) < 300_000
    for told in ({"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "50"}):
        before = dict(told)
        assert brief_openmp_spin(told, "") is None and told == before
    late: dict[str, str] = {}
    why = brief_openmp_spin(late, "7f00-7f01 r-xp /lib/x86_64-linux-gnu/libgomp.so.1\n")
    assert why is not None and "libgomp was loaded before" in why and late == {}


def test_only_the_local_model_speaks_its_first_words_as_a_chunk_of_their_own() -> None:
    def first_words(environ: dict[str, str]) -> int:
        return PipelineConfig.from_env(environ).engine_config().chunker.first_words

    assert first_words({"PIPELINE_LLM": "local"}) == 3
    assert first_words({"PIPELINE_LLM": "local", "PIPELINE_LOCAL_LLM_FIRST_WORDS": "5"}) == 5
    assert first_words({"PIPELINE_LLM": "local", "PIPELINE_LOCAL_LLM_FIRST_WORDS": "0"}) == 0
    assert first_words({"PIPELINE_LLM": "rule"}) == 0
    assert first_words({"PIPELINE_LLM": "openai"}) == 0
    with pytest.raises(ConfigError, match="local llm first_words must be within 0..50"):
        PipelineConfig.from_env({"PIPELINE_LLM": "rule", "PIPELINE_LOCAL_LLM_FIRST_WORDS": "-1"})


def test_the_local_model_reads_the_words_ahead_only_when_told_to() -> None:
    def read_ahead(environ: dict[str, str]) -> bool:
        return PipelineConfig.from_env(environ).local_llm_config().read_ahead

    assert read_ahead({}) is False
    assert read_ahead({"PIPELINE_LOCAL_LLM_READ_AHEAD": "1"}) is True
    assert read_ahead({"PIPELINE_LOCAL_LLM_READ_AHEAD": "false"}) is False


def test_the_local_model_reads_the_next_turns_header_unless_told_not_to() -> None:
    def reads(environ: dict[str, str]) -> bool:
        return PipelineConfig.from_env(environ).local_llm_config().read_next_header

    assert reads({}) is True
    assert reads({"PIPELINE_LOCAL_LLM_READ_NEXT_HEADER": "0"}) is False
    assert reads({"PIPELINE_LOCAL_LLM_READ_NEXT_HEADER": "true"}) is True


# --- the model file -------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path: Path) -> tuple[list[Path], ModelFile]:
    """Three small parts and the model file they must join into."""
    folder = tmp_path / "parts"
    folder.mkdir()
    slices = [bytes([index]) * (1000 + index) for index in range(3)]
    paths = []
    for index, data in enumerate(slices):
        paths.append(folder / f"part{index:02d}.bin")
        paths[-1].write_bytes(data)
    whole = b"".join(slices)
    model = ModelFile("small.gguf", len(whole), hashlib.sha256(whole).hexdigest(), ("a", "b", "c"))
    return paths, model


def test_the_parts_join_into_the_model_file(
    parts: tuple[list[Path], ModelFile], tmp_path: Path
) -> None:
    paths, model = parts
    target = tmp_path / "cache" / model.file_name
    assemble(paths, target, model)
    verify(target, model)
    assert target.read_bytes() == b"".join(path.read_bytes() for path in paths)
    assert [path.name for path in target.parent.iterdir()] == [model.file_name]  # no leftovers


def test_a_tampered_part_is_refused_and_leaves_nothing_behind(
    parts: tuple[list[Path], ModelFile], tmp_path: Path
) -> None:
    paths, model = parts
    data = bytearray(paths[1].read_bytes())
    data[10] ^= 1
    paths[1].write_bytes(bytes(data))
    target = tmp_path / "cache" / model.file_name
    with pytest.raises(ModelFileError, match=r"sha256 [0-9a-f]{64}, expected .*refusing"):
        assemble(paths, target, model)
    assert list(target.parent.iterdir()) == []


def test_a_truncated_or_altered_file_is_refused(
    parts: tuple[list[Path], ModelFile], tmp_path: Path
) -> None:
    paths, model = parts
    target = tmp_path / model.file_name
    assemble(paths, target, model)
    whole = target.read_bytes()
    target.write_bytes(whole[:-1])
    with pytest.raises(ModelFileError, match=rf"{len(whole) - 1} bytes, expected {len(whole)}"):
        verify(target, model)
    target.write_bytes(whole[:-1] + b"\xff")
    with pytest.raises(ModelFileError, match=f"expected {model.sha256}: refusing to load it"):
        verify(target, model)
    with pytest.raises(ModelFileError, match="no such file"):
        verify(tmp_path / "absent.gguf", model)


def test_a_missing_part_distribution_names_the_extra(tmp_path: Path) -> None:
    absent = ModelFile("x.gguf", 1, "0" * 64, ("voicerelay-no-such-model-part",))
    with pytest.raises(ModelFileError, match="not installed: install the local-llm extra"):
        cached_model(tmp_path, absent)


def test_the_real_model_is_pinned_to_qwens_release() -> None:
    assert QWEN_CODER_1_5B.size_bytes == 1_117_320_768
    assert QWEN_CODER_1_5B.sha256.startswith("cc324af070c2ecbf")
    assert len(QWEN_CODER_1_5B.part_distributions) == 22


# --- make run LLM=local -----------------------------------------------------------------------


def test_make_run_passes_the_llm_choice_to_the_transceivers() -> None:
    from deploy import local

    chosen = local.parse_args(["--llm", "local", "--no-redis"])
    (transceiver, relay) = local.commands(chosen, local.random_keyring(), None)
    assert transceiver.env["PIPELINE_LLM"] == "local" and "PIPELINE_LLM" not in relay.env
    assert transceiver.ready_timeout_s == local.LOCAL_LLM_READY_TIMEOUT_S
    assert local.parse_args(["--no-redis"]).llm == os.environ.get("PIPELINE_LLM", "")
    with pytest.raises(SystemExit):
        local.parse_args(["--llm", "llama"])


ASKING_THE_TIME = [
    "What time is it?",
    "So, what time is it?",
    "what's the time now",
    "Hey, what is the time?",
    "Do you know what time it is?",
    "Could you tell me the time, please?",
    "What day is it today?",
    "What's the date?",
    "What is today's date?",
    "Give me the current time.",
    "Got the time?",
    "What time do you have?",
    "How late is it?",
    "What hour is it?",
    "What year is it?",
    "What month is it now?",
    "So what's today?",
]
ASKING_SOMETHING_ELSE = [
    "What time does the library open?",
    "Tell me about the time machine.",
    "Is it time for lunch?",
    "What did you say the day before?",
    "I had a great time.",
    "Which planet is the biggest?",
    "What's today's weather like?",
    "What year was the library built?",
]


def test_a_turn_asking_the_time_calls_current_time_when_it_is_offered() -> None:
    offered = ["current_time", "lookup_knowledge"]
    for words in ASKING_THE_TIME:
        call = time_call([Message("system", "x"), Message("user", words)], offered)
        assert call is not None and (call.name, call.arguments) == ("current_time", "{}"), words
    calls = [time_call([Message("user", w)], offered) for w in ASKING_THE_TIME[:2]]
    assert calls[0] is not None and calls[1] is not None and calls[0].call_id != calls[1].call_id
    for words in ASKING_SOMETHING_ELSE:
        assert time_call([Message("user", words)], offered) is None, words
    asked = [Message("user", "What time is it?")]
    assert time_call(asked, ["lookup_knowledge"]) is None  # not offered
    answered = [*asked, Message("tool", '{"time": "09:00"}', tool_call_id="c1")]
    assert time_call(answered, offered) is None  # its result is in: the model words it
    assert time_call([Message("system", "What time is it?")], offered) is None


def time_turn(question: str, result: str, extra: tuple[Message, ...] = ()) -> list[Message]:
    """A turn ``time_call`` took: the question, our call, and the tool's ``result``."""
    call = ToolCall("c1", "current_time", "{}")
    return [
        *extra,
        Message("user", question),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", result, tool_call_id="c1"),
    ]


OUR_RESULT = '{"time": "13:05", "date": "Monday 2 March 2026", "timezone": "UTC"}'


def test_a_time_turn_is_answered_from_the_tools_result_by_what_it_asked() -> None:
    asked = {
        "What time is it?": "It is one oh five in the afternoon, UTC.",
        "So, what's the time now?": "It is one oh five in the afternoon, UTC.",
        "What year is it?": "It is 2026.",
        "What month is it now?": "It is March 2026.",
        "What's the date today?": "Today is Monday 2 March 2026.",
        "What day is it?": "Today is Monday 2 March 2026.",
        "So what's today?": "Today is Monday 2 March 2026.",
        "What's the date and time?": (
            "It is one oh five in the afternoon, UTC, Monday 2 March 2026."
        ),
    }
    for question, answer in asked.items():
        assert time_answer(time_turn(question, OUR_RESULT)) == answer, question
    for question in ASKING_THE_TIME:
        assert time_answer(time_turn(question, OUR_RESULT)) is not None, question


def test_a_time_turn_is_left_to_the_model_where_a_fixed_answer_would_not_do() -> None:
    assert time_answer([Message("user", "What time is it?")]) is None  # no result yet
    instructed = (Message("system", "Always answer in French."),)
    assert time_answer(time_turn("What time is it?", OUR_RESULT, instructed)) is None
    assert time_answer(time_turn("What time is it in Tokyo?", OUR_RESULT)) is None
    for words in ASKING_SOMETHING_ELSE:  # the model's own call of the tool
        assert time_answer(time_turn(words, OUR_RESULT)) is None, words
    for result in (
        '{"hour": 13, "minute": 5}',  # a client's own tool: no date as ours says it
        '{"time": "13:05", "date": "2026-03-02"}',
        '{"time": "25:05", "date": "Monday 2 March 2026"}',
        "not json",
        '["13:05"]',
    ):
        assert time_answer(time_turn("What time is it?", result)) is None, result
    looked_up = time_turn("What time is it?", OUR_RESULT)
    looked_up[1] = Message("assistant", "", tool_calls=(ToolCall("c1", "lookup_knowledge", "{}"),))
    assert time_answer(looked_up) is None


def test_the_model_writes_on_half_the_cores_but_two_where_there_are_two() -> None:
    assert [default_llm_threads(cores) for cores in (1, 2, 3, 4, 6, 8, 16, 64)] == [
        1, 2, 2, 2, 3, 4, 8, 8
    ]  # fmt: skip
    assert LocalLlmConfig().resolved_threads == default_llm_threads(usable_cores())
    assert LocalLlmConfig(threads=1).resolved_threads == 1
