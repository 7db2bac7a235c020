"""Pipeline configuration: offline by default, OpenAI when configured, clear errors."""

from __future__ import annotations

import argparse

import pytest

from pipeline.config import ConfigError, PipelineConfig, add_config_flags, config_from


def test_defaults_are_offline_without_openai_settings() -> None:
    config = PipelineConfig.from_env({}).resolved({})
    assert (config.stt, config.llm, config.tts) == ("moonshine", "rule", "piper")


@pytest.mark.parametrize("variable", ["OPENAI_API_KEY", "OPENAI_BASE_URL"])
def test_openai_settings_switch_the_defaults_and_each_stage_can_be_overridden(
    variable: str,
) -> None:
    environ = {variable: "x", "PIPELINE_TTS": "espeak"}
    config = PipelineConfig.from_env(environ).resolved(environ)
    assert (config.stt, config.llm, config.tts) == ("openai", "openai", "espeak")


def test_values_are_parsed_and_mirrored_by_flags() -> None:
    environ = {"PIPELINE_VAD_THRESHOLD": "0.8", "PIPELINE_REALTIME_PLAYOUT": "off"}
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--vad-silence-duration-ms", "700", "--piper-noise-scale", "0"])
    config = config_from(args, environ)
    engine = config.engine_config()
    assert engine.vad.threshold == 0.8 and engine.vad.silence_duration_ms == 700
    assert engine.realtime_playout is False and config.piper_config().noise_scale == 0.0


@pytest.mark.parametrize(
    ("environ", "before_verdict"),
    [
        ({}, False),
        ({"PIPELINE_ANSWER_BEFORE_VERDICT": "on"}, True),
        ({"PIPELINE_LLM": "local", "PIPELINE_ANSWER_BEFORE_VERDICT": "1"}, True),
    ],
)
def test_an_answer_starts_before_the_verdict_only_when_told(
    environ: dict[str, str], before_verdict: bool
) -> None:
    config = PipelineConfig.from_env(environ).resolved(environ)
    assert config.engine_config().answer_before_verdict is before_verdict


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PIPELINE_LLM": "gpt"}, "PIPELINE_LLM must be one of rule, local, openai; got 'gpt'"),
        (
            {"PIPELINE_STT_WORKERS": "many"},
            "PIPELINE_STT_WORKERS (environment): 'many' is not a valid int",
        ),
        (
            {"PIPELINE_FALLBACK": "maybe"},
            "PIPELINE_FALLBACK (environment): 'maybe' is not a valid bool",
        ),
        ({"PIPELINE_VAD_THRESHOLD": "2"}, "vad threshold must be within 0..1, got 2.0"),
        ({"PIPELINE_STT_WORKERS": "-1"}, "pocketsphinx workers must be within 1..64, got -1"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        PipelineConfig.from_env(environ)
    assert message in str(error.value)


def test_turn_cost_prices_only_the_openai_stages() -> None:
    from pipeline.assembly import cost_estimator
    from pipeline.turns import TurnRecorder

    recorder = TurnRecorder(1)
    recorder.llm_input_tokens, recorder.llm_output_tokens, recorder.tts_chars = 1_000_000, 0, 1000
    offline = PipelineConfig().resolved({})
    hosted_llm = PipelineConfig(llm="openai", openai_llm_model="gpt-4o-mini").resolved({})
    assert recorder.finish(interrupted=False, estimate_cost=cost_estimator(offline)).cost_usd == 0
    priced = recorder.finish(interrupted=False, estimate_cost=cost_estimator(hosted_llm))
    assert priced.cost_usd == pytest.approx(0.15)  # gpt-4o-mini input list price per 1M tokens
    session_model = TurnRecorder(2, llm_provider="openai-responses/gpt-4.1")  # a Live delegation's
    session_model.llm_input_tokens = 1_000_000
    priced = session_model.finish(interrupted=False, estimate_cost=cost_estimator(hosted_llm))
    assert priced.cost_usd == pytest.approx(2.00)  # gpt-4.1's, not the deployment's gpt-4o-mini
