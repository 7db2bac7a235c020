"""What a turn costs: a price table per model, and the estimate for a turn's counts.

Policy layer: data and arithmetic, no I/O beyond reading the override file at load.
The defaults are OpenAI's published list prices (USD) at the time of writing; they change, so
they can be overridden from a JSON file named by ``PIPELINE_PRICES``::

    {"gpt-4o-mini": {"input_per_1m_tokens_usd": 0.15, "output_per_1m_tokens_usd": 0.6},
     "my-vllm-model": {}}

Each entry replaces the named fields of a default entry (or adds a model); fields not given
keep their default, or 0. Offline providers (pocketsphinx, the local agent, piper, espeak-ng)
have no model to price: pass ``None`` and they cost 0. A model missing from the table also
costs 0, with one warning, so an unpriced model is visible in the log rather than fatal.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRICES_ENV = "PIPELINE_PRICES"


@dataclass(frozen=True)
class ModelPrice:
    input_per_1m_tokens_usd: float = 0.0
    output_per_1m_tokens_usd: float = 0.0
    audio_per_minute_usd: float = 0.0  # speech to text, per minute of input audio
    per_1m_characters_usd: float = 0.0  # text to speech, per million input characters


# gpt-4o-mini-tts is billed by tokens; OpenAI estimates ~$0.015 per spoken minute, and a spoken
# minute is ~1,000 characters, hence ~$15 per million characters (the tts-1 list price).
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o-mini": ModelPrice(input_per_1m_tokens_usd=0.15, output_per_1m_tokens_usd=0.60),
    "gpt-4o": ModelPrice(input_per_1m_tokens_usd=2.50, output_per_1m_tokens_usd=10.00),
    "gpt-4.1": ModelPrice(input_per_1m_tokens_usd=2.00, output_per_1m_tokens_usd=8.00),
    "gpt-4.1-mini": ModelPrice(input_per_1m_tokens_usd=0.40, output_per_1m_tokens_usd=1.60),
    "gpt-4.1-nano": ModelPrice(input_per_1m_tokens_usd=0.10, output_per_1m_tokens_usd=0.40),
    "gpt-4o-mini-transcribe": ModelPrice(audio_per_minute_usd=0.003),
    "gpt-4o-transcribe": ModelPrice(audio_per_minute_usd=0.006),
    "whisper-1": ModelPrice(audio_per_minute_usd=0.006),
    "gpt-4o-mini-tts": ModelPrice(per_1m_characters_usd=15.0),
    "tts-1": ModelPrice(per_1m_characters_usd=15.0),
    "tts-1-hd": ModelPrice(per_1m_characters_usd=30.0),
}


@dataclass(frozen=True)
class TurnUsage:
    """A turn's billable counts, and the model each stage used (``None``: offline)."""

    stt_model: str | None = None
    audio_in_s: float = 0.0
    llm_model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    tts_model: str | None = None
    characters: int = 0


class PriceTable:
    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        self._prices = dict(prices)
        self._warned: set[str] = set()

    def price(self, model: str | None) -> ModelPrice:
        if model is None:
            return ModelPrice()
        found = self._prices.get(model)
        if found is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("no price for model %r; counting it as free", model)
            return ModelPrice()
        return found

    def __contains__(self, model: object) -> bool:
        return model in self._prices


def estimate_cost_usd(usage: TurnUsage, prices: PriceTable) -> float:
    """The turn's estimated cost in USD: STT audio + LLM tokens + TTS characters."""
    stt = prices.price(usage.stt_model).audio_per_minute_usd * usage.audio_in_s / 60
    llm_price = prices.price(usage.llm_model)
    llm = (
        llm_price.input_per_1m_tokens_usd * usage.input_tokens
        + llm_price.output_per_1m_tokens_usd * usage.output_tokens
    ) / 1e6
    tts = prices.price(usage.tts_model).per_1m_characters_usd * usage.characters / 1e6
    return stt + llm + tts


def load_prices(environ: Mapping[str, str] = os.environ) -> PriceTable:
    """The default table, with the file named by ``PIPELINE_PRICES`` (if set) applied on top."""
    path = environ.get(PRICES_ENV)
    if not path:
        return PriceTable(DEFAULT_PRICES)
    try:
        overrides = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{PRICES_ENV}={path}: cannot read a JSON price table ({error})") from None
    return PriceTable(apply_overrides(DEFAULT_PRICES, overrides, source=path))


def apply_overrides(
    base: Mapping[str, ModelPrice], overrides: Any, source: str
) -> dict[str, ModelPrice]:
    if not isinstance(overrides, dict):
        raise ValueError(f"{source}: expected an object of model -> prices")
    prices = dict(base)
    for model, entry in overrides.items():
        prices[model] = replace(
            prices.get(model, ModelPrice()), **_price_fields(entry, model, source)
        )
    return prices


_FIELDS = {f.name for f in fields(ModelPrice)}


def _price_fields(entry: Any, model: str, source: str) -> dict[str, float]:
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: {model}: expected an object of prices")
    for name, value in entry.items():
        if name not in _FIELDS:
            raise ValueError(f"{source}: {model}.{name}: unknown field (known: {sorted(_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{source}: {model}.{name}: must be a number >= 0, got {value!r}")
    return {name: float(value) for name, value in entry.items()}
