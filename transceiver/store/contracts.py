"""The client contract a stored session speaks, kept in its stored config beside the Realtime
session, so a resume on any transceiver speaks it again.

Protocol layer (pure). A Realtime session stores ``SessionConfig.to_json()``. A session with
another contract at its edge (GPT-Live, ``transceiver.live``) adds that contract's own config
under ``CONTRACT_KEY``: ``{"type": "live", ...}``, whatever the contract needs to be rebuilt (its
session config, instructions appended since). A transcription session
(``transceiver.realtime.transcription``) needs its name only, ``{"type": "transcription"}``: its
config is the Realtime session's fields it sets. ``split_contract`` takes a stored config apart
again: the Realtime session to validate as ever, and the contract's part (None: Realtime).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONTRACT_KEY = "voicerelay_contract"
REALTIME = "realtime"  # the contract of a stored config without CONTRACT_KEY


def with_contract(config: Mapping[str, Any], contract: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` as stored: with ``contract`` (which names its ``type``) under CONTRACT_KEY."""
    stored = dict(config)
    if contract is not None:
        if not isinstance(contract.get("type"), str) or contract["type"] == REALTIME:
            raise ValueError(f"a stored contract names its type (not {REALTIME!r}): {contract!r}")
        stored[CONTRACT_KEY] = dict(contract)
    return stored


def split_contract(stored: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The Realtime session and the contract's part (None when the session is Realtime's)."""
    config = {key: value for key, value in stored.items() if key != CONTRACT_KEY}
    contract = stored.get(CONTRACT_KEY)
    if contract is None:
        return config, None
    if not isinstance(contract, dict) or not isinstance(contract.get("type"), str):
        raise ValueError(f"stored {CONTRACT_KEY} is not an object with a type: {contract!r}")
    return config, contract


def contract_type(contract: Mapping[str, Any] | None) -> str:
    """The contract's name: ``type`` of the stored part, or ``realtime`` without one."""
    return REALTIME if contract is None else str(contract["type"])
