"""``python -m loadtest.local_llm_first_chunk``: how soon the local model's first spoken chunk
is ready, in wall time and in this process's CPU time (which the machine's load moves far
less), from the start of its answer.

The local model (``pipeline.llama_llm``, ``PIPELINE_LOCAL_LLM_*`` from the environment, or
``--model`` for another GGUF file, loaded unchecked) is given the knowledge file and the
built-in tools as a transceiver gives them, and answers ``loadtest.bench_e2e``'s questions,
each in a new conversation, ``--rounds`` times over (each round opens them with its own
word, "So, ...", so their tokens are read again rather than found in the cache). Each
answer's text deltas are timed once; the chunker is replayed on that one stream with
``first_words`` 0 (the first clause) and ``--first-words``, so the two are compared on the
same tokens. A tool call is
made and its result read, and the timing restarts there. One JSON line per answer, then one
with the medians and ``/proc/loadavg``.

``--conversation`` asks each round's questions in one conversation, as ``loadtest.bench_e2e``
does, ``--gap-s`` apart (the answer playing): a turn then reads only what is new since the last
answer, and what was read in that gap (the next turn's header) is not timed.

``--read-ahead`` alternates rounds without and with a warm-up (``LlamaCppLanguageModel.warm``)
of the question but its last word, finished before the answer is asked, as the engine reads a
partial transcript ahead while the user speaks: the answer's timing is then what is left after
the turn's end; medians are given for each mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest.bench_e2e import QUESTIONS
from pipeline.chunker import SpeechChunker
from pipeline.config import ChunkerConfig, LocalLlmConfig, PipelineConfig
from pipeline.knowledge import load_knowledge
from pipeline.llama_llm import LlamaCppLanguageModel
from pipeline.providers import Message, TextDelta, ToolCall
from pipeline.tools import ToolRegistry, builtin_tools


@dataclass
class Timed:
    """One round of an answer: its deltas as (wall s, CPU s, text) from the round's start."""

    deltas: list[tuple[float, float, str]] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    read_tokens: int = 0
    warm_read_tokens: int = 0  # the warm-up's, before the answer

    @property
    def text(self) -> str:
        return "".join(text for _, _, text in self.deltas)


def cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def first_chunk_at(timed: Timed, first_words: int) -> tuple[float, float] | None:
    """(wall s, CPU s) when the chunker would have given out its first chunk."""
    chunker = SpeechChunker(ChunkerConfig(first_words=first_words))
    for wall_s, cpu, text in timed.deltas:
        if chunker.push(text):
            return wall_s, cpu
    return timed.deltas[-1][:2] if timed.deltas else None


async def timed_round(
    llm: LlamaCppLanguageModel, messages: list[Message], tools: ToolRegistry, max_tokens: int = 0
) -> Timed:
    timed, wall0, cpu0 = Timed(), time.perf_counter(), cpu_s()
    async for event in llm.generate(messages, tools.specs(), max_tokens=max_tokens):
        if isinstance(event, TextDelta):
            timed.deltas.append((time.perf_counter() - wall0, cpu_s() - cpu0, event.text))
        elif isinstance(event, ToolCall):
            timed.calls.append(event)
    timed.read_tokens = llm.last_prompt_tokens.computed
    return timed


async def answer(
    llm: LlamaCppLanguageModel,
    question: str,
    tools: ToolRegistry,
    read_ahead: bool = False,
    history: list[Message] | None = None,
    max_tokens: int = 0,
) -> Timed:
    """The answer's last round (after any tool's result); with ``read_ahead``, the question
    but its last word read into the cache first. ``history``: the conversation so far, to
    which the question, any tool rounds and the answer are added. ``max_tokens``: each
    round's limit (0: the model's configured one)."""
    messages = history if history is not None else []
    earlier, warm_read = list(messages), 0
    messages.append(Message("user", question))
    if read_ahead:
        words = question.rsplit(maxsplit=1)[0]
        llm.warm([*earlier, Message("user", words)], tools.specs())
        await llm.warm_up_done()
        warm_read = llm.last_warm_tokens.computed
    timed = await timed_round(llm, messages, tools, max_tokens)
    timed.warm_read_tokens = warm_read
    for _ in range(2):
        if not timed.calls:
            break
        messages.append(Message("assistant", "", tool_calls=tuple(timed.calls)))
        for call in timed.calls:
            result = await tools.execute(call)
            messages.append(Message("tool", result.output, tool_call_id=call.call_id))
        timed = await timed_round(llm, messages, tools, max_tokens)
    messages.append(Message("assistant", timed.text.strip()))
    return timed


def row(question: str, timed: Timed, first_words: int) -> dict[str, Any]:
    ms = {
        "first_token": timed.deltas[0][:2] if timed.deltas else None,
        "chunk_clause": first_chunk_at(timed, 0),
        "chunk_words": first_chunk_at(timed, first_words),
    }
    out: dict[str, Any] = {
        "question": question,
        "read_tokens": timed.read_tokens,
        "warm_read_tokens": timed.warm_read_tokens,
    }
    for name, at in ms.items():
        out[f"{name}_ms"] = None if at is None else round(at[0] * 1000)
        out[f"{name}_cpu_ms"] = None if at is None else round(at[1] * 1000)
    return out | {"answer": timed.text}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [key for key in rows[0] if key.endswith(("_ms", "tokens"))] if rows else []
    modes = sorted({bool(r.get("read_ahead")) for r in rows})
    medians = {
        f"read_ahead={mode}": {
            key: statistics.median(values)
            for key in keys
            if (values := [r[key] for r in rows if r[key] is not None and r["read_ahead"] == mode])
        }
        for mode in modes
    }
    return {"median": medians, "answers": len(rows), "loadavg": Path("/proc/loadavg").read_text()}


ROUND_OPENERS = ("", "So, ", "Now, ", "Then, ", "Well, ", "Okay, ", "Right, ", "And ")


def asked_in_round(question: str, round_index: int) -> str:
    """The question as asked in this round: its own first word, so no round's tokens are in the
    cache from another's."""
    opener = ROUND_OPENERS[round_index % len(ROUND_OPENERS)]
    return f"{opener}{question[0].lower()}{question[1:]}" if opener else question


async def run(
    model: Path | None,
    rounds: int,
    first_words: int,
    read_ahead: bool,
    conversation_gap_s: float | None = None,
) -> None:
    knowledge = load_knowledge()
    specs = [tool.spec for tool in builtin_tools(knowledge)]
    facts = [f"{entry.title}: {entry.answer}" for entry in knowledge.entries]
    config = PipelineConfig.from_env(os.environ).local_llm_config()
    config = replace(config, read_ahead=config.read_ahead or read_ahead)
    llm = LlamaCppLanguageModel(
        config, topics=knowledge.titles, facts=facts, warm_tools=specs, model_path=model
    )
    await llm.start()
    tools, rows = ToolRegistry(builtin_tools(knowledge)), []
    try:
        for round_index in range(rounds):
            warm = read_ahead and round_index % 2 == 1
            history: list[Message] | None = None if conversation_gap_s is None else []
            for question in dict.fromkeys(QUESTIONS):
                asked = asked_in_round(question, round_index)
                timed = await answer(llm, asked, tools, warm, history)
                if conversation_gap_s is not None:  # the answer playing (not a synchronisation)
                    await asyncio.sleep(conversation_gap_s)
                rows.append(row(asked, timed, first_words) | {"read_ahead": warm})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        await llm.aclose()
    print(json.dumps(summary(rows)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.local_llm_first_chunk")
    parser.add_argument("--model", type=Path, default=None, help="another GGUF file (unchecked)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first-words", type=int, default=LocalLlmConfig().first_words)
    parser.add_argument(
        "--read-ahead", action="store_true", help="odd rounds warm up on all but the last word"
    )
    parser.add_argument(
        "--conversation", action="store_true", help="each round's questions in one conversation"
    )
    parser.add_argument("--gap-s", type=float, help="between its turns (default 2)")
    args = parser.parse_args(argv)
    if args.gap_s is not None and not args.conversation:
        parser.error("--gap-s is the pause between a conversation's turns: add --conversation")
    gap_s = 2.0 if args.gap_s is None else args.gap_s
    if not 0 <= gap_s <= 60:
        parser.error(f"--gap-s must be within 0..60, got {gap_s}")
    asked_s = gap_s if args.conversation else None
    asyncio.run(run(args.model, args.rounds, args.first_words, args.read_ahead, asked_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
