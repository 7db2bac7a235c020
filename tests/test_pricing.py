"""The price table: defaults, overrides from PIPELINE_PRICES, and a turn's estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.pricing import (
    DEFAULT_PRICES,
    PRICES_ENV,
    PriceTable,
    TurnUsage,
    estimate_cost_usd,
    load_prices,
)


def test_an_openai_turn_adds_up_audio_tokens_and_characters() -> None:
    usage = TurnUsage(
        stt_model="gpt-4o-mini-transcribe",
        audio_in_s=120.0,  # 2 min x $0.003
        llm_model="gpt-4o-mini",
        input_tokens=1_000_000,  # $0.15
        output_tokens=500_000,  # $0.30
        tts_model="gpt-4o-mini-tts",
        characters=100_000,  # $1.50
    )
    assert estimate_cost_usd(usage, load_prices({})) == pytest.approx(0.006 + 0.15 + 0.30 + 1.5)


def test_offline_providers_cost_nothing() -> None:
    usage = TurnUsage(audio_in_s=30.0, input_tokens=500, output_tokens=80, characters=400)
    assert estimate_cost_usd(usage, PriceTable(DEFAULT_PRICES)) == 0.0


def test_an_unpriced_model_costs_nothing_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prices = PriceTable(DEFAULT_PRICES)
    usage = TurnUsage(llm_model="llama-3-8b", input_tokens=1000)
    assert estimate_cost_usd(usage, prices) == 0.0
    assert estimate_cost_usd(usage, prices) == 0.0
    assert [r.getMessage() for r in caplog.records] == [
        "no price for model 'llama-3-8b'; counting it as free"
    ]


def test_a_price_file_overrides_fields_and_adds_models(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "gpt-4o-mini": {"output_per_1m_tokens_usd": 1.0},
                "my-vllm-model": {"input_per_1m_tokens_usd": 0.05},
            }
        )
    )
    prices = load_prices({PRICES_ENV: str(path)})
    assert prices.price("gpt-4o-mini").input_per_1m_tokens_usd == 0.15  # kept
    assert prices.price("gpt-4o-mini").output_per_1m_tokens_usd == 1.0
    assert "my-vllm-model" in prices
    usage = TurnUsage(llm_model="my-vllm-model", input_tokens=2_000_000)
    assert estimate_cost_usd(usage, prices) == pytest.approx(0.10)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"gpt-4o": {"per_token": 1}}', r"gpt-4o\.per_token: unknown field"),
        ('{"gpt-4o": {"audio_per_minute_usd": -1}}', r"must be a number >= 0, got -1"),
        ('{"gpt-4o": {"audio_per_minute_usd": "1"}}', r"must be a number >= 0, got '1'"),
        ('["gpt-4o"]', "expected an object of model -> prices"),
        ("{not json", "cannot read a JSON price table"),
    ],
)
def test_a_bad_price_file_is_rejected_naming_the_problem(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prices({PRICES_ENV: str(path)})
