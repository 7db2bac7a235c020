"""The writes a session makes to the store, as records: what the write-behind queue holds.

Protocol layer (pure dataclasses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AppendItem:
    item: Mapping[str, Any]


@dataclass(frozen=True)
class ReplaceItems:
    """The whole history again (it was edited): ``items`` after the ``first_seq_offset`` items
    the store's cap trimmed before them."""

    items: tuple[Mapping[str, Any], ...]
    first_seq_offset: int


@dataclass(frozen=True)
class UpdateConfig:
    config: Mapping[str, Any]


@dataclass(frozen=True)
class StoreImages:
    """The session's images become ``keep`` (refs); ``add`` (ref -> data URL) are new."""

    keep: tuple[str, ...]
    add: Mapping[str, str]


@dataclass(frozen=True)
class AdvanceTurn:
    turn: int


@dataclass(frozen=True)
class EndSession:
    """The caller hung up: the session ends in the store (after its earlier writes)."""


PendingWrite = AppendItem | ReplaceItems | UpdateConfig | StoreImages | AdvanceTurn | EndSession
