"""Speak the rule-based agent's fixed replies once as the providers open, so no call waits
for them: ``PIPELINE_SPEECH_PREWARM``.

The rule-based agent answers from a fixed set of sentences (``LocalRuleBasedAgent.fixed_replies``),
and piper keeps what it has synthesized by text (``pipeline.speech_cache``). Each reply is cut
into the chunks a response cuts it into (the same pieces through the same ``SpeechChunker``) and
each chunk is synthesized once, one after another on the pool's synthesis thread: a caller's
first answer then starts from a copy, as every later caller's already did. Replies that depend
on the moment (the time, a recall of the question) are synthesized when said, as before.

Off by default (each process that starts pays ~0.1 CPU-s per second of speech, a few CPU-seconds
in all, which test stacks need not spend); ``make run`` and the benchmarks' stacks
(``deploy.local``) and the image turn it on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from pipeline.chunker import SpeechChunker
from pipeline.config import ChunkerConfig
from pipeline.local_agent import reply_pieces
from pipeline.providers import TextToSpeech, synthesize_with

log = logging.getLogger(__name__)


def reply_chunks(replies: Sequence[str], chunker: ChunkerConfig) -> list[str]:
    """The chunks a response would speak for each reply, in order, each once."""
    chunks: list[str] = []
    for reply in replies:
        cutter = SpeechChunker(chunker)
        for piece in reply_pieces(reply):
            chunks += cutter.push(piece)
        chunks += cutter.flush()
    return list(dict.fromkeys(chunks))


async def prewarm(tts: TextToSpeech, chunks: Sequence[str]) -> float:
    """Synthesize each chunk (the TTS keeps it); the CPU-seconds it took this process."""
    started_s, started_cpu_s = time.monotonic(), time.process_time()
    for chunk in chunks:
        async for _ in synthesize_with(tts, chunk):
            pass
    cpu_s = time.process_time() - started_cpu_s
    log.info(
        "speech prewarmed: %d chunks in %.1f s (%.1f CPU-s)",
        len(chunks),
        time.monotonic() - started_s,
        cpu_s,
    )
    return cpu_s
