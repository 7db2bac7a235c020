"""Make a virtual environment hold exactly what a lock file pins, and nothing else.

Usage: ``python requirements/sync.py VENV_PYTHON LOCK --uv UV [--editable DIR]``

1. ``uv pip sync --require-hashes --only-binary :all: LOCK``: every package at its pinned version,
   every file checked against the lock's hashes, no source builds (a source build would fetch its
   own, unpinned, build tools); anything installed that the lock does not pin is uninstalled, so
   an old ``.venv`` ends up where a fresh one does.
2. With ``--editable DIR`` the project itself is installed editable, without dependencies and
   without build isolation (its build backend, setuptools, is one of the lock's pins).

uv (``UV``, itself installed by pip from ``requirements/installer.txt``: make does it) unpacks
wheels in parallel and keeps them in its cache (``~/.cache/uv``), so a fresh environment from a
lock installed before takes seconds where pip took about two minutes.

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


def sync(uv: str, python: str, lock: Path, editable: Path | None) -> None:
    target = ["-q", "--python", python]
    # --compile-bytecode: the .pyc files written now, as pip does (where PYTHONDONTWRITEBYTECODE
    # is set, as on CI machines, every process would compile what it imports, every time)
    subprocess.run([uv, "pip", "sync", *target, "--require-hashes", "--only-binary", ":all:",
                    "--compile-bytecode", str(lock)], check=True)  # fmt: skip
    if editable is not None:
        subprocess.run([uv, "pip", "install", *target, "--no-deps", "--no-build-isolation",
                        "-e", str(editable)], check=True)  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", help="the virtual environment's python")
    parser.add_argument("lock", type=Path, help="a pip-compile lock with hashes")
    parser.add_argument("--uv", required=True, help="the uv binary that installs it")
    parser.add_argument("--editable", type=Path, help="install this project editable, no deps")
    args = parser.parse_args(argv)
    sync(args.uv, args.python, args.lock, args.editable)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
