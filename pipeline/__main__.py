"""Run the voice pipeline on a WAV file: ``python -m pipeline --in question.wav --out answer.wav``.

The input (16-bit PCM WAV, mono or stereo, any rate) may hold one or several turns separated by
silence. It is fed frame by frame; after each of the user's turns the agent answers before the
file goes on (a conversation, not an overlap). The agent's audio is written to ``--out``
(16-bit mono at the output rate); each turn's record is printed to stdout as one JSON line.
Configuration: ``PIPELINE_*`` variables, mirrored by flags (``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import wave
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.assembly import build_engine, open_providers
from pipeline.config import ConfigError, PipelineConfig, add_config_flags, config_from
from pipeline.engine import ConversationEngine
from pipeline.events import EngineError, OutputAudio, TurnCompleted
from pipeline.playout import PcmResampler
from pipeline.wav import write_wav

TURN_TIMEOUT_S = 120.0


class WavError(ValueError):
    pass


def read_wav(path: Path, sample_rate_hz: int) -> bytes:
    """16-bit PCM at ``sample_rate_hz``, mono (channels averaged); WavError if unusable."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate_hz = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except (wave.Error, EOFError) as error:
        raise WavError(f"{path}: not a readable WAV file ({error})") from None
    if width != 2:
        raise WavError(f"{path}: need 16-bit PCM samples, got {8 * width}-bit")
    samples = np.frombuffer(frames, np.int16).reshape(-1, channels).mean(axis=1).astype(np.int16)
    if not samples.size:
        raise WavError(f"{path}: contains no audio")
    return PcmResampler(rate_hz, sample_rate_hz).push(samples.tobytes(), last=True)


async def converse(engine: ConversationEngine, pcm: bytes, frame_bytes: int) -> list[object]:
    """Feed the file; wait for the agent's answer after each user turn. Returns every event."""
    events: list[object] = []
    collector = asyncio.create_task(_collect(engine, events))
    try:
        for start in range(0, len(pcm), frame_bytes):
            engine.push_audio(pcm[start : start + frame_bytes])
            if engine.busy and not engine.user_speaking:
                await engine.wait_idle(TURN_TIMEOUT_S)
        engine.finish_input()
        await engine.wait_idle(TURN_TIMEOUT_S)
    finally:
        await engine.aclose()
        await collector
    return events


async def _collect(engine: ConversationEngine, events: list[object]) -> None:
    async for event in engine.events():
        events.append(event)
        if isinstance(event, TurnCompleted):
            print(json.dumps(event.record.to_json()), flush=True)
        elif isinstance(event, EngineError):
            print(f"error: {event.message}", file=sys.stderr, flush=True)


async def run(config: PipelineConfig, source: Path, target: Path) -> int:
    engine_config = config.engine_config()
    pcm = read_wav(source, engine_config.input_sample_rate_hz)
    async with open_providers(config) as providers:
        engine = build_engine(config, providers)
        await engine.start()
        frame_bytes = engine_config.input_sample_rate_hz * engine_config.frame_ms // 500
        events = await converse(engine, pcm, frame_bytes)
    audio = b"".join(e.pcm for e in events if isinstance(e, OutputAudio))
    write_wav(target, audio, engine_config.output_sample_rate_hz)
    turns = sum(isinstance(e, TurnCompleted) for e in events)
    print(f"{turns} turn(s), {len(audio) / 2 / engine_config.output_sample_rate_hz:.2f} s of "
          f"answer audio -> {target}", file=sys.stderr)  # fmt: skip
    return 0 if turns else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--in", dest="source", type=Path, required=True, help="question WAV")
    parser.add_argument("--out", dest="target", type=Path, required=True, help="answer WAV")
    add_config_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from(args, os.environ)
        if not args.source.is_file():
            raise WavError(f"{args.source}: no such file")
        config = replace(config, realtime_playout=False)
        return asyncio.run(run(config, args.source, args.target))
    except (ConfigError, WavError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
