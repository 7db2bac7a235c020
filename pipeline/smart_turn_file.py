"""The end-of-turn model's file: smart-turn v3.2, taken out of the wheel that ships it, checked.

I/O layer (files, one ``pip download``). Smart Turn v3.2 (BSD-2-Clause, by Daily) is published
inside the ``pipecat-ai`` wheel. We never install that wheel (it would bring pipecat and its
dependencies): ``requirements/smart-turn.txt`` pins its version and sha256, ``pip download
--no-deps --require-hashes`` fetches exactly that file, and the one ONNX member and the wheel's
licence are copied out of it (a wheel is a zip) into the models folder. The model's own size
and sha256 are pinned here: the file is checked before it is written and again every time it
is loaded (``read_verified``); a file that differs is refused, never loaded.

Run ``python -m pipeline.smart_turn_file`` to fetch it (nothing is downloaded when a checked
copy is already there); ``--help`` names the folders. ``--repin`` rewrites the pin file for the
version it names (edit the version there first to move it): it downloads that wheel, refuses it
unless it holds the pinned model, and writes the wheel's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.pinned_bytes import mismatch

ROOT = Path(__file__).resolve().parents[1]
PINS_FILE = ROOT / "requirements" / "smart-turn.txt"
WHEELS_DIR = ROOT / "build" / "wheels"
MODELS_DIR = ROOT / "build" / "models"
MODEL_PATH_VARIABLE = "PIPELINE_SMART_TURN_MODEL"
PIP_TIMEOUT_S = 600
PIN_PATTERN = re.compile(r"^pipecat-ai==([0-9A-Za-z.+-]+)", re.MULTILINE)
PIN_HEADER = """\
# The end-of-turn model (smart-turn v3.2, BSD-2-Clause) ships inside this wheel. It is never
# installed: `python -m pipeline.smart_turn_file` downloads exactly this file (pip checks the
# hash; --no-deps), takes the ONNX model out of it and checks the model's own sha256.
# Written by `python -m pipeline.smart_turn_file --repin` (make lock): to move to another
# version, edit it here, then pin the new model's size and sha256 in pipeline/smart_turn_file.py.
"""


@dataclass(frozen=True)
class WheelModel:
    distribution: str  # the wheel's file name starts with it
    member: str  # the model's path inside the wheel
    licence_member: str
    file_name: str
    size_bytes: int
    sha256: str


SMART_TURN_V3_2 = WheelModel(
    distribution="pipecat_ai-1.14.0-",
    member="pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
    licence_member="pipecat_ai-1.14.0.dist-info/licenses/LICENSE",
    file_name="smart-turn-v3.2-cpu.onnx",
    size_bytes=8_679_182,
    sha256="2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
)


class SmartTurnFileError(Exception):
    """The model's file cannot be had, or is not the pinned file: it is never loaded."""


def default_model_path() -> Path:
    """``$PIPELINE_SMART_TURN_MODEL``, else the checkout's ``build/models`` copy."""
    configured = os.environ.get(MODEL_PATH_VARIABLE, "")
    return Path(configured) if configured else MODELS_DIR / SMART_TURN_V3_2.file_name


def check(content: bytes, model: WheelModel, where: str) -> None:
    """SmartTurnFileError unless ``content`` is the pinned model, byte for byte."""
    problem = mismatch(content, model.sha256, model.size_bytes, model.file_name)
    if problem is not None:
        raise SmartTurnFileError(f"{where}: {problem}")


def read_verified(path: Path, model: WheelModel = SMART_TURN_V3_2) -> bytes:
    """The file's bytes once checked: what is loaded is exactly what was hashed."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise SmartTurnFileError(
            f"{path}: no such file (fetch it: python -m pipeline.smart_turn_file)"
        ) from None
    check(content, model, str(path))
    return content


def extract(wheel: Path, models_dir: Path, model: WheelModel = SMART_TURN_V3_2) -> Path:
    """Copy the model (checked first) and the wheel's licence out of ``wheel``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            content = archive.read(model.member)
            licence = archive.read(model.licence_member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise SmartTurnFileError(f"{wheel}: not a wheel holding {model.member}: {error}") from None
    check(content, model, f"{wheel}!{model.member}")
    models_dir.mkdir(parents=True, exist_ok=True)
    _write_whole(models_dir / f"{Path(model.file_name).stem}.LICENSE", licence)
    target = models_dir / model.file_name
    _write_whole(target, content)
    return target


def _write_whole(target: Path, content: bytes) -> None:
    """A temporary file renamed into place: a reader never sees half a file."""
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as temporary:
        temporary.write(content)
        temporary.flush()
        os.fsync(temporary.fileno())
    os.chmod(temporary.name, 0o644)  # a model, not a secret: readable like any installed file
    os.replace(temporary.name, target)


def download_wheel(pins: Path, wheels_dir: Path, model: WheelModel = SMART_TURN_V3_2) -> Path:
    """``pip download`` the pinned wheel (its hash checked by pip) into ``wheels_dir``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes"]
    command += ["--only-binary", ":all:", "-r", str(pins), "-d", str(wheels_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode:
        raise SmartTurnFileError(f"pip download -r {pins} failed:\n{done.stderr.strip()}")
    wheels = sorted(wheels_dir.glob(f"{model.distribution}*.whl"))
    if len(wheels) != 1:
        raise SmartTurnFileError(f"{wheels_dir}: {len(wheels)} {model.distribution}* wheels")
    return wheels[0]


def pinned_version(pins: Path) -> str:
    found = PIN_PATTERN.search(pins.read_text(encoding="utf-8"))
    if found is None:
        raise SmartTurnFileError(f"{pins}: no pipecat-ai==VERSION line")
    return found.group(1)


def repin(pins: Path, model: WheelModel = SMART_TURN_V3_2) -> str:
    """Rewrite ``pins`` with the sha256 of its version's wheel, which must hold ``model``."""
    version = pinned_version(pins)
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary"]
        command += [":all:", f"pipecat-ai=={version}", "-d", folder]
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if done.returncode:
            raise SmartTurnFileError(f"pip download pipecat-ai=={version} failed:\n{done.stderr}")
        (wheel,) = Path(folder).glob("*.whl")
        extract(wheel, Path(folder) / "models", model)  # SmartTurnFileError: another model
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pin = f"pipecat-ai=={version} \\\n    --hash=sha256:{digest}\n"
    _write_whole(pins, (PIN_HEADER + pin).encode())
    return digest


def fetch(pins: Path, wheels_dir: Path, target: Path) -> Path:
    """A checked model at ``target``; downloads and extracts only when it is not there yet."""
    try:
        read_verified(target)
        return target
    except SmartTurnFileError:
        pass  # missing or not the pinned file: fetched again below
    wheel = download_wheel(pins, wheels_dir)
    extracted = extract(wheel, target.parent)
    if extracted != target:
        os.replace(extracted, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.smart_turn_file", description=(
        "Fetch the smart-turn v3.2 end-of-turn model out of its pinned wheel and check it."
    ))  # fmt: skip
    parser.add_argument("--pins", type=Path, default=PINS_FILE, help="hashed pin file")
    parser.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="download folder")
    parser.add_argument("--model", type=Path, default=default_model_path(), help="model path")
    parser.add_argument("--repin", action="store_true", help="rewrite the pin file's hash")
    args = parser.parse_args(argv)
    try:
        if args.repin:
            print(f"{args.pins}: pipecat-ai wheel sha256 {repin(args.pins)}")
            return 0
        path = fetch(args.pins, args.wheels, args.model)
    except SmartTurnFileError as error:
        print(f"smart-turn model: {error}", file=sys.stderr)
        return 1
    print(f"smart-turn model: {path} (sha256 {SMART_TURN_V3_2.sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
