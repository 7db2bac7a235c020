"""``python -m loadtest.local_llm_first_chunk``: how soon the local model's first spoken chunk
is ready, in wall time and in this process's CPU time (which the machine's load moves far
less), from the start of its answer.

The local model (``pipeline.llama_llm``, ``PIPELINE_LOCAL_LLM_*`` from the environment, or
``--model`` for another GGUF file, loaded unchecked) is given the knowledge file and the
built-in tools as a transceiver gives them, and answers ``loadtest.bench_e2e``'s questions,
each in a new conversation, ``--rounds`` times over (later rounds reword them a little, so
their tokens are read again rather than found in the cache). Each answer's text deltas are
timed once; the chunker is replayed on that one stream with ``first_words`` 0 (the first
clause) and ``--first-words``, so the two are compared on the same tokens. A tool call is
made and its result read, and the timing restarts there. One JSON line per answer, then one
with the medians and ``/proc/loadavg``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    llm: LlamaCppLanguageModel, messages: list[Message], tools: ToolRegistry
) -> Timed:
    timed, wall0, cpu0 = Timed(), time.perf_counter(), cpu_s()
    async for event in llm.generate(messages, tools.specs()):
        if isinstance(event, TextDelta):
            timed.deltas.append((time.perf_counter() - wall0, cpu_s() - cpu0, event.text))
        elif isinstance(event, ToolCall):
            timed.calls.append(event)
    timed.read_tokens = llm.last_prompt_tokens.computed
    return timed


async def answer(llm: LlamaCppLanguageModel, question: str, tools: ToolRegistry) -> Timed:
    """The answer's last round (after any tool's result)."""
    messages = [Message("user", question)]
    timed = await timed_round(llm, messages, tools)
    for _ in range(2):
        if not timed.calls:
            break
        messages.append(Message("assistant", "", tool_calls=tuple(timed.calls)))
        for call in timed.calls:
            result = await tools.execute(call)
            messages.append(Message("tool", result.output, tool_call_id=call.call_id))
        timed = await timed_round(llm, messages, tools)
    return timed


def row(question: str, timed: Timed, first_words: int) -> dict[str, Any]:
    ms = {
        "first_token": timed.deltas[0][:2] if timed.deltas else None,
        "chunk_clause": first_chunk_at(timed, 0),
        "chunk_words": first_chunk_at(timed, first_words),
    }
    out: dict[str, Any] = {"question": question, "read_tokens": timed.read_tokens}
    for name, at in ms.items():
        out[f"{name}_ms"] = None if at is None else round(at[0] * 1000)
        out[f"{name}_cpu_ms"] = None if at is None else round(at[1] * 1000)
    return out | {"answer": timed.text}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [key for key in rows[0] if key.endswith("_ms")] if rows else []
    medians = {
        key: statistics.median(values)
        for key in keys
        if (values := [r[key] for r in rows if r[key] is not None])
    }
    return {"median": medians, "answers": len(rows), "loadavg": Path("/proc/loadavg").read_text()}


async def run(model: Path | None, rounds: int, first_words: int) -> None:
    knowledge = load_knowledge()
    specs = [tool.spec for tool in builtin_tools(knowledge)]
    facts = [f"{entry.title}: {entry.answer}" for entry in knowledge.entries]
    config = PipelineConfig.from_env(os.environ).local_llm_config()
    llm = LlamaCppLanguageModel(
        config, topics=knowledge.titles, facts=facts, warm_tools=specs, model_path=model
    )
    await llm.start()
    tools, rows = ToolRegistry(builtin_tools(knowledge)), []
    try:
        for round_index in range(rounds):
            for question in dict.fromkeys(QUESTIONS):
                asked = question if round_index == 0 else f"{question[:-1]} {question[-1]}"
                rows.append(row(asked, await answer(llm, asked, tools), first_words))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        await llm.aclose()
    print(json.dumps(summary(rows)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.local_llm_first_chunk")
    parser.add_argument("--model", type=Path, default=None, help="another GGUF file (unchecked)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first-words", type=int, default=LocalLlmConfig().first_words)
    args = parser.parse_args(argv)
    asyncio.run(run(args.model, args.rounds, args.first_words))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
