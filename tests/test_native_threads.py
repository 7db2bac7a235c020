"""Every process we start runs BLAS and OpenMP on one thread unless its operator says otherwise
(pipeline/native_threads.py): no OpenBLAS server thread spinning beside the event loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import relay.__main__
from pipeline.native_threads import NATIVE_THREAD_VARIABLES

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **settings: str) -> list[str]:
    """``code``'s printed words, in a fresh interpreter whose only thread settings are these."""
    env = {k: v for k, v in os.environ.items() if k not in NATIVE_THREAD_VARIABLES} | settings
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("package", ["pipeline", "transceiver", "loadtest"])
def test_importing_a_package_pins_blas_before_numpy_starts_its_threads(package: str) -> None:
    names = ", ".join(f"os.environ[{name!r}]" for name in NATIVE_THREAD_VARIABLES)
    code = f"import {package}, numpy, os; print(len(os.listdir('/proc/self/task')), {names})"
    assert run_python(code) == ["1", "1", "1", "1"]  # one thread: no blas_thread_server


def test_an_explicit_setting_wins() -> None:
    code = "import transceiver, os; print(os.environ['OPENBLAS_NUM_THREADS'])"
    assert run_python(code, OPENBLAS_NUM_THREADS="3") == ["3"]


def test_the_relay_pins_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NATIVE_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert relay.__main__.main(["--keys", "not-a-keyring"]) == 2  # bad config: exits at once
    assert [os.environ[name] for name in NATIVE_THREAD_VARIABLES] == ["1", "4", "1"]
