"""ARCHITECTURE.md stays true: every module, function and file it names exists; it stays short."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "ARCHITECTURE.md"
FILE_ENDINGS = (".txt", ".md", ".toml", ".py", ".yaml", ".json")
OURS = ("relay", "transceiver", "pipeline", "loadtest", "deploy", "tests", "requirements")


def named(text: str) -> tuple[list[str], list[str]]:
    """(dotted names, paths) of our code in backticks."""
    refs = set(re.findall(r"`([^`\s]+)`", text))
    files = {r for r in refs if r.endswith(FILE_ENDINGS)}
    dotted = sorted(r for r in refs - files if re.fullmatch(r"[a-z_]+(\.[A-Za-z_]+)+", r))
    paths = sorted(r for r in refs if ("/" in r or r in files) and re.split(r"[/.]", r)[0] in OURS)
    return [d for d in dotted if d.split(".")[0] in OURS], paths


def resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def test_it_is_at_most_150_lines() -> None:
    assert len(DOC.read_text().splitlines()) <= 150


@pytest.mark.parametrize("name", named(DOC.read_text())[0])
def test_every_name_it_gives_exists(name: str) -> None:
    assert resolves(name), name


def test_every_file_it_names_exists() -> None:
    paths = named(DOC.read_text())[1]
    assert paths, "names no file at all"
    missing = [p for p in paths if not list(ROOT.glob(p.rstrip("/")))]
    assert missing == []


def test_a_wrong_name_would_be_caught() -> None:
    assert not resolves("transceiver.webrtc.link.Link.no_such_method")
    assert not resolves("relay.no_such_module")
