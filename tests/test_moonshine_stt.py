"""Moonshine tiny-en behind the speech-to-text Protocol, with the real model: it recognises a
piper sentence and a recorded person; a model file that is not the pinned one is never loaded.
And the recorded speech the benchmarks use: fetched out of its pinned archive, each file checked.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from thread_states import run_probe

from loadtest import recorded_speech
from loadtest.voice_audio import silence_pcm, spoken_pcm
from pipeline.config import MoonshineConfig, PipelineConfig
from pipeline.moonshine_stt import (
    NATIVE_CALLS,
    TINY_EN,
    MoonshineModel,
    MoonshineModelError,
    MoonshineSpeechToText,
    default_model_folder,
    read_verified,
)
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.providers import AudioChunk, Transcript

on_module_loop = pytest.mark.asyncio(loop_scope="module")
ROOT = Path(__file__).resolve().parent.parent


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower().replace("-", " ")).split()


async def frames(pcm: bytes, rate_hz: int = 16000) -> AsyncIterator[AudioChunk]:
    step = rate_hz * 2 // 50
    for start in range(0, len(pcm), step):
        yield AudioChunk(pcm[start : start + step], rate_hz)


async def transcripts(stt: MoonshineSpeechToText, pcm: bytes, rate_hz: int) -> list[Transcript]:
    return [transcript async for transcript in stt.transcribe(frames(pcm, rate_hz))]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def moonshine() -> AsyncIterator[MoonshineSpeechToText]:
    stt = MoonshineSpeechToText(MoonshineConfig(workers=1, partial_interval_ms=1000))
    await stt.start()
    yield stt
    await stt.aclose()


@pytest.fixture(scope="module")
def recordings() -> Path:
    """The recordings (``make models`` fetched them; else they are fetched here, once)."""
    return recorded_speech.fetch()


@on_module_loop
async def test_a_piper_sentence_is_recognised_with_partials_first(
    piper: PiperTextToSpeech, moonshine: MoonshineSpeechToText
) -> None:
    text = "Please book me a table for two at seven tonight."
    pcm = await spoken_pcm(piper, text, 24000)  # at the engine's other rate: resampled
    heard = await transcripts(moonshine, pcm, 24000)
    assert [t.final for t in heard] == [False] * (len(heard) - 1) + [True]
    assert len(heard) >= 2, "a 2.5 s sentence gives a partial at 1 s"
    assert words(heard[-1].text) == words(text)


@on_module_loop
async def test_a_recorded_person_is_recognised(
    recordings: Path, moonshine: MoonshineSpeechToText
) -> None:
    recording = next(r for r in recorded_speech.RECORDINGS if r.name == "librivox-0930")
    heard = await transcripts(moonshine, recorded_speech.read_pcm(recording, recordings), 16000)
    assert words(heard[-1].text) == words(recording.transcript)


@on_module_loop
async def test_a_pause_is_decoded_at_once_and_that_decode_is_the_final(
    recordings: Path, moonshine: MoonshineSpeechToText
) -> None:
    """The VAD's silence window streams quiet audio after the words: they are decoded once,
    as the pause starts (a partial), and that decode is the final; speech after the pause is
    decoded again, with it."""
    recording = next(r for r in recorded_speech.RECORDINGS if r.name == "cards-001")
    speech = recorded_speech.read_pcm(recording, recordings)
    jobs = moonshine.load.jobs
    heard = await transcripts(moonshine, speech + silence_pcm(0.5, 16000), 16000)
    assert moonshine.load.jobs == jobs + 1  # one pass that counts: partials are not counted
    assert heard[-1].final and heard[-2].text == heard[-1].text
    assert words(heard[-1].text) == words(recording.transcript)
    again = await transcripts(moonshine, speech + silence_pcm(0.5, 16000) + speech, 16000)
    assert words(again[-1].text) == words(recording.transcript) * 2


@on_module_loop
async def test_silence_and_nothing_give_an_empty_final(moonshine: MoonshineSpeechToText) -> None:
    assert await transcripts(moonshine, b"", 16000) == [Transcript("", final=True)]
    assert await transcripts(moonshine, bytes(1600), 16000) == [Transcript("", final=True)]


@on_module_loop
async def test_a_tampered_model_file_is_refused(tmp_path: Path) -> None:
    for pinned in TINY_EN:
        shutil.copyfile(default_model_folder() / pinned.name, tmp_path / pinned.name)
    tokenizer = tmp_path / "tokenizer.bin"
    content = bytearray(tokenizer.read_bytes())
    content[1000] ^= 1
    tokenizer.write_bytes(bytes(content))
    stt = MoonshineSpeechToText(MoonshineConfig(model_dir=str(tmp_path)))
    with pytest.raises(
        MoonshineModelError, match=r"tokenizer.bin: sha256 [0-9a-f]{64}, the pinned"
    ):
        await stt.start()
    tokenizer.write_bytes(bytes(content[:-1]))
    with pytest.raises(MoonshineModelError, match="249973 bytes, the pinned file has 249974"):
        await stt.start()
    tokenizer.unlink()
    with pytest.raises(MoonshineModelError, match="tokenizer.bin: cannot read"):
        await stt.start()


def test_moonshine_is_chosen_by_name_and_checked() -> None:
    config = PipelineConfig(stt="moonshine", stt_workers=2, moonshine_partial_interval_ms=0)
    assert config.moonshine_config() == MoonshineConfig(workers=2, partial_interval_ms=0)
    with pytest.raises(ValueError, match="partial_interval_ms and quiet_decode_ms must be >= 0"):
        MoonshineConfig(partial_interval_ms=-1)


def test_the_recordings_are_checked_by_hash(recordings: Path, tmp_path: Path) -> None:
    assert recorded_speech.present(recordings)
    for recording in recorded_speech.RECORDINGS:
        copy = recorded_speech.path_of(recording, tmp_path)
        shutil.copyfile(recorded_speech.path_of(recording, recordings), copy)
    first = recorded_speech.RECORDINGS[0]
    copy = recorded_speech.path_of(first, tmp_path)
    copy.write_bytes(copy.read_bytes()[:-2] + b"\x00\x01")
    assert not recorded_speech.present(tmp_path)
    with pytest.raises(recorded_speech.RecordingError, match=r"sha256 [0-9a-f]{64}, the pinned"):
        recorded_speech.read_pcm(first, tmp_path)


def test_an_archive_with_another_recording_is_refused(tmp_path: Path) -> None:
    """What is written out is what was pinned: a differing member is refused, not copied."""
    member = tmp_path / "member.wav"
    member.write_bytes(b"RIFF not the recording")
    archive = tmp_path / "pocketsphinx-5.1.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(member, recorded_speech.ARCHIVE_PREFIX + recorded_speech.LICENCE_MEMBER)
        tar.add(member, recorded_speech.ARCHIVE_PREFIX + recorded_speech.RECORDINGS[0].member)
    with pytest.raises(recorded_speech.RecordingError, match="sha256 .*, the pinned recording"):
        recorded_speech.extract(archive, tmp_path / "out")
    assert not recorded_speech.path_of(recorded_speech.RECORDINGS[0], tmp_path / "out").exists()


def test_the_benchmark_counts_word_errors_not_spelling() -> None:
    from loadtest.bench_stt import word_errors

    assert word_errors("Mr. John Dashwood, ill-disposed.", "mister john dashwood ill disposed") == 0
    assert word_errors("a table for 2 at 7", "a table for two at seven") == 0
    assert word_errors("put me at table", "book me a table") == 2  # two substitutions
    assert word_errors("", "he was not") == 3
    assert word_errors("he was not not", "he was not") == 1


THREADS_PROBE = """
import numpy as np
from pipeline.moonshine_stt import MoonshineModel, default_model_folder, read_verified
from thread_states import others, states

before = states()
model = MoonshineModel(read_verified(default_model_folder()))
noise = (np.random.default_rng(1).standard_normal(32000) * 0.1).astype(np.float32)
model.transcribe(noise)
after = states()
print(len(before), len(after), "".join(others(after).values()) or "-")
"""


def test_a_model_starts_no_thread_and_decodes_on_its_callers_alone() -> None:
    """The library's onnxruntime would start an intra-op pool per session (sized by the cores;
    no option of 0.0.4 sets it) whose threads busy-wait through a decode;
    ``pipeline.moonshine_threads`` makes each session single-threaded: loading a model and
    decoding with it start no thread at all (the other tests hear the words)."""
    before, after, _ = run_probe(THREADS_PROBE).split(maxsplit=2)
    assert int(after) == int(before)


def thread_names() -> list[str]:
    return [Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]


@on_module_loop
async def test_the_decoder_and_its_onnxruntime_threads_are_named(
    moonshine: MoonshineSpeechToText,
) -> None:
    """The model is loaded on its decoder's thread (``moonshine`` in /proc): any thread the
    library started with it would carry that name too; with one-thread sessions it starts none."""
    assert thread_names().count("moonshine") == 1  # its decoder's; onnxruntime starts none


class _WatchedLibrary:
    """The library, its decode call checked to run under ``NATIVE_CALLS``."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.decodes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def moonshine_transcribe_stream(self, *arguments: Any) -> int:
        assert NATIVE_CALLS.locked(), "a decode outside the library's lock"
        self.decodes += 1
        return int(self._lib.moonshine_transcribe_stream(*arguments))


def three(model: MoonshineModel, samples: np.ndarray) -> list[str]:
    return [model.transcribe(samples) for _ in range(3)]


@on_module_loop
async def test_two_models_on_two_threads_decode_one_at_a_time(piper: PiperTextToSpeech) -> None:
    """The library crashes its process (SIGSEGV) when two threads decode at once, even on two
    models: every native call holds ``NATIVE_CALLS``, and both threads' words are heard."""
    text = "When does the library open?"
    pcm = np.frombuffer(await spoken_pcm(piper, text, 16000), np.int16)
    samples = pcm.astype(np.float32) / 32768.0
    contents = await asyncio.to_thread(read_verified, default_model_folder())
    models = [await asyncio.to_thread(MoonshineModel, contents) for _ in range(2)]
    watched = [_WatchedLibrary(model._lib) for model in models]
    for model, lib in zip(models, watched, strict=True):
        model._lib = lib
    try:
        heard = await asyncio.gather(*(asyncio.to_thread(three, m, samples) for m in models))
    finally:
        for model, lib in zip(models, watched, strict=True):
            model._lib = lib._lib
            model.close()
    assert [lib.decodes for lib in watched] == [3, 3]
    assert all(words(text) == words(each) for run in heard for each in run)


@on_module_loop
async def test_more_workers_still_load_one_model() -> None:
    """One decode at a time per process (``NATIVE_CALLS``): a second model would only wait in
    the lock, unseen by the pool's STT stage, and hold ~150 MB."""
    before = thread_names().count("moonshine")
    stt = MoonshineSpeechToText(MoonshineConfig(workers=2))
    await stt.start()
    try:
        assert thread_names().count("moonshine") == before + 1
    finally:
        await stt.aclose()
