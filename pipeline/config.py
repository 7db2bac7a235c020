"""Pipeline configuration: one frozen dataclass per component, and ``PipelineConfig`` over
them, loaded from ``PIPELINE_*`` variables.

Policy layer, pure. The components' settings (``VadConfig``, ``ChunkerConfig``,
``EngineConfig``, ``PocketsphinxConfig``, ``MoonshineConfig``, ``PiperConfig``, ``EspeakConfig``,
``LocalAgentConfig``, ``LocalLlmConfig``, ``PoolPolicy``: the process's pool for the heavy
offline stages) are validated when built; the modules that run the components import
them from here. ``PipelineConfig`` is what an operator sets: every field ``name`` is read from
``PIPELINE_<NAME>`` and mirrored by the CLI flag ``--<name-with-dashes>`` (flags win). Values
are validated at load with a message naming the variable. Provider choice per stage:

- ``stt``: ``pocketsphinx`` | ``moonshine`` (``pipeline.moonshine_stt``) | ``openai``;
  ``llm``: ``rule`` | ``local`` | ``openai``; ``tts``: ``piper`` | ``espeak`` | ``openai``.
  ``rule`` is the rule-based agent (``pipeline.local_agent``); ``local`` a language model run
  in the process (``pipeline.llama_llm``, the ``local-llm`` install extra), with the rule-based
  agent in its place when the extra is missing or the model does not load.
- Unset stages default to offline (moonshine, rule, piper), unless ``OPENAI_API_KEY`` or
  ``OPENAI_BASE_URL`` is set: then to ``openai``.
- ``llm_api``: ``chat`` (Chat Completions, the default) | ``responses`` (the Responses API,
  ``pipeline.openai_responses``): how the ``openai`` language model asks its backend.
  ``openai_llm_reasoning``: whether its model takes a reasoning effort, so that a session's
  effort is sent (``true``/``false``: the operator's word, for a compatible server whose model
  names say nothing reliable); unset or ``auto``, the model's name decides (OpenAI's o1, o3,
  o4 and gpt-5 families take one: ``openai_providers.takes_reasoning``).
- ``provider_http``: ``lean`` (the default: the openai providers' transcription, chat and
  speech requests sent by ``pipeline.openai_http``, the SDK's same requests without its and
  httpx's per-request work) | ``sdk`` (through the SDK's own request path).
- With ``fallback`` on, an OpenAI stage is hardened (timeout, retry budget, circuit breaker)
  with the offline provider of the same stage behind it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pipeline.context_window import O200K_BASE, ContextWindow, encoding_for_model
from pipeline.providers import (
    DEFAULT_OPTIONS,
    NO_HINTS,
    ModelOptions,
    ToolChoice,
    TranscriptionHints,
)

ENV_PREFIX = "PIPELINE_"
CHOICES = {
    "stt": ("pocketsphinx", "moonshine", "openai"),
    "llm": ("rule", "local", "openai"),
    "tts": ("piper", "espeak", "openai"),
}
VAD_MODELS = ("auto", "silero", "webrtc")  # VadConfig.model
DEFAULT_THRESHOLD = 0.5  # server_vad's, as OpenAI's
LLM_APIS = ("chat", "responses")  # the openai language model: /chat/completions or /responses
PROVIDER_HTTP = ("lean", "sdk")  # how the openai providers send their requests


class ConfigError(ValueError):
    pass


# --- components ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VadConfig:
    threshold: float = DEFAULT_THRESHOLD
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    min_speech_ms: int = 60
    # semantic_vad: at a pause this long the end-of-turn model decides (pipeline.end_of_turn);
    # "not done" waits on up to silence_duration_ms. 200 ms: asked sooner, at 150 or 100 ms,
    # it splits people's complete sentences at their breaths (3 and 7 of 10 recorded ones:
    # python -m loadtest.bench_end_of_turn_recorded), though not piper's
    semantic: bool = False
    decision_pause_ms: int = 200
    # the model is asked ahead, at this shorter pause, and the words so far transcribed then,
    # so both are in when the decision's pause is reached; >= decision_pause_ms: not ahead.
    # 70 ms leaves the model's run (~85-95 ms CPU here) 130 ms before the decision; asked at
    # 70, 80 or 100 ms both end-of-turn benchmarks segment alike (at 60 one sentence more waits)
    ask_pause_ms: int = 70
    # who calls a frame speech: "silero" (pipeline.silero_vad: webrtcvad gates, Silero's
    # probability meets ``threshold``; webrtcvad alone where its file is missing), "webrtc"
    # (``threshold`` in webrtcvad's four steps), "auto": silero for server_vad with a
    # threshold other than the default, whose CPU it would cost every call (the module)
    model: str = "auto"
    # a voiced frame this far under its utterance's loudest is the voice's fading tail, and
    # pauses count from before it (pipeline.vad: ~100 ms sooner on piper's voice); math.inf,
    # the library's default: from webrtcvad's own end, whose hangover the pauses were tuned
    # with (at the voice's end semantic_vad's model, hearing less silence, says "not yet" more
    # often). 40, with model_pad_ms 120, in make run's stack and the image (deploy/local.py)
    voice_end_db: float = math.inf
    # digital silence after what the end-of-turn model hears (pipeline.vad): with the pauses
    # counted from the voice's end, the silence webrtcvad's tail used to add. With voice_end_db
    # 40 and 120 ms, piper's complete turns end 400 ms sooner than the window (300 without)
    # and 6 of 10 mid-sentence pauses are cut as without, but not the same ones (7 at 100 ms,
    # 8 at 150); people's recordings unchanged (their noise floor hides the voice's end). The
    # model is asked at gaps inside sentences it never was before: the words are then
    # transcribed again whole when the user goes on (pipeline.stretches)
    model_pad_ms: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"vad threshold must be within 0..1, got {self.threshold}")
        if not self.voice_end_db > 0:
            raise ValueError(f"vad voice_end_db must be > 0, got {self.voice_end_db}")
        if self.model not in VAD_MODELS:
            raise ValueError(
                f"vad model must be one of {', '.join(VAD_MODELS)}, got {self.model!r}"
            )
        names = (
            "prefix_padding_ms",
            "silence_duration_ms",
            "min_speech_ms",
            "decision_pause_ms",
            "ask_pause_ms",
            "model_pad_ms",
        )
        for name in names:
            if getattr(self, name) < 0:
                raise ValueError(f"vad {name} must be >= 0, got {getattr(self, name)}")

    @property
    def aggressiveness(self) -> int:
        """webrtcvad mode 0..3 for this threshold."""
        return min(3, int(self.threshold * 4))


@dataclass(frozen=True)
class ChunkerConfig:
    first_min_chars: int = 12
    min_chars: int = 2
    max_chars: int = 200
    first_words: int = 0  # > 0: the first chunk ends after this many words (pipeline.chunker)

    def __post_init__(self) -> None:
        if not 0 < self.min_chars <= self.max_chars or self.first_min_chars > self.max_chars:
            raise ValueError(
                "chunker sizes must satisfy 0 < min_chars <= max_chars and "
                f"first_min_chars <= max_chars, got {self}"
            )
        if not 0 <= self.first_words <= 50:
            raise ValueError(f"chunker first_words must be within 0..50, got {self.first_words}")


# audio.input.noise_reduction (pipeline.noise_reduction): what each kind of microphone gets
NOISE_REDUCTION_KINDS = ("near_field", "far_field")
DEFAULT_STRENGTH = 1.0  # OpenAI's default
_FLOOR_DB_AT_FULL = {"near_field": -12.0, "far_field": -9.0}
_OVER = {"near_field": 3.0, "far_field": 2.0}
_RISE_DB_PER_S = {"near_field": 6.0, "far_field": 3.0}


@dataclass(frozen=True)
class NoiseReduction:
    kind: str = "near_field"
    strength: float = DEFAULT_STRENGTH  # 0: the floor at 0 dB (nothing removed); 1: the deepest

    def __post_init__(self) -> None:
        if self.kind not in NOISE_REDUCTION_KINDS:
            raise ValueError(f"noise reduction kind must be one of {NOISE_REDUCTION_KINDS}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"noise reduction strength must be within 0..1: {self.strength}")

    @property
    def floor_gain(self) -> float:
        return float(10.0 ** (_FLOOR_DB_AT_FULL[self.kind] * self.strength / 20.0))

    def rise_per_frame(self, frame_ms: int) -> float:
        """The factor the floor's power may grow by in one frame."""
        return float(10.0 ** (_RISE_DB_PER_S[self.kind] * frame_ms / 1000.0 / 10.0))


def over_subtraction(config: NoiseReduction) -> float:
    return _OVER[config.kind]


@dataclass(frozen=True)
class EngineConfig:
    input_sample_rate_hz: int = 16000
    output_sample_rate_hz: int = 24000
    frame_ms: int = 20
    realtime_playout: bool = True  # False: emit frames as fast as produced (files, tests)
    max_tool_rounds: int = 4
    instructions: str = ""
    create_response: bool = True  # answer each user turn (False: wait for create_response())
    interrupt_response: bool = True  # speech onset during playout is a barge-in
    turn_detection: bool = True  # False: no VAD; the client commits the input (push-to-talk)
    voice: str | None = None  # one of the TTS's voices; None: its default
    speak: bool = True  # False: answers are text only (no TTS, no audio)
    max_output_tokens: int | None = None  # None: no limit
    tool_choice: ToolChoice = "auto"  # of the first round of a response (tools offered)
    # asked of the model (``providers.ModelOptions``); without parallel calls the engine runs
    # at most one call a model turn makes
    model_options: ModelOptions = DEFAULT_OPTIONS
    speed: float = 1.0  # the TTS's speaking rate, a multiple of its normal one
    transcription: TranscriptionHints = NO_HINTS  # language and prompt for the STT
    context: ContextWindow = ContextWindow()  # how much conversation the model is sent
    # semantic_vad: start the answer at the pause the end-of-turn model is asked about (held
    # until the turn ends; thrown away unheard if the user goes on)
    answer_early: bool = True
    # ... as soon as the words before that pause are in, not once the model has said the user
    # is done or the pause reached the decision's (pipeline.stretches; PipelineConfig: off)
    answer_before_verdict: bool = False
    vad: VadConfig = field(default_factory=VadConfig)
    noise_reduction: NoiseReduction | None = None  # None: the input is not filtered
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)

    def __post_init__(self) -> None:
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"engine frame_ms must be 10, 20 or 30, got {self.frame_ms}")
        if not 8000 <= self.output_sample_rate_hz <= 48000:
            raise ValueError(
                f"output sample rate must be 8000..48000 Hz: {self.output_sample_rate_hz}"
            )
        if self.max_tool_rounds < 0:
            raise ValueError(f"max_tool_rounds must be >= 0, got {self.max_tool_rounds}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be >= 1, got {self.max_output_tokens}")


@dataclass(frozen=True)
class PocketsphinxConfig:
    workers: int = 1
    partial_interval_ms: int = 200
    start_timeout_s: float = 60.0
    final_timeout_s: float = 10.0
    # An utterance whose audio stops arriving for this long (a stalled client; no end of
    # speech) hands its decoder to an utterance waiting for one; it replays its audio on a
    # decoder when its audio comes back.
    stall_release_ms: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ValueError(f"pocketsphinx workers must be within 1..64, got {self.workers}")
        if self.partial_interval_ms <= 0:
            raise ValueError("pocketsphinx partial_interval_ms must be > 0")
        if self.stall_release_ms <= 0:
            raise ValueError("pocketsphinx stall_release_ms must be > 0")


@dataclass(frozen=True)
class MoonshineConfig:
    workers: int = 1  # loaded models (~150 MB each), one thread each
    # a partial after this much new audio (each costs a pass over the audio so far); 0: none,
    # but the one at each pause (quiet_decode_ms)
    partial_interval_ms: int = 0
    model_dir: str = ""  # "": the model inside the installed moonshine-voice wheel
    # the speech paused this long (under quiet_level, RMS of full scale): decode it now, and
    # that decode is the final if only quiet audio follows; 0: decode only at the end
    quiet_decode_ms: int = 200
    quiet_level: float = 0.005

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ValueError(f"moonshine workers must be within 1..64, got {self.workers}")
        if self.partial_interval_ms < 0 or self.quiet_decode_ms < 0:
            raise ValueError("moonshine partial_interval_ms and quiet_decode_ms must be >= 0")
        if not 0 < self.quiet_level < 1:
            raise ValueError(f"moonshine quiet_level must be within 0..1, got {self.quiet_level}")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class PoolPolicy:
    size: int = 0  # 0: usable_cores()
    max_wait_s: float = 0.5
    max_queue: int = 0  # 0: 2 * size
    window_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.size <= 256:
            raise ValueError(f"pool size must be within 0..256 (0: the cores), got {self.size}")
        if self.max_wait_s <= 0 or self.window_s <= 0:
            raise ValueError("pool max_wait_s and window_s must be > 0")
        if self.max_queue < 0:
            raise ValueError(f"pool max_queue must be >= 0, got {self.max_queue}")

    def resolved(self) -> PoolPolicy:
        size = self.size or usable_cores()
        return PoolPolicy(size, self.max_wait_s, self.max_queue or 2 * size, self.window_s)


@dataclass(frozen=True)
class PiperConfig:
    noise_scale: float | None = None  # None: the voice's default
    noise_w_scale: float | None = None
    length_scale: float | None = None
    onnx_threads: int = 1
    cache_bytes: int = 32 << 20  # synthesized speech kept by text (pipeline.speech_cache); 0: none

    def __post_init__(self) -> None:
        if self.onnx_threads < 1:
            raise ValueError(f"piper onnx_threads must be >= 1, got {self.onnx_threads}")
        if self.cache_bytes < 0:
            raise ValueError(f"piper cache_bytes must be >= 0, got {self.cache_bytes}")


@dataclass(frozen=True)
class EspeakConfig:
    voice: str = "en-us"
    words_per_minute: int = 175

    def __post_init__(self) -> None:
        if not 80 <= self.words_per_minute <= 450:
            raise ValueError(
                f"espeak words_per_minute must be within 80..450: {self.words_per_minute}"
            )


@dataclass(frozen=True)
class LocalAgentConfig:
    tokens_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens_per_s < 0:
            raise ValueError(f"local agent tokens_per_s must be >= 0, got {self.tokens_per_s}")


@dataclass(frozen=True)
class LocalLlmConfig:
    cache_dir: str = ""  # where the model file is assembled; "": ~/.cache/voicerelay/models
    # 0: ``default_llm_threads`` of the usable cores (half of them, at least 2 where there are)
    threads: int = 0
    context_tokens: int = 4096  # per conversation generating at once
    parallel: int = 1  # conversations generating at once (more wait their turn)
    max_tokens: int = 200  # per answer
    temperature: float = 0.0  # 0: always the likeliest token (the same answer every time)
    # its first spoken chunk ends after this many words (0: at a clause, as for the other
    # brains): it writes a few tokens a second on shared cores (ChunkerConfig.first_words)
    first_words: int = 3
    # the user's words so far read into the model's cache while they speak, so the turn's end
    # leaves only the last words to read (LlamaCppLanguageModel.warm). Off: it saves the
    # model's reading after the turn (7 new tokens instead of 10), but in the pipeline, with
    # Moonshine's partials on, no gain was measured yet (README)
    read_ahead: bool = False
    # once an answer is written to its end, the conversation with it and the next user message's
    # header read into the cache while it plays (LlamaCppLanguageModel._read_next_header)
    read_next_header: bool = True
    # threads reading a turn's prompt (0: twice ``threads``, within the usable cores): it is
    # read after speech-to-text and before text-to-speech, when the other cores are free
    # (``python -m loadtest.local_llm_first_chunk --conversation``, 2 cores, load 3.5-8.6:
    # first token median 734 and 804 ms with 2, 1,124 and 1,167 ms with 1)
    prompt_threads: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.first_words <= 50:
            raise ValueError(f"local llm first_words must be within 0..50, got {self.first_words}")
        if not 0 <= self.threads <= 64:
            raise ValueError(f"local llm threads must be within 0..64, got {self.threads}")
        if not 0 <= self.prompt_threads <= 64:
            raise ValueError(
                f"local llm prompt_threads must be within 0..64, got {self.prompt_threads}"
            )
        if not 512 <= self.context_tokens <= 32768:
            raise ValueError(
                f"local llm context_tokens must be within 512..32768, got {self.context_tokens}"
            )
        if not 1 <= self.parallel <= 16:
            raise ValueError(f"local llm parallel must be within 1..16, got {self.parallel}")
        if not 1 <= self.max_tokens < self.context_tokens // 2:
            raise ValueError(
                "local llm max_tokens must be >= 1 and under half of context_tokens, "
                f"got {self.max_tokens}"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"local llm temperature must be within 0..2, got {self.temperature}")

    @property
    def resolved_threads(self) -> int:
        return self.threads or default_llm_threads(usable_cores())


def default_llm_threads(cores: int) -> int:
    """Threads writing the local model's tokens: half the cores, but at least 2 where there are
    two (at most 8). Each token reads the whole model (~1 GB) from memory, which one core does at
    about half the speed two do: on an idle 2-core Intel Xeon a token took 166-173 ms on 1
    thread and 85-87 ms on 2. With OpenMP's threads waiting briefly at each step
    (``brief_openmp_spin``), two threads on busy cores lose little until the cores are very
    busy: beside 2 busy loops 200-207 ms a token against 212-220 on 1 thread, beside 6 489-495
    against 451-463, beside 9 803-859 against 652-660 (an earlier measurement, before that
    brief wait, had 24-45 s per short answer on 2 threads against 3-5 s on 1, under a load of
    9). In the Chromium benchmark, runs alternated: p50 1,483, 1,710, 1,763 and 1,675 ms with 2
    threads against 2,559, 1,640 and 2,117 with 1 (``loadtest.bench_e2e``, load 1-2.5)."""
    return max(1, min(cores, 8, max(2, cores // 2)))


# --- the pipeline, as an operator sets it ----------------------------------------------------


@dataclass(frozen=True)
class PipelineConfig:
    stt: str = ""  # "" = the default for the environment (see module docstring)
    llm: str = ""
    tts: str = ""
    fallback: bool = True
    openai_stt_model: str = "gpt-4o-mini-transcribe"
    openai_llm_model: str = "gpt-4o-mini"
    llm_api: str = "chat"  # the openai language model's API: "chat" or "responses"
    # the openai providers' requests: "lean" (pipeline.openai_http) or "sdk" (the SDK's path)
    provider_http: str = "lean"
    # the openai language model takes a reasoning effort (o-series, gpt-5): a session's
    # reasoning.effort is sent; off, it is reported and not sent (a model without it refuses it);
    # None ("" or "auto"): its name decides
    openai_llm_reasoning: bool | None = None
    openai_tts_model: str = "gpt-4o-mini-tts"
    openai_tts_voice: str = "alloy"
    vad_threshold: float = 0.5
    vad_prefix_padding_ms: int = 300
    vad_silence_duration_ms: int = 500
    vad_min_speech_ms: int = 60
    vad_ask_pause_ms: int = 70  # semantic_vad: the model asked ahead at this pause (VadConfig)
    vad_model: str = "auto"  # auto | silero | webrtc (VadConfig.model)
    vad_voice_end_db: float = math.inf  # VadConfig.voice_end_db; e.g. 40
    vad_model_pad_ms: int = 0  # VadConfig.model_pad_ms
    input_sample_rate_hz: int = 16000
    output_sample_rate_hz: int = 24000
    realtime_playout: bool = True
    max_tool_rounds: int = 4
    instructions: str = ""
    knowledge_file: str = ""  # "" = the sample shipped in pipeline/data/knowledge.md
    stt_workers: int = 0  # pocketsphinx decoder processes, moonshine models; 0: pool_size
    moonshine_partial_interval_ms: int = 0  # 0: partials only at pauses
    stt_stall_release_ms: int = 1000
    pool_size: int = 0  # slots per heavy offline stage (STT, TTS); 0: the usable cores
    pool_max_wait_ms: int = 500  # a job waited longer for a slot: the pool is saturated
    pool_max_queue: int = 0  # more jobs wait than this: saturated; 0: 2 * pool_size
    piper_noise_scale: float | None = None
    piper_noise_w_scale: float | None = None
    piper_length_scale: float | None = None
    piper_cache_mb: float = 32.0  # synthesized speech kept by text, shared by calls; 0: none
    espeak_voice: str = "en-us"
    local_agent_tokens_per_s: float = 0.0
    local_llm_cache_dir: str = ""
    local_llm_threads: int = 0
    local_llm_context_tokens: int = 4096
    local_llm_parallel: int = 1
    local_llm_max_tokens: int = 200
    local_llm_temperature: float = 0.0
    local_llm_first_words: int = 3  # LocalLlmConfig.first_words
    local_llm_read_ahead: bool = False  # LocalLlmConfig.read_ahead
    local_llm_read_next_header: bool = True  # LocalLlmConfig.read_next_header
    local_llm_prompt_threads: int = 0  # LocalLlmConfig.prompt_threads
    answer_early: bool = True
    # EngineConfig.answer_before_verdict. Off: the early answer already starts at the
    # decision's pause (200 ms) if the verdict is not in by then, so starting on the words
    # gains only when they come in before both (python -m loadtest.bench_turn_replay: 11 of
    # 80 turns, 3-48 ms sooner), and a breath heard as "not yet" starts an answer thrown away
    # (with openai, paid for)
    answer_before_verdict: bool = False
    # truncation's token encoding (pipeline.context_window) loaded as the providers open, not
    # in a call: its first load holds the interpreter ~1 s. On in the image (deploy/Dockerfile)
    encoding_preload: bool = False
    # the rule-based agent's fixed replies synthesized as the providers open
    # (pipeline.speech_prewarm); on in make run, the benchmarks' stacks and the image
    speech_prewarm: bool = False

    def __post_init__(self) -> None:
        for stage, allowed in CHOICES.items():
            if getattr(self, stage) not in ("", *allowed):
                raise ConfigError(
                    f"{ENV_PREFIX}{stage.upper()} must be one of {', '.join(allowed)}; "
                    f"got {getattr(self, stage)!r}"
                )
        if self.llm_api not in LLM_APIS:
            raise ConfigError(
                f"{ENV_PREFIX}LLM_API must be one of {', '.join(LLM_APIS)}; got {self.llm_api!r}"
            )
        if self.provider_http not in PROVIDER_HTTP:
            choices = ", ".join(PROVIDER_HTTP)
            raise ConfigError(
                f"{ENV_PREFIX}PROVIDER_HTTP must be one of {choices}; got {self.provider_http!r}"
            )
        try:
            self.engine_config()
            self.pocketsphinx_config()
            self.moonshine_config()
            self.pool_policy()
            self.piper_config()
            self.local_agent_config()
            self.local_llm_config()
        except ValueError as error:
            raise ConfigError(f"invalid pipeline configuration: {error}") from None

    def resolved(self, environ: Mapping[str, str]) -> PipelineConfig:
        """Empty stage choices replaced by the environment's default."""
        hosted = bool(environ.get("OPENAI_API_KEY") or environ.get("OPENAI_BASE_URL"))
        return replace(
            self,
            stt=self.stt or ("openai" if hosted else "moonshine"),  # loadtest/bench_stt.py
            llm=self.llm or ("openai" if hosted else "rule"),
            tts=self.tts or ("openai" if hosted else "piper"),
        )

    def engine_config(self) -> EngineConfig:
        vad = VadConfig(
            self.vad_threshold,
            self.vad_prefix_padding_ms,
            self.vad_silence_duration_ms,
            self.vad_min_speech_ms,
            ask_pause_ms=self.vad_ask_pause_ms,
            model=self.vad_model,
            voice_end_db=self.vad_voice_end_db,
            model_pad_ms=self.vad_model_pad_ms,
        )
        return EngineConfig(
            input_sample_rate_hz=self.input_sample_rate_hz,
            output_sample_rate_hz=self.output_sample_rate_hz,
            realtime_playout=self.realtime_playout,
            max_tool_rounds=self.max_tool_rounds,
            instructions=self.instructions,
            answer_early=self.answer_early,
            answer_before_verdict=self.answer_before_verdict,
            vad=vad,
            chunker=ChunkerConfig(first_words=self._first_words()),
            context=ContextWindow(encoding=self.token_encoding()),
        )

    def token_encoding(self) -> str:
        """The encoding truncation counts tokens in (``pipeline.context_window``): the OpenAI
        language model's when it answers, else that of OpenAI's current models."""
        return encoding_for_model(self.openai_llm_model) if self.llm == "openai" else O200K_BASE

    def _first_words(self) -> int:
        return self.local_llm_config().first_words if self.llm == "local" else 0

    def pool_policy(self) -> PoolPolicy:
        return PoolPolicy(self.pool_size, self.pool_max_wait_ms / 1000, self.pool_max_queue)

    def pocketsphinx_config(self) -> PocketsphinxConfig:
        workers = self.stt_workers or min(64, self.pool_policy().resolved().size)
        return PocketsphinxConfig(workers=workers, stall_release_ms=self.stt_stall_release_ms)

    def moonshine_config(self) -> MoonshineConfig:
        workers = self.stt_workers or min(64, self.pool_policy().resolved().size)
        return MoonshineConfig(workers, self.moonshine_partial_interval_ms)

    def piper_config(self) -> PiperConfig:
        return PiperConfig(
            self.piper_noise_scale,
            self.piper_noise_w_scale,
            self.piper_length_scale,
            cache_bytes=int(self.piper_cache_mb * (1 << 20)),
        )

    def espeak_config(self) -> EspeakConfig:
        return EspeakConfig(voice=self.espeak_voice)

    def local_agent_config(self) -> LocalAgentConfig:
        return LocalAgentConfig(tokens_per_s=self.local_agent_tokens_per_s)

    def local_llm_config(self) -> LocalLlmConfig:
        return LocalLlmConfig(
            self.local_llm_cache_dir,
            self.local_llm_threads,
            self.local_llm_context_tokens,
            self.local_llm_parallel,
            self.local_llm_max_tokens,
            self.local_llm_temperature,
            self.local_llm_first_words,
            self.local_llm_read_ahead,
            self.local_llm_read_next_header,
            self.local_llm_prompt_threads,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PipelineConfig:
        return cls.from_values(
            {f.name: environ[env_name(f.name)] for f in fields(cls) if env_name(f.name) in environ},
            source="environment",
        )

    @classmethod
    def from_values(cls, raw: Mapping[str, str], source: str) -> PipelineConfig:
        types = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, text in raw.items():
            values[name] = _parse(types[name], text, f"{env_name(name)} ({source})")
        return cls(**values)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _parse(type_name: str, text: str, where: str) -> Any:
    parsers: dict[str, Callable[[str], Any]] = {
        "str": str,
        "int": int,
        "float": float,
        "bool": _parse_bool,
        "float | None": lambda value: None if value.strip() == "" else float(value),
        "bool | None": lambda value: None if value.strip() in ("", "auto") else _parse_bool(value),
    }
    try:
        return parsers[type_name](text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a valid {type_name}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field, mirroring its ``PIPELINE_*`` variable."""
    group = parser.add_argument_group("pipeline configuration (flags override PIPELINE_* vars)")
    for f in fields(PipelineConfig):
        group.add_argument(
            flag_name(f.name), dest=f"config_{f.name}", metavar=str(f.type).split()[0].upper(),
            help=f"default from {env_name(f.name)}; built-in {f.default!r}",
        )  # fmt: skip


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> PipelineConfig:
    """Environment first, flags on top, then the stage defaults resolved."""
    raw = {
        f.name: environ[env_name(f.name)]
        for f in fields(PipelineConfig)
        if env_name(f.name) in environ
    }
    raw.update(_flag_values(args, [f.name for f in fields(PipelineConfig)]))
    return PipelineConfig.from_values(raw, source="environment/flags").resolved(environ)


def _flag_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, str]:
    given = {name: getattr(args, f"config_{name}", None) for name in names}
    return {name: value for name, value in given.items() if value is not None}
