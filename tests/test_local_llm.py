"""The local language model for real: Qwen2.5-Coder-1.5B from the lock's ``local-llm`` extra,
assembled, verified and loaded once for the module, answering through the voice pipeline
(webrtcvad, pocketsphinx, piper; nothing faked).

A spoken question is answered ("Paris"), a follow-up needs the previous turn, a question about
the time goes through the tool, a barge-in stops the generation, and the process rests between
turns (no native thread left spinning).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest

from deploy.processes import Process, free_port, random_keys, text, transceiver_process
from loadtest import local_llm_first_chunk as first_chunk
from loadtest.bench_turn_replay import play
from loadtest.voice_audio import recognised, silence_pcm, spoken_pcm
from pipeline import events as ev
from pipeline.assembly import build_engine, open_providers
from pipeline.config import ChunkerConfig, EngineConfig, LocalLlmConfig, PipelineConfig
from pipeline.engine import ConversationEngine
from pipeline.knowledge import load_knowledge
from pipeline.llama_llm import LlamaCppLanguageModel
from pipeline.local_llm_chat import time_call
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import Message, TextDelta, ToolCall
from pipeline.tools import ToolRegistry, builtin_tools
from transceiver.metrics import SubstitutesCollector

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

RATE_HZ = 16000
OUT_RATE_HZ = 24000
KNOWLEDGE = load_knowledge()
TOOLS = [tool.spec for tool in builtin_tools(KNOWLEDGE)]  # as the model is warmed with them
NINE_AM = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# The suite runs a test file per core, so the cores are never free: one thread writes there as
# fast as two (pipeline.config.default_llm_threads) and leaves the other file its core; it reads
# prompts for less CPU too (the 299 tokens of a start's warm-up, load 5-6: 8.8 and 10.4 CPU-s
# against 11.9 and 13.9 with two, the threads waiting for each other)
THREADS = 1


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def model() -> AsyncIterator[LlamaCppLanguageModel]:
    facts = [f"{entry.title}: {entry.answer}" for entry in KNOWLEDGE.entries]
    # (read_ahead: off by default)
    config = LocalLlmConfig(read_ahead=True, threads=THREADS, prompt_threads=THREADS)
    llm = LlamaCppLanguageModel(config, topics=KNOWLEDGE.titles, facts=facts, warm_tools=TOOLS)
    await llm.start()
    yield llm
    await llm.aclose()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sphinx() -> AsyncIterator[PocketsphinxSpeechToText]:
    stt = PocketsphinxSpeechToText()
    await stt.start()
    yield stt
    await stt.aclose()


def make_engine(
    stt: PocketsphinxSpeechToText,
    llm: LlamaCppLanguageModel,
    tts: PiperTextToSpeech,
    *,
    speak: bool = True,
    clock: Callable[[], datetime] = lambda: NINE_AM,
    instructions: str = "",
) -> ConversationEngine:
    chunker = ChunkerConfig(first_words=llm.config.first_words)  # as PIPELINE_LLM=local has it
    config = EngineConfig(
        RATE_HZ,
        OUT_RATE_HZ,
        realtime_playout=False,
        speak=speak,
        chunker=chunker,
        instructions=instructions,
    )
    tools = ToolRegistry(builtin_tools(KNOWLEDGE, clock))
    return ConversationEngine(config, stt, llm, tts, tools)


async def collect_until(
    engine: ConversationEngine, done: Callable[[Any], bool], timeout_s: float = 120
) -> list[Any]:
    seen: list[Any] = []
    async with asyncio.timeout(timeout_s), aclosing(engine.events()) as stream:
        async for event in stream:
            seen.append(event)
            if done(event):
                return seen
    raise AssertionError(f"engine closed before the awaited event; saw {seen[-5:]}")


def turn_done(turn: int) -> Callable[[Any], bool]:
    return lambda e: isinstance(e, ev.TurnCompleted) and e.record.turn == turn


def answer_audio(seen: list[Any], response_id: str) -> bytes:
    return b"".join(
        e.pcm for e in seen if isinstance(e, ev.OutputAudio) and e.response_id == response_id
    )


async def test_the_system_prompt_stays_warm_between_conversations(
    model: LlamaCppLanguageModel,
) -> None:
    """The first conversation after start computes only its own tokens: the system prompt and
    the tools' definitions (hundreds of tokens) were put in the KV cache by start()."""
    events = [e async for e in model.generate([Message("user", "Say hello.")], TOOLS)]
    assert not any(isinstance(e, ToolCall) for e in events)
    assert model.last_prompt_tokens.cached > 300
    assert model.last_prompt_tokens.computed < 40


async def test_a_spoken_question_is_answered_and_a_follow_up_uses_the_previous_turn(
    model: LlamaCppLanguageModel, piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    question = await spoken_pcm(piper, "What is the capital of France?", RATE_HZ)
    engine, warm_ups = make_engine(sphinx, model, piper), model.warm_ups
    async with engine:
        engine.push_audio(silence_pcm(0.3, RATE_HZ))
        await play(engine, question, RATE_HZ)  # in real time: read ahead while it is heard
        engine.push_audio(silence_pcm(1.0, RATE_HZ))
        seen = await collect_until(engine, turn_done(1))
        engine.add_user_text("And of Germany?")
        engine.create_response()
        seen += await collect_until(engine, turn_done(2))
    first, second = [e.record for e in seen if isinstance(e, ev.TurnCompleted)]
    assert model.warm_ups > warm_ups  # partial transcripts' words were read while it spoke
    assert "france" in re.findall(r"[a-z']+", first.transcript.lower())
    assert "Paris" in first.heard_text and not first.interrupted
    assert "Berlin" in second.heard_text
    # the answer as the engine kept it matched the model's own tokens: after the header read
    # once the answer was written, the follow-up read only "And of Germany?" and the
    # assistant's header (9 tokens; 14 with the user's header, the whole answer again if not)
    assert model.last_prompt_tokens.computed <= 9, model.last_prompt_tokens
    # The answer is spoken: pocketsphinx hears its words, if not well ("The capital of France
    # is Paris." came back as "the cap pope francis parents").
    heard = " ".join(await recognised(sphinx, answer_audio(seen, "resp_1"), OUT_RATE_HZ))
    assert len(heard.split()) >= 3, heard


async def test_the_time_is_asked_of_the_tool_each_time_and_its_result_spoken(
    model: LlamaCppLanguageModel, piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    """Asked the time, the turn calls current_time without the model writing the call (it
    writes one in ~20 tokens, and asked again in a conversation it made a time up); the
    result is worded and spoken. Asked again, with a word before the question, the tool is
    asked again and its new time spoken."""
    times = iter([NINE_AM, NINE_AM.replace(hour=11, minute=30)])
    engine = make_engine(sphinx, model, piper, clock=lambda: next(times))
    settled, reads, worded = model.settled_calls, model.header_reads, model.time_answers
    async with engine:
        engine.add_user_text("What time is it?")
        engine.create_response()
        seen = await collect_until(engine, turn_done(1))
        engine.add_user_text("So, what's the time now?")
        engine.create_response()
        seen += await collect_until(engine, turn_done(2))
    assert model.settled_calls == settled  # (no call written by the model)
    started = [e.call.name for e in seen if isinstance(e, ev.ToolCallStarted)]
    results = [json.loads(e.result.output) for e in seen if isinstance(e, ev.ToolCallCompleted)]
    assert started == ["current_time"] * 2 and [r["time"] for r in results] == ["09:00", "11:30"]
    first, second = [e.record for e in seen if isinstance(e, ev.TurnCompleted)]
    # worded from the result without the model (local_llm_chat.time_answer: it read the call
    # and the result, ~70 tokens, before its first word), then read into its cache as it plays
    assert first.heard_text.strip() == "It is nine o'clock in the morning, UTC."
    assert second.heard_text.strip() == "It is eleven thirty in the morning, UTC."
    assert model.time_answers == worded + 2
    assert model.header_reads > reads  # (the second's read skipped if the first's still runs)


async def test_the_date_is_answered_from_the_tool(
    model: LlamaCppLanguageModel, piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText
) -> None:
    """Asked the date, the turn calls current_time, whose result holds the date as it is said:
    the answer gives the clock's day, month and year (before, the tool gave only the time and
    the weekday, and the model answered the date with them, the year with 2023). The session
    has instructions of its own, so the model words the answer (``time_answer`` does not)."""
    engine = make_engine(
        sphinx, model, piper, speak=False, clock=lambda: NINE_AM, instructions="Be brief."
    )
    worded = model.time_answers
    async with engine:
        engine.add_user_text("What's the date today?")
        engine.create_response()
        seen = await collect_until(engine, turn_done(1))
    assert [e.call.name for e in seen if isinstance(e, ev.ToolCallStarted)] == ["current_time"]
    answer = "".join(e.text for e in seen if isinstance(e, ev.ResponseTextDelta)).lower()
    assert "march" in answer and "2026" in answer and re.search(r"\b2\b|second", answer), answer
    assert model.time_answers == worded  # the model's words


async def test_a_call_the_model_writes_is_taken_once_its_name_is_written(
    model: LlamaCppLanguageModel,
) -> None:
    """A time question worded past the turn's own check ("Can you look at the clock?"): the
    model writes the call itself, in a Markdown fence (20 tokens), and it is taken
    once its name is settled."""
    settled = model.settled_calls
    question = [Message("user", "Can you look at the clock?")]
    assert time_call(question, [tool.name for tool in TOOLS]) is None
    events = [e async for e in model.generate(question, TOOLS)]
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["current_time"], events
    assert model.settled_calls == settled + 1


async def test_once_an_answer_is_written_the_next_turns_start_is_read_ahead(
    model: LlamaCppLanguageModel,
) -> None:
    """An answer read to its end: the conversation with it and the next user message's header
    are read into the KV cache while it plays, and the follow-up reads only its own words and
    the assistant's header. A tool call is followed by no such read (its result comes at once).
    The conversation is asked as ``local_llm_first_chunk --conversation`` asks it: each
    question and its answer, as written, go into one history, and a follow-up is answered
    from it."""
    tools = ToolRegistry(builtin_tools(KNOWLEDGE, lambda: NINE_AM))
    await asyncio.wait_for(model.warm_up_done(), timeout=60)
    reads = model.header_reads
    time_asked = [Message("user", "What time is it?")]
    asked = [e async for e in model.generate(time_asked, tools.specs())]
    assert any(isinstance(e, ToolCall) for e in asked) and model.header_reads == reads
    history: list[Message] = []
    rome = await first_chunk.answer(model, "What is the capital of Italy?", tools, history=history)
    assert "Rome" in rome.text and model.header_reads == reads + 1
    await asyncio.wait_for(model.warm_up_done(), timeout=60)
    # "<|im_end|>\n<|im_start|>user\n", and the empty message's "<|im_end|>\n"
    assert model.last_warm_tokens.computed == 7, model.last_warm_tokens
    read, answers = [], [rome.text.strip()]
    follow_ups = [("And of Spain?", "Madrid", 0), ("And France?", "Paris", 0), ("Japan?", "", 1)]
    for question, city, max_tokens in follow_ups:  # (the last answer unread: one token)
        timed = await first_chunk.answer(
            model, question, tools, history=history, max_tokens=max_tokens
        )
        assert city in timed.text, (question, timed.text)
        read.append(timed.read_tokens)
        answers.append(timed.text.strip())
    assert [m.role for m in history] == ["user", "assistant"] * 4, history
    assert [m.content for m in history[1::2]] == answers, history
    # "And of Spain?" as 4 tokens, "<|im_end|>\n<|im_start|>assistant\n" as 5. The next two
    # are asked at once: the header read after each answer is then either dropped or waited
    # for, so it never lands after the next answer (the one after that would read the whole
    # conversation again); each reads at most its own header too
    assert read[0] <= 9 and max(read[1:]) <= 14, read


async def test_told_not_to_the_model_reads_no_next_turns_start(
    model: LlamaCppLanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PIPELINE_LOCAL_LLM_READ_NEXT_HEADER=0``: an answer read to its end is followed by no
    read of the next turn's start (what an A/B of it needs)."""
    monkeypatch.setattr(model, "config", replace(model.config, read_next_header=False))
    await asyncio.wait_for(model.warm_up_done(), timeout=60)
    reads = model.header_reads
    asked = [Message("user", "What is the capital of Italy?")]
    answer = "".join(
        [e.text async for e in model.generate(asked, TOOLS) if isinstance(e, TextDelta)]
    )
    assert "Rome" in answer and model.header_reads == reads and not model.warming


async def test_the_first_chunk_bench_refuses_a_gap_it_would_not_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``local_llm_first_chunk``: a gap out of range is refused, and so is a gap without
    ``--conversation`` (it would be ignored). (Its conversation is asked in
    test_once_an_answer_is_written_the_next_turns_start_is_read_ahead.)"""
    with pytest.raises(SystemExit):
        first_chunk.main(["--conversation", "--gap-s", "61"])
    assert "--gap-s must be within 0..60, got 61.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        first_chunk.main(["--gap-s", "1"])
    assert "--gap-s is the pause between a conversation's turns" in capsys.readouterr().err


async def test_a_barge_in_stops_the_generation_and_the_process_rests(
    model: LlamaCppLanguageModel,
) -> None:
    """Closing the stream after its first words stops llama.cpp: the process goes quiet long
    before a 1000-token answer could have been written, and stays quiet (no thread spins)."""
    story = [Message("user", "Tell me a very long story about a dragon and a knight.")]
    await asyncio.wait_for(model.warm_up_done(), timeout=60)
    reads, stream = model.header_reads, model.generate(story, TOOLS, max_tokens=1000)
    async with aclosing(stream):
        first = await anext(stream)
    assert isinstance(first, TextDelta)
    assert model.header_reads == reads  # an answer cut short is not what the next turn sends
    await until_quiet(deadline_s=20)
    busiest = [await cpu_share_of_busiest_thread(window_s=1.0) for _ in range(3)]
    assert max(share for share, _ in busiest) < 0.1, busiest


async def test_an_answer_dropped_before_its_first_word_leaves_its_words_read_for_the_next(
    model: LlamaCppLanguageModel,
) -> None:
    """An early answer (started at a pause) thrown away before its first token, as when the
    user goes on: it stops, and the answer to the whole question reads fewer new tokens than
    the same question asked afresh, its first words already in the KV cache."""
    question = [Message("user", "What is the capital of France?")]
    fresh = [e async for e in model.generate(question, TOOLS)]
    read_afresh = model.last_prompt_tokens.computed
    forget = [Message("user", "Say hello.")]  # its answer unread: one token
    [e async for e in model.generate(forget, TOOLS, max_tokens=1)]  # forgets it
    await asyncio.wait_for(model.warm_up_done(), timeout=60)  # (the header read after it)
    early = model.generate([Message("user", "What is the capital")], TOOLS)
    started = asyncio.ensure_future(anext(early))
    for _ in range(1000):  # until the request is with the server (a few loop turns)
        if model._answers:
            break
        await asyncio.sleep(0)
    assert model._answers, "the early answer never reached the server"
    started.cancel()
    with pytest.raises(asyncio.CancelledError):
        await started
    assert not model._answers
    whole = [e async for e in model.generate(question, TOOLS)]
    assert model.last_prompt_tokens.computed < read_afresh, (read_afresh, model.last_prompt_tokens)
    for answer in (fresh, whole):
        assert "Paris" in "".join(e.text for e in answer if isinstance(e, TextDelta))


async def test_a_warm_up_reads_the_words_so_far_and_the_answer_only_the_rest(
    model: LlamaCppLanguageModel,
) -> None:
    """While the user speaks, a warm-up reads the request with the words so far into the KV
    cache (one at a time); the turn's answer then reads only the words after them and the
    assistant's header (the runtime's own counters). No warm-up starts while an answer runs."""
    await asyncio.wait_for(model.warm_up_done(), timeout=60)  # (an earlier answer's, if any)
    started = model.warm_ups
    model.warm([Message("user", "Which planet is the")], TOOLS)
    model.warm([Message("user", "Which planet is the big")], TOOLS)  # one at a time
    assert model.warm_ups == started + 1
    await asyncio.wait_for(model.warm_up_done(), timeout=60)
    warm = model.last_warm_tokens
    assert warm.computed >= 4 + 2, warm  # its four words and "<|im_end|>\n"
    answer = []
    async for event in model.generate([Message("user", "Which planet is the largest?")], TOOLS):
        answer.append(event)
        model.warm([Message("user", "Something else entirely")], TOOLS)
        assert model.warm_ups == started + 1 and not model.warming
    assert "Jupiter" in "".join(e.text for e in answer if isinstance(e, TextDelta)), answer
    read = model.last_prompt_tokens
    assert read.cached >= warm.cached + 4, (warm, read)  # the warm-up's words were reused
    assert read.computed <= 8, (warm, read)  # " largest", "?" and the header, as tokenized


# Asked last of the model's tests, and "twelve times twelve" last of them: the model looks that
# one up, and asked again without the tools (LlamaCppLanguageModel.generate), it leaves the KV
# cache on the system prompt alone; the next request with the tools read them all again (~210
# tokens, 10 CPU-s on 2 shared cores)
OPEN_QUESTIONS = [
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What is the boiling point of water in Celsius?", ("100", "hundred")),
    ("What is twelve times twelve?", ("144", "hundred forty-four", "hundred and forty-four")),
]


async def test_open_questions_get_right_answers(
    model: LlamaCppLanguageModel,
    piper: PiperTextToSpeech,
    sphinx: PocketsphinxSpeechToText,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Questions no knowledge file holds, each in a new conversation with the session's tools
    (the model may look one up first: the answer is what counts)."""
    # no conversation has a next turn: its header is not read (after the last answer, given
    # without the tools, that read would read the tools again)
    monkeypatch.setattr(model, "config", replace(model.config, read_next_header=False))
    wrong, settled = {}, model.settled_calls
    for question, accepted in OPEN_QUESTIONS:
        engine = make_engine(sphinx, model, piper, speak=False)
        async with engine:
            engine.add_user_text(question)
            engine.create_response()
            seen = await collect_until(engine, turn_done(1))
        answer = "".join(e.text for e in seen if isinstance(e, ev.ResponseTextDelta))
        if not any(word.lower() in answer.lower() for word in accepted):
            wrong[question] = answer
    assert wrong == {}
    # the lookup (of "twelve times twelve"), dropped as the knowledge is in the prompt, was
    # taken once its name was written, not written to its end (~20 tokens)
    assert model.settled_calls > settled


async def test_without_its_model_the_pipeline_falls_back_to_the_rule_based_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model file cannot be written (its cache folder is under a file): refused, logged,
    noted, and the rule-based agent answers."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = PipelineConfig(
        stt="pocketsphinx", llm="local", tts="espeak", local_llm_cache_dir=str(blocker / "models")
    )
    async with open_providers(config) as providers:
        assert providers.llm.name == "local-rule-based"
        engine = build_engine(config, providers)
        assert engine.llm is providers.llm
    assert providers.substitutes["llm"].startswith("local model unavailable: cannot write")
    assert "the rule-based agent answers instead" in caplog.text
    registry = CollectorRegistry()
    registry.register(SubstitutesCollector(providers.substitutes))
    exposed = generate_latest(registry).decode()
    assert (
        'transceiver_pipeline_stage_substituted{reason="local model unavailable: cannot' in exposed
    )


async def test_a_transceiver_is_ready_only_once_its_local_model_is_warm(tmp_path: Path) -> None:
    """Readiness (the ready line ``make run`` waits for, ``/readyz``) waits for the model's
    warm-up in ``start()`` (the system prompt and the tools read into its cache): asked from
    the process's start, ``/readyz`` answers 200 only once the model is logged warm."""
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    knowledge = tmp_path / "knowledge.md"
    knowledge.write_text("## Tea\nTea is made from leaves.\n")
    env = {"PIPELINE_LLM": "local", "TRANSCEIVER_SECRET_KEYS": random_keys()}
    env["PIPELINE_LOCAL_LLM_THREADS"] = str(THREADS)
    env |= {
        "PIPELINE_STT": "pocketsphinx",
        "PIPELINE_STT_WORKERS": "1",  # (one decoder process, not one per core: no call is made)
        "PIPELINE_TTS": "espeak",
        "PIPELINE_VAD_MODEL": "webrtc",
    }
    env["PIPELINE_KNOWLEDGE_FILE"] = str(knowledge)
    process = transceiver_process(
        "transceiver", ("127.0.0.1", free_port()), http, "127.0.0.1:3478", random_keys(),
        tmp_path, env, agent="pipeline",
    )  # fmt: skip
    process.start()
    try:
        not_ready = await not_ready_answers(f"http://{text(http)}/readyz", process)
        log = (tmp_path / "transceiver.log").read_text()
        assert "loaded and warm" in log and not_ready > 0, process.log_tail()
    finally:
        returncode = await process.stop()
    assert returncode == 0, process.log_tail()


async def not_ready_answers(url: str, process: Process, deadline_s: float = 300) -> int:
    """How often ``url`` failed or answered other than 200, asked every 100 ms until it
    answers 200 (within ``deadline_s``, the process alive)."""
    failed = 0
    async with httpx.AsyncClient(timeout=10) as client, asyncio.timeout(deadline_s):
        while True:
            assert process.alive(), process.log_tail()
            try:
                if (await client.get(url)).status_code == 200:
                    return failed
            except httpx.TransportError:  # not listening yet
                pass
            failed += 1
            await asyncio.sleep(0.1)  # the polling interval


# --- the process's CPU, thread by thread ------------------------------------------------------


def thread_ticks() -> dict[str, int]:
    ticks = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        ticks[task.name] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


async def cpu_share_of_busiest_thread(window_s: float) -> tuple[float, str]:
    """The busiest thread's share of one core over ``window_s``, and its id."""
    before = thread_ticks()
    await asyncio.sleep(window_s)  # the measuring window itself, not a synchronisation
    after = thread_ticks()
    used = {tid: after[tid] - before.get(tid, 0) for tid in after}
    tid = max(used, key=lambda key: used[key])
    return used[tid] / CLOCK_TICKS_PER_S / window_s, tid


async def until_quiet(deadline_s: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        share, _ = await cpu_share_of_busiest_thread(window_s=0.5)
        if share < 0.1:
            return
    raise AssertionError(f"a thread still works {deadline_s} s after the stream was closed")
