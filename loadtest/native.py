"""Build the benchmark's C programs (reference forwarder, load generator) with the machine's gcc.

Sources live next to this module; binaries go to a build directory the caller chooses (a temp
dir or ``bench-results/bin``, never the source tree) and are rebuilt when the source changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
REFERENCE_FORWARDER = "reference_forwarder"
LOAD_GENERATOR = "udpload"


class BuildError(RuntimeError):
    """gcc is missing or rejected a source file."""


def build(program: str, build_dir: Path) -> Path:
    """Compile ``loadtest/<program>.c`` into ``build_dir``; returns the binary's path."""
    source = SOURCE_DIR / f"{program}.c"
    digest = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    binary = build_dir / f"{program}-{digest}"
    if binary.exists():
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc not found: install it (make sysdeps) to build the C reference")
    build_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [gcc, *CFLAGS, "-o", str(binary), str(source)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"gcc failed on {source.name}:\n{done.stderr}")
    return binary
