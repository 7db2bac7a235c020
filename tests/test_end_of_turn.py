"""The semantic end-of-turn model: our log-mel features, the pinned file and its refusal, the
threads it leaves, and its decisions on piper speech (a finished sentence, a cut-off phrase).

The model file comes out of the pinned wheel (``python -m pipeline.smart_turn_file``; the
fixture fetches it when the checkout has none)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from thread_states import run_probe

from loadtest.voice_audio import silence_pcm, spoken_pcm, tone_pcm
from pipeline import events as ev
from pipeline import stretches
from pipeline.config import EngineConfig, MoonshineConfig, VadConfig
from pipeline.end_of_turn import EndOfTurn, Verdict, end_of_turn_asker, shared_end_of_turn
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.log_mel import (
    FRAMES,
    MEL_BANDS,
    SAMPLE_RATE_HZ,
    log_mel_features,
    mel_band_of,
    pcm16_to_float,
)
from pipeline.moonshine_stt import MoonshineSpeechToText
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import AudioChunk, Message, Transcript
from pipeline.smart_turn_file import (
    PINS_FILE,
    SMART_TURN_V3_2,
    WHEELS_DIR,
    SmartTurnFileError,
    default_model_path,
    extract,
    fetch,
    pinned_version,
    read_verified,
)
from pipeline.stretches import Heard
from pipeline.vad import TurnCommitted, TurnDetector, level_of, webrtc_classifier
from transceiver.realtime.policy import SessionPolicy, session_update_from
from transceiver.realtime.translation import turn_metrics_event


@pytest.fixture(scope="module")
def model_path() -> Path:
    return fetch(PINS_FILE, WHEELS_DIR, default_model_path())


@pytest.fixture(scope="module")
def end_of_turn(model_path: Path) -> Iterator[EndOfTurn]:
    model = EndOfTurn(model_path)
    yield model
    model.close()


# --- features ------------------------------------------------------------------------------


def tone(frequency_hz: float, seconds: float) -> np.ndarray:
    return pcm16_to_float(tone_pcm(frequency_hz, seconds, SAMPLE_RATE_HZ))


def test_features_are_80_bands_by_800_frames_within_eight_decades() -> None:
    noise = np.random.default_rng(7).standard_normal(3 * SAMPLE_RATE_HZ) * 0.1
    features = log_mel_features(noise)
    assert features.shape == (MEL_BANDS, FRAMES) == (80, 800)
    assert features.dtype == np.float32
    assert features.max() - features.min() <= 8.0 / 4 + 1e-6  # clipped, then divided by 4


@pytest.mark.parametrize("frequency_hz", [300.0, 1000.0, 3000.0])
def test_a_tone_peaks_in_its_own_mel_band(frequency_hz: float) -> None:
    features = log_mel_features(tone(frequency_hz, 2.0))
    loudest = np.argmax(features[:, -100:].mean(axis=1))
    assert abs(int(loudest) - mel_band_of(frequency_hz)) <= 1


def test_a_short_utterance_sits_at_the_right_edge_and_a_long_one_keeps_its_end() -> None:
    features = log_mel_features(tone(1000.0, 1.0))
    band = mel_band_of(1000.0)
    assert features[band, -50:].min() > features[band, :600].max()  # silence in front
    long = np.concatenate([tone(300.0, 9.0), tone(3000.0, 1.0)])
    assert np.argmax(features_of_last(long, frames=50)) in range(mel_band_of(3000.0) - 1, 80)
    assert np.argmax(features_of_last(long[: 9 * SAMPLE_RATE_HZ], frames=50)) <= band


def features_of_last(samples: np.ndarray, frames: int) -> np.ndarray:
    mean: np.ndarray = log_mel_features(samples)[:, -frames:].mean(axis=1)
    return mean


def test_pcm_with_an_odd_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="even number of bytes, got 3"):
        pcm16_to_float(b"\0\0\0")


# --- the file: pinned, extracted, refused when it differs --------------------------------------


def test_the_fetched_model_is_the_pinned_file(model_path: Path) -> None:
    content = read_verified(model_path)
    assert hashlib.sha256(content).hexdigest() == SMART_TURN_V3_2.sha256
    assert (model_path.parent / "smart-turn-v3.2-cpu.LICENSE").read_text().startswith("BSD 2")


def test_a_tampered_copy_is_refused_and_never_loaded(model_path: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.onnx"
    content = bytearray(model_path.read_bytes())
    content[len(content) // 2] ^= 0x01
    tampered.write_bytes(bytes(content))
    with pytest.raises(SmartTurnFileError, match=r"tampered.onnx: sha256 [0-9a-f]{64}, the pinn"):
        EndOfTurn(tampered)
    tampered.write_bytes(bytes(content[:-1]))
    with pytest.raises(SmartTurnFileError, match="8679181 bytes, the pinned"):
        EndOfTurn(tampered)
    with pytest.raises(SmartTurnFileError, match="no such file"):
        EndOfTurn(tmp_path / "absent.onnx")


def test_a_wheel_holding_another_file_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "pipecat_ai-1.14.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMART_TURN_V3_2.member, b"not the model")
        archive.writestr(SMART_TURN_V3_2.licence_member, b"BSD 2-Clause License")
    with pytest.raises(SmartTurnFileError, match=r"any.whl!pipecat/.*: 13 bytes, the pinned"):
        extract(wheel, tmp_path / "models")
    assert not (tmp_path / "models" / SMART_TURN_V3_2.file_name).exists()
    wheel.write_bytes(b"PK not a zip")
    with pytest.raises(SmartTurnFileError, match="not a wheel holding"):
        extract(wheel, tmp_path / "models")


def test_the_real_wheel_extracts_to_the_same_file(model_path: Path, tmp_path: Path) -> None:
    (wheel,) = WHEELS_DIR.glob("pipecat_ai-1.14.0-*.whl")
    extracted = extract(wheel, tmp_path)
    assert extracted.read_bytes() == model_path.read_bytes()


# --- threads -------------------------------------------------------------------------------

THREADS_PROBE = """
import os, sys, time
from pathlib import Path
import numpy, onnxruntime  # onnxruntime's import starts a thread of its own (asleep)
from pipeline.end_of_turn import EndOfTurn
from thread_states import others, states as threads

before = threads()
model = EndOfTurn(Path(sys.argv[1]))
loaded = threads()
verdicts = [model.ask(b"\\0\\0" * 16000 * n) for n in (1, 2, 3)]
while any(verdict() is None for verdict in verdicts):
    os.sched_yield()
# A verdict is set just before its thread goes back to wait: it may still be running for a
# moment. A thread that spins never sleeps; one that waits is seen asleep within 2 s.
for _ in range(200):
    after = threads()
    if all(state == "S" for state in others(after).values()):
        break
    time.sleep(0.01)
new = {task: state for task, state in after.items() if task not in before}
print(len(before), len(loaded), len(after), "".join(new.values()), "".join(others(after).values()))
"""


def test_decisions_run_on_one_thread_that_sleeps_between_them(model_path: Path) -> None:
    """onnxruntime starts no pool (one thread per run) and its one decision thread is asleep
    (``S``, not running ``R``) once the decisions are done: nothing spins between them."""
    probed = run_probe(THREADS_PROBE, str(model_path))
    before, loaded, after, new_states, other_states = probed.split()
    assert int(loaded) == int(before)  # loading started no thread
    assert int(after) == int(before) + 1 and new_states == "S"  # the decision thread
    assert set(other_states) == {"S"}  # no thread but the main one is running


# --- decisions on piper's speech -------------------------------------------------------------

on_module_loop = pytest.mark.asyncio(loop_scope="module")
PAUSE_S = 0.2  # the pause at which the detector asks


@on_module_loop
@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("What's the weather like in Berlin today?", True),
        ("Please book me a table for two at seven tonight.", True),
        ("Where is the nearest train station?", True),
        ("I would like to order a large pizza and", False),
        ("So I was thinking that maybe we could", False),
        ("Let me think about it, I need", False),
    ],
)
async def test_a_finished_sentence_is_complete_and_a_cut_off_one_is_not(
    piper: PiperTextToSpeech, end_of_turn: EndOfTurn, text: str, complete: bool
) -> None:
    """Examples the model gets right. It calls these cut-off phrases complete (piper's
    intonation falls at their end as at a full stop): "I would like to order a", "My name
    is", "Can you tell me about the", "Could you please", "The meeting is at"."""
    pcm = await spoken_pcm(piper, text, SAMPLE_RATE_HZ) + silence_pcm(PAUSE_S, SAMPLE_RATE_HZ)
    assert end_of_turn.is_complete(pcm) is complete
    verdict = end_of_turn.ask(pcm)  # the same, from the decision thread
    assert wait_for_verdict(verdict) is complete


def wait_for_verdict(verdict: Verdict, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while (answer := verdict()) is None:
        assert time.monotonic() < deadline, "no verdict within the deadline"
        time.sleep(0.005)  # polling a condition with a deadline
    return answer


# --- whole turns, measured in audio: the frame at which the turn ends -------------------------

SERVER_VAD = VadConfig()  # the 500 ms window
SEMANTIC_VAD = VadConfig(semantic=True, decision_pause_ms=200, silence_duration_ms=700)  # auto


@dataclass
class Segmented:
    ends_ms: list[int]  # the input position at each TurnCommitted
    verdicts: list[bool]  # what the model said at each pause it was asked about


def segment(pcm: bytes, config: VadConfig, end_of_turn: EndOfTurn) -> Segmented:
    """Feeds ``pcm`` in 20 ms frames to a detector whose model answers at once (so where a
    turn ends depends on the audio alone)."""
    result = Segmented([], [])

    def ask(utterance: bytes) -> Verdict:
        verdict = end_of_turn.is_complete(utterance)
        result.verdicts.append(verdict)
        return lambda: verdict

    classify = webrtc_classifier(config, SAMPLE_RATE_HZ)
    detector = TurnDetector(config, SAMPLE_RATE_HZ, classify, time.monotonic, ask)
    frame_bytes = SAMPLE_RATE_HZ * 20 // 500
    for start in range(0, len(pcm) - frame_bytes + 1, frame_bytes):
        events = detector.push(pcm[start : start + frame_bytes])
        if any(isinstance(event, TurnCommitted) for event in events):
            result.ends_ms.append(detector.position_ms)
    return result


async def utterance(piper: PiperTextToSpeech, *parts: str, pause_s: float = 0.6) -> bytes:
    """Silence, the parts with ``pause_s`` between them, 1.5 s of silence."""
    spoken = [await spoken_pcm(piper, part, SAMPLE_RATE_HZ) for part in parts]
    pause = silence_pcm(pause_s, SAMPLE_RATE_HZ)
    edge = silence_pcm(0.3, SAMPLE_RATE_HZ)
    return edge + pause.join(spoken) + edge * 5


@on_module_loop
@pytest.mark.parametrize(
    "text", ["What's the weather like in Berlin today?", "Tell me a joke.", "What time is it?"]
)
async def test_a_complete_turn_ends_sooner_than_with_the_500_ms_window(
    piper: PiperTextToSpeech, end_of_turn: EndOfTurn, text: str
) -> None:
    pcm = await utterance(piper, text)
    (window_end_ms,) = segment(pcm, SERVER_VAD, end_of_turn).ends_ms
    semantic = segment(pcm, SEMANTIC_VAD, end_of_turn)
    assert semantic.verdicts == [True]
    (semantic_end_ms,) = semantic.ends_ms
    assert semantic_end_ms == window_end_ms - 500 + 200  # 300 ms of audio sooner


@on_module_loop
@pytest.mark.parametrize(
    "parts",
    [
        ("So I was thinking that maybe we could", "go to the beach tomorrow."),
        ("I would like to order a large pizza and", "a salad."),
    ],
)
async def test_a_pause_the_model_calls_incomplete_does_not_cut_the_turn(
    piper: PiperTextToSpeech, end_of_turn: EndOfTurn, parts: tuple[str, str]
) -> None:
    """A 600 ms pause mid-sentence: the 500 ms window cuts the sentence in two turns; semantic
    turn detection asks at the pause, hears "not done", and keeps one turn."""
    pcm = await utterance(piper, *parts)
    assert len(segment(pcm, SERVER_VAD, end_of_turn).ends_ms) == 2
    semantic = segment(pcm, SEMANTIC_VAD, end_of_turn)
    assert semantic.verdicts[0] is False  # asked at the mid-sentence pause first
    assert len(semantic.ends_ms) == 1


# --- the engine, as a Realtime session sets it ----------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sphinx() -> AsyncIterator[PocketsphinxSpeechToText]:
    stt = PocketsphinxSpeechToText()
    await stt.start()
    yield stt
    await stt.aclose()


def engine_config(turn_detection: dict[str, Any]) -> EngineConfig:
    policy = SessionPolicy(EngineConfig(realtime_playout=False))
    update = {"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}}
    return policy.engine_config(session_update_from(update).apply(policy.initial()))


def voice_end_config(turn_detection: dict[str, Any]) -> EngineConfig:
    """``engine_config`` with make run's turn detection: pauses counted from the voice's end
    (40 dB below its peak), the end-of-turn model hearing 120 ms of padding."""
    config = engine_config(turn_detection)
    return replace(config, vad=replace(config.vad, voice_end_db=40.0, model_pad_ms=120))


async def turn_end_ms(engine: ConversationEngine, pcm: bytes, model: EndOfTurn) -> int:
    """Feeds ``pcm`` frame by frame, each after the decisions asked before it are done and
    the words before a pause are transcribed (so the turn ends at the same frame however
    loaded the machine); where in ``pcm`` the turn ended."""
    frame_bytes = SAMPLE_RATE_HZ * 20 // 500
    start_ms = engine.input_position_ms
    was_speaking = False
    for start in range(0, len(pcm) - frame_bytes + 1, frame_bytes):
        model.wait_decided(timeout_s=60)
        await words_in(engine)
        engine.push_audio(pcm[start : start + frame_bytes])
        if was_speaking and not engine.user_speaking:
            return engine.input_position_ms - start_ms
        was_speaking = engine.user_speaking
    raise AssertionError("the turn did not end")


async def until(
    condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "the condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} never held"
        await asyncio.sleep(0.005)  # polling a condition with a deadline


async def words_in(engine: ConversationEngine, timeout_s: float = 60.0) -> None:
    await until(lambda: not engine.words_pending, timeout_s, "the words before the pause came")


@on_module_loop
async def test_a_semantic_vad_session_update_ends_the_engines_turn_at_the_short_pause(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText, model_path: Path
) -> None:
    """server_vad first, then session.update's semantic_vad: the engine's detector asks the
    process's model (on its decision thread) and ends the same sentence's turn sooner."""
    server = engine_config({"type": "server_vad", "create_response": False})
    semantic = engine_config({"type": "semantic_vad", "create_response": False})
    assert semantic.vad.semantic and semantic.vad.silence_duration_ms == 700
    pcm = await utterance(piper, "Where is the nearest train station?")
    model = shared_end_of_turn(model_path)
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(server, sphinx, agent, EspeakTextToSpeech())
    async with engine:
        window_end_ms = await turn_end_ms(engine, pcm, model)
        engine.reconfigure(semantic)
        semantic_end_ms = await turn_end_ms(engine, pcm, model)
        await engine.wait_idle(timeout_s=60)
    # asked ahead (70 ms), its verdict in by the 200 ms pause: the turn ends exactly there
    assert semantic_end_ms == window_end_ms - 300


async def collect(engine: ConversationEngine, events: list[Any]) -> None:
    """Appends the engine's events to ``events`` until its stream ends."""
    async for event in engine.events():
        events.append(event)


async def converse(engine: ConversationEngine, pcm: bytes, model: EndOfTurn) -> list[Any]:
    """Feeds ``pcm`` to a started engine as ``turn_end_ms`` does, to its end; the engine's
    events once it is idle."""
    events: list[Any] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(collect(engine, events))
        frame_bytes = SAMPLE_RATE_HZ * 20 // 500
        for start in range(0, len(pcm) - frame_bytes + 1, frame_bytes):
            model.wait_decided(timeout_s=60)
            await words_in(engine)
            engine.push_audio(pcm[start : start + frame_bytes])
        await engine.wait_idle(timeout_s=120)
        await engine.aclose()
    return events


def semantic_engine(
    sphinx: PocketsphinxSpeechToText, piper: PiperTextToSpeech, ask_pause_ms: int | None = None
) -> ConversationEngine:
    config = engine_config({"type": "semantic_vad"})
    if ask_pause_ms is not None:
        config = replace(config, vad=replace(config.vad, ask_pause_ms=ask_pause_ms))
    agent = LocalRuleBasedAgent(load_knowledge())
    return ConversationEngine(config, sphinx, agent, piper)


@on_module_loop
@pytest.mark.parametrize("ask_pause_ms", [None, 200])
async def test_the_final_transcript_is_in_when_the_turn_is_decided_and_answered_at_once(
    piper: PiperTextToSpeech,
    sphinx: PocketsphinxSpeechToText,
    model_path: Path,
    ask_pause_ms: int | None,
) -> None:
    """The words before the pause are transcribed while the model decides, and the turn's end
    is followed at once by its final transcript, then by the answer, started early on those
    words and held until the turn ends (so it is the answer's first event out). Asked at the
    decision's pause (200 ms), the words come in after it and the answer starts on them;
    asked ahead (the default, 70 ms), the model's "complete" starts the answer then, and
    ends the turn once the pause reaches 200 ms, with no second run."""
    pcm = await utterance(piper, "Where is the nearest train station?")
    engine = semantic_engine(sphinx, piper, ask_pause_ms)
    await engine.start()
    events = await converse(engine, pcm, shared_end_of_turn(model_path))
    kinds = [type(event) for event in events]
    stopped = kinds.index(ev.SpeechStoppedEvent)
    final = events[stopped + 1]
    assert isinstance(final, ev.InputTranscript) and final.final and "station" in final.text
    assert kinds[stopped + 2] is ev.ResponseStarted
    assert kinds.count(ev.ResponseStarted) == 1 and ev.InputTranscript not in kinds[stopped + 2 :]
    (done,) = [event for event in events if isinstance(event, ev.TurnCompleted)]
    assert done.record.answered_early
    assert done.record.early_answers_discarded == 0
    assert done.record.transcript == final.text
    assert [m.role for m in engine.history] == ["user", "assistant"]
    record = done.record  # how the turn's end was decided: asked ahead, once, and timed
    assert record.last_voiced_s is not None and record.turn_asked_s is not None
    assert record.speech_stopped_s is not None
    assert record.last_voiced_s < record.turn_asked_s <= record.speech_stopped_s
    assert record.decision is not None and record.decision.asked == 1
    assert record.decision.features_ms > 0 and record.decision.model_ms > 0
    assert record.decision.complete and 0.5 < (record.decision.probability or 0) <= 1  # it ended it
    metrics = turn_metrics_event("resp_1", record, None)
    assert metrics["last_voiced_ms"] < metrics["turn_asked_ms"] <= 0
    assert metrics["turn_decision"]["asked"] == 1


@on_module_loop
@pytest.mark.parametrize("before_verdict", [False, True])
@pytest.mark.parametrize(
    ("parts", "word", "said_done"),
    [
        (("So I was thinking that", "maybe we could go."), "thinking", False),
        (("Tell me a joke.", "About cats, please."), "joke", True),
    ],
)
async def test_a_short_pause_starts_an_early_answer_only_when_the_model_says_done(
    piper: PiperTextToSpeech,
    sphinx: PocketsphinxSpeechToText,
    model_path: Path,
    parts: tuple[str, str],
    word: str,
    said_done: bool,
    before_verdict: bool,
) -> None:
    """A 160 ms pause (a breath; silence is what the classifier here calls it, so the pause
    is exact), shorter than a decision's: the model is asked ahead and the words so far
    transcribed. Heard as "not yet", no answer starts there; heard as "complete", the answer
    starts on the words so far (the turn would end at 200 ms), and the user going on drops it
    unheard. With ``answer_before_verdict`` the answer starts on the words whatever the model
    says, and the user going on drops it, its providers' time counted as wasted. Either way
    one turn, one answer, on the words of both stretches."""
    pcm = await utterance(piper, *parts, pause_s=0.16)
    config = replace(engine_config({"type": "semantic_vad"}), answer_before_verdict=before_verdict)
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(config, sphinx, agent, piper, classify=loud)
    await engine.start()
    events = await converse(engine, pcm, shared_end_of_turn(model_path))
    kinds = [type(event) for event in events]
    assert kinds.count(ev.SpeechStoppedEvent) == 1 and kinds.count(ev.ResponseStarted) == 1
    (done,) = [event for event in events if isinstance(event, ev.TurnCompleted)]
    dropped = said_done or before_verdict
    assert engine.early_answers_discarded == dropped == done.record.early_answers_discarded
    if before_verdict:  # started on the words, it met its providers while the model decided
        assert done.record.early_answers_wasted_ms > 0
    elif not dropped:
        assert done.record.early_answers_wasted_ms == 0
    # (started on the verdict, ~150 ms into a 160 ms pause, a dropped answer may not have reached
    # its providers yet: nothing wasted, as a loaded CI machine showed)
    assert engine.early_answers_wasted_ms == done.record.early_answers_wasted_ms
    (final,) = [e for e in events if isinstance(e, ev.InputTranscript) and e.final]
    assert word in final.text and len(final.text.split()) > len(parts[0].split())  # both
    assert {e.response_id for e in events if hasattr(e, "response_id")} == {"resp_1"}


def loud(frame: bytes) -> bool:
    """Speech: any frame that is not digital silence."""
    return any(frame)


@on_module_loop
async def test_counted_from_the_voices_end_its_fading_tail_does_not_reopen_the_pause(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText, model_path: Path
) -> None:
    """With ``voice_end_db`` the model is asked while webrtcvad still calls the voice's fading
    tail speech: those frames are the pause, not the user going on, so the words before it
    stay one stretch, the model's "complete" (asked once) ends the turn, and the answer
    started on them is the turn's."""
    pcm = await utterance(piper, "Where is the nearest train station?")
    config = voice_end_config({"type": "semantic_vad"})
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(config, sphinx, agent, piper)
    await engine.start()
    events = await converse(engine, pcm, shared_end_of_turn(model_path))
    (done,) = [event for event in events if isinstance(event, ev.TurnCompleted)]
    decision = done.record.decision
    assert decision is not None and decision.asked == 1 and decision.complete
    assert done.record.answered_early and done.record.early_answers_discarded == 0
    assert [m.role for m in engine.history] == ["user", "assistant"]


class SpokenChunks:
    """Piper, noting the text of each chunk it is asked to speak."""

    def __init__(self, tts: PiperTextToSpeech) -> None:
        self.tts, self.name, self.asked = tts, tts.name, list[str]()

    @property
    def voices(self) -> tuple[str, ...]:
        return self.tts.voices

    def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[AudioChunk]:
        self.asked.append(text)
        return self.tts.synthesize(text, voice)


class HeldVerdicts:
    """The real model asked at a pause, its verdict kept from the engine until ``release``."""

    def __init__(self, model: EndOfTurn) -> None:
        self.model, self.released, self.asked = model, False, 0

    def asker(self, semantic: bool, rate_hz: int) -> Callable[[bytes], Verdict] | None:
        assert semantic and rate_hz == SAMPLE_RATE_HZ
        return self.ask

    def ask(self, pcm: bytes) -> Verdict:
        self.asked += 1
        decision = self.model.ask(pcm)
        return lambda: decision() if self.released else None


@on_module_loop
async def test_before_the_verdict_the_answer_starts_on_the_words_and_the_verdict_releases_it(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText, model_path: Path
) -> None:
    """With ``answer_before_verdict``, the model's verdict held back at a 120 ms pause (before
    the decision's 200): the words before it are in, and the answer has started and asked for
    its first chunk's speech, unheard. The verdict ("complete") ends the turn, and that held
    answer is the turn's one answer, released."""
    pcm = await utterance(piper, "Where is the nearest train station?")
    frame_bytes = SAMPLE_RATE_HZ * 20 // 500
    frames = [pcm[at : at + frame_bytes] for at in range(0, len(pcm), frame_bytes)]
    pause_at = max(i for i, frame in enumerate(frames) if any(frame)) + 1 + 6  # 120 ms in
    config = replace(engine_config({"type": "semantic_vad"}), answer_before_verdict=True)
    tts, held = SpokenChunks(piper), HeldVerdicts(shared_end_of_turn(model_path))
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(config, sphinx, agent, tts, classify=loud, end_of_turn=held.asker)
    await engine.start()
    events: list[Any] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(collect(engine, events))
        for frame in frames[:pause_at]:
            await words_in(engine)
            engine.push_audio(frame)
        await until(lambda: bool(tts.asked))  # the first chunk asked for, the verdict held
        assert held.asked == 1 and engine.user_speaking
        assert not {ev.SpeechStoppedEvent, ev.ResponseStarted} & {type(e) for e in events}
        held.model.wait_decided(timeout_s=60)
        held.released = True
        for frame in frames[pause_at:]:
            engine.push_audio(frame)
        await engine.wait_idle(timeout_s=120)
        await engine.aclose()
    kinds = [type(event) for event in events]
    assert kinds.count(ev.ResponseStarted) == 1
    assert kinds.index(ev.ResponseStarted) > kinds.index(ev.SpeechStoppedEvent)
    (done,) = [event for event in events if isinstance(event, ev.TurnCompleted)]
    assert done.record.answered_early and done.record.early_answers_discarded == 0
    assert held.asked == 1  # "complete", at once: no second question at 200 ms
    assert [m.role for m in engine.history] == ["user", "assistant"]


@on_module_loop
async def test_an_early_answer_is_thrown_away_unheard_when_the_user_goes_on(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText, model_path: Path
) -> None:
    """At the mid-sentence pause the answer starts on the words so far; the user goes on, so
    it is dropped: the whole sentence is one turn with one answer, and nothing of the dropped
    one is in the events or the conversation (only its count, in the turn's record)."""
    first, rest = "So I was thinking that maybe we could", "go to the beach tomorrow."
    pcm = await utterance(piper, first, rest)
    engine = semantic_engine(sphinx, piper)
    await engine.start()
    events = await converse(engine, pcm, shared_end_of_turn(model_path))
    kinds = [type(event) for event in events]
    assert kinds.count(ev.SpeechStoppedEvent) == 1 and kinds.count(ev.ResponseStarted) == 1
    (final,) = [e for e in events if isinstance(e, ev.InputTranscript) and e.final]
    assert "beach" in final.text and "thinking" in final.text  # both stretches' words
    (done,) = [event for event in events if isinstance(event, ev.TurnCompleted)]
    assert done.record.early_answers_discarded >= 1 and engine.early_answers_discarded >= 1
    assert done.record.transcript == final.text
    ids = {e.response_id for e in events if hasattr(e, "response_id")}
    assert ids == {"resp_1"}
    (started,) = [e for e in events if isinstance(e, ev.ResponseStarted)]
    assert kinds.index(ev.ResponseStarted) > kinds.index(ev.SpeechStoppedEvent)
    said = "".join(e.text for e in events if isinstance(e, ev.ResponseTextDelta))
    assert [(m.role, m.content) for m in engine.history] == [
        ("user", final.text),
        ("assistant", said.strip()),
    ]
    assert started.turn == done.record.turn


class HeardAudio:
    """A speech-to-text, noting the audio each transcription was fed and its final words."""

    def __init__(self, stt: MoonshineSpeechToText | PocketsphinxSpeechToText) -> None:
        self.stt, self.name = stt, stt.name
        self.heard: list[tuple[bytearray, list[str]]] = []

    async def transcribe(self, audio: AsyncIterator[AudioChunk]) -> AsyncIterator[Transcript]:
        fed, finals = bytearray(), list[str]()
        self.heard.append((fed, finals))

        async def noted() -> AsyncIterator[AudioChunk]:
            async for chunk in audio:
                fed.extend(chunk.pcm)
                yield chunk

        async for transcript in self.stt.transcribe(noted()):
            if transcript.final:
                finals.append(transcript.text)
            yield transcript


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def moonshine() -> AsyncIterator[MoonshineSpeechToText]:
    stt = MoonshineSpeechToText(MoonshineConfig(workers=1))
    await stt.start()
    yield stt
    await stt.aclose()


async def transcribed_at_once(stt: MoonshineSpeechToText, pcm: bytes) -> str:
    async def whole() -> AsyncIterator[AudioChunk]:
        yield AudioChunk(pcm, SAMPLE_RATE_HZ)

    return [transcript.text async for transcript in stt.transcribe(whole())][-1]


def with_gap(pcm: bytes, gap_s: float) -> bytes:
    """``gap_s`` of silence inserted at the quietest 20 ms within the middle of ``pcm``
    (between two of a sentence's words)."""
    frame_bytes = SAMPLE_RATE_HZ * 20 // 500
    frames = range(len(pcm) // frame_bytes * 35 // 100, len(pcm) // frame_bytes * 70 // 100)
    at = min(frames, key=lambda i: level_of(pcm[i * frame_bytes : (i + 1) * frame_bytes]))
    cut = at * frame_bytes
    return pcm[:cut] + silence_pcm(gap_s, SAMPLE_RATE_HZ) + pcm[cut:]


@on_module_loop
async def test_a_sentence_the_user_goes_on_with_after_a_short_gap_is_transcribed_whole(
    piper: PiperTextToSpeech, moonshine: MoonshineSpeechToText, model_path: Path
) -> None:
    """make run's turn detection (the voice's end, 40 dB; the model's 120 ms of padding) and
    "Tell me about the moon." with a short gap inside: the model is asked at the gap and the
    words before it transcribed ("Tell me about."), then the user goes on. Those words are
    dropped, not joined: the turn's transcript is one transcription of the whole utterance,
    one sentence (joined, it was "Tell me about. The moon.", in Chromium "The mood.")."""
    pcm = with_gap(await utterance(piper, "Tell me about the moon."), 0.06)
    config = voice_end_config({"type": "semantic_vad", "create_response": False})
    stt = HeardAudio(moonshine)
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(config, stt, agent, piper)
    await engine.start()
    events = await converse(engine, pcm, shared_end_of_turn(model_path))
    (stopped,) = [e for e in events if isinstance(e, ev.SpeechStoppedEvent)]
    (final,) = [e for e in events if isinstance(e, ev.InputTranscript) and e.final]
    assert len(stt.heard) >= 2, "the gap cut no stretch: the test would test nothing"
    fed, finals = stt.heard[-1]  # the last transcription: all the utterance's audio
    assert finals == [final.text]
    assert fed.startswith(stopped.pcm)
    assert final.text == await transcribed_at_once(moonshine, bytes(fed))
    assert engine.history == [Message("user", final.text)]
    assert "moon" in re.findall(r"[a-z']+", final.text.lower())
    assert not re.search(r"[.?!] ", final.text), final.text  # one sentence


class GoingOn(ConversationEngine):
    """The engine, counting the stretches the user went on after."""

    went_on = 0

    def _go_on(self, heard: Heard) -> None:
        self.went_on += 1
        super()._go_on(heard)


@on_module_loop
async def test_a_gap_the_user_goes_on_after_within_one_push_still_gets_its_transcript(
    piper: PiperTextToSpeech, sphinx: PocketsphinxSpeechToText, model_path: Path
) -> None:
    """The same sentence with its gap pushed at once (a client's big append): the stretch
    opened at the speech's start, cut at the gap and voided when the user goes on, all before
    its transcription ever ran. The turn still gets its final transcript and answer (the
    voided one, cancelled unstarted, left a pending stretch: the turn waited for it forever)."""
    pcm = with_gap(await utterance(piper, "Tell me about the moon."), 0.06)
    config = voice_end_config({"type": "semantic_vad"})
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = GoingOn(config, sphinx, agent, piper)
    await engine.start()
    events: list[Any] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(collect(engine, events))
        engine.push_audio(pcm)
        engine.finish_input()
        await engine.wait_idle(timeout_s=120)
        await engine.aclose()
    assert engine.went_on, "the gap cut no stretch: the test would test nothing"
    (final,) = [e for e in events if isinstance(e, ev.InputTranscript) and e.final]
    assert "moon" in final.text.lower()
    assert engine.history[0] == Message("user", final.text)
    assert len(engine.history) == 2, engine.history  # and the answer


@on_module_loop
async def test_past_its_bound_an_utterance_is_not_heard_again_and_its_stretches_join(
    piper: PiperTextToSpeech,
    sphinx: PocketsphinxSpeechToText,
    model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sentence with its gap, the bound on an utterance heard again whole below the speech
    before the gap: the words before the pause stand, the next stretch is fed only the speech
    since it, and the turn's transcript is the stretches' words joined (a long monologue's
    every pause would otherwise decode all of it again)."""
    monkeypatch.setattr(stretches, "MAX_REHEARD_S", 0.2)
    pcm = with_gap(await utterance(piper, "Tell me about the moon."), 0.06)
    config = voice_end_config({"type": "semantic_vad", "create_response": False})
    stt = HeardAudio(sphinx)
    agent = LocalRuleBasedAgent(load_knowledge())
    engine = GoingOn(config, stt, agent, piper)
    await engine.start()
    events = await converse(engine, pcm, shared_end_of_turn(model_path))
    (final,) = [e for e in events if isinstance(e, ev.InputTranscript) and e.final]
    assert engine.went_on and len(stt.heard) >= 2, "the gap cut no stretch"
    (first, _), (last, _) = stt.heard[0], stt.heard[-1]
    assert not last.startswith(first), "the utterance's start was heard again"
    words = [text.strip() for _, finals in stt.heard for text in finals if text.strip()]
    assert final.text == " ".join(words), (final.text, words)
    assert len(words) >= 2, words  # the stretches' words, joined


def test_without_a_checked_model_semantic_vad_falls_back_to_the_window_and_says_why(
    model_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert end_of_turn_asker(False, SAMPLE_RATE_HZ) is None  # server_vad: never loaded
    assert end_of_turn_asker(True, 8000) is None
    assert "needs 16 kHz input, not 8000 Hz" in caplog.text
    tampered = tmp_path / "smart-turn.onnx"
    tampered.write_bytes(model_path.read_bytes()[:-1] + b"\0")
    monkeypatch.setenv("PIPELINE_SMART_TURN_MODEL", str(tampered))
    assert end_of_turn_asker(True, SAMPLE_RATE_HZ) is None
    assert "semantic turn detection off, the silence window decides" in caplog.text
    assert f"{tampered}: sha256" in caplog.text
    monkeypatch.setenv("PIPELINE_SMART_TURN_MODEL", str(model_path))
    assert end_of_turn_asker(True, SAMPLE_RATE_HZ) is not None


def test_the_pin_file_pins_the_downloaded_wheel(model_path: Path, tmp_path: Path) -> None:
    (wheel,) = WHEELS_DIR.glob("pipecat_ai-1.14.0-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert f"--hash=sha256:{digest}" in PINS_FILE.read_text()
    assert pinned_version(PINS_FILE) == "1.14.0"
    (tmp_path / "pins.txt").write_text("pipecat==1.14.0\n")
    with pytest.raises(SmartTurnFileError, match="pins.txt: no pipecat-ai==VERSION line"):
        pinned_version(tmp_path / "pins.txt")
