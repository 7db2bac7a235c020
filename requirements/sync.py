"""Make a virtual environment hold exactly what a lock file pins, and nothing else.

Usage: ``python requirements/sync.py VENV_PYTHON LOCK [--editable DIR]``

1. ``pip install --require-hashes --no-deps --only-binary :all: -r LOCK``: every package at its
   pinned version, every file checked against the lock's hashes, no source builds (a source
   build would fetch its own, unpinned, build tools).
2. Anything installed that the lock does not pin is uninstalled, so an old ``.venv`` ends up where
   a fresh one does.
3. With ``--editable DIR`` the project itself is installed editable, without dependencies and
   without build isolation (its build backend, setuptools, is one of the lock's pins).

Standard library only: it runs before anything is installed. ``tests/test_lock.py`` reads the
lock and the environment with the same functions.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def canonical(name: str) -> str:
    """The PEP 503 normal form of a distribution name (``PyYAML`` -> ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock_text: str) -> dict[str, str]:
    """``{name: version}`` for every ``name==version`` line of a pip-compile lock."""
    found: dict[str, str] = {}
    for line in lock_text.splitlines():
        match = PIN.match(line)
        if match:
            found[canonical(match.group(1))] = match.group(2)
    return found


def installed(python: str) -> dict[str, str]:
    """``{name: version}`` of every distribution in ``python``'s environment but editable ones."""
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return pins(frozen)


def pip(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def sync(python: str, lock: Path, editable: Path | None) -> None:
    pip(python, "install", "-q", "--require-hashes", "--no-deps", "--only-binary", ":all:",
        "-r", str(lock))  # fmt: skip
    extra = sorted(set(installed(python)) - set(pins(lock.read_text())))
    if extra:
        print(f"removing what {lock} does not pin: {' '.join(extra)}", flush=True)
        pip(python, "uninstall", "-q", "-y", *extra)
    if editable is not None:
        pip(python, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(editable))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", help="the virtual environment's python")
    parser.add_argument("lock", type=Path, help="a pip-compile lock with hashes")
    parser.add_argument("--editable", type=Path, help="install this project editable, no deps")
    args = parser.parse_args(argv)
    sync(args.python, args.lock, args.editable)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
