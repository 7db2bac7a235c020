"""OpenAI's ``@openai/agents-realtime`` at test time: bundled for Chromium, or run in Node.

``npm_install()`` is the one way the tests get the packages: ``npm ci`` (exactly the committed
``package-lock.json``, with its integrity hashes, into ``tests/agents_sdk/node_modules``, which
is gitignored), again only when the lock changes, one process at a time (the suite runs test
files in parallel, and ``npm ci`` starts by deleting ``node_modules``).
``build_agents_bundle()`` installs, then runs esbuild, and returns one browser IIFE exposing
``window.runAgent`` (see ``tests/agents_sdk/entry.js``); esbuild runs again only when the lock or
entry.js changes, so a second run costs nothing.
``node_argv(script)`` installs, then is the command that runs a Node script of that folder
(``websocket_agent.mjs``: the SDK over its WebSocket transport).
``agents_page_html(bundle_js)`` is a page that carries the bundle inline, to be served from the
origin under test so the SDK's calls POST is same-origin.
"""

from __future__ import annotations

import fcntl
import hashlib
import html
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SDK_DIR = Path(__file__).resolve().parent / "agents_sdk"
LOCK = SDK_DIR / "package-lock.json"
NODE_MODULES = SDK_DIR / "node_modules"
CACHE_DIR = NODE_MODULES / ".voicerelay-cache"
INSTALL_TIMEOUT_S = 300.0
BUNDLE_TIMEOUT_S = 120.0


class NodeUnavailable(RuntimeError):
    """npm/node are missing: callers skip rather than fail."""


def _digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def _run(argv: list[str], timeout_s: float) -> None:
    result = subprocess.run(
        argv, cwd=SDK_DIR, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")


@contextmanager
def _installing() -> Iterator[None]:
    """Held while one process installs (outside node_modules, which ``npm ci`` deletes)."""
    name = f"voicerelay-npm-{hashlib.sha256(bytes(SDK_DIR)).hexdigest()[:12]}.lock"
    with open(Path(tempfile.gettempdir()) / name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def npm_install() -> None:
    """Install exactly the lock's packages unless this lock is already installed."""
    npm = shutil.which("npm")
    if npm is None:
        raise NodeUnavailable("npm is not on PATH")
    stamp = CACHE_DIR / f"installed-{_digest(LOCK)}"
    with _installing():
        if stamp.exists():
            return
        argv = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        _run(argv, INSTALL_TIMEOUT_S)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        stamp.touch()


def node_argv(script: str) -> list[str]:
    """``node SCRIPT`` for a script of ``tests/agents_sdk`` (run it there), packages installed."""
    node = shutil.which("node")
    if node is None:
        raise NodeUnavailable("node is not on PATH")
    npm_install()
    return [node, str(SDK_DIR / script)]


def build_agents_bundle() -> Path:
    """The path of the browser bundle, building it (and installing npm packages) if needed."""
    npm_install()
    key = _digest(LOCK, SDK_DIR / "entry.js")
    bundle = CACHE_DIR / f"agents-realtime-{key}.js"
    if bundle.exists():
        return bundle
    partial = bundle.with_suffix(f".{os.getpid()}.tmp.js")
    esbuild = NODE_MODULES / ".bin" / "esbuild"
    argv = [str(esbuild), "entry.js", "--bundle", "--format=iife", "--platform=browser"]
    _run(
        [*argv, "--target=chrome110", "--log-level=warning", f"--outfile={partial}"],
        BUNDLE_TIMEOUT_S,
    )
    partial.replace(bundle)
    return bundle


def agents_page_html(bundle_js: str) -> str:
    """A page with an ``<audio id="remote">`` (for loadtest/browser.py) and the bundle inline."""
    # Inline script: only "</script" could end it early; esbuild output never needs it, but
    # escape it anyway so the page is well-formed whatever the bundle holds.
    safe = bundle_js.replace("</script", "<\\/script")
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<link rel='icon' href='data:,'>"
        f"<title>{html.escape('agents-realtime on voicerelay')}</title></head>\n"
        "<body><audio id='remote' autoplay></audio>\n"
        f"<script>\n{safe}\n</script></body></html>\n"
    )
