"""The Silero VAD model's file: taken out of the pinned pipecat-ai wheel, checked.

I/O layer (files, one ``pip download``). Silero VAD (MIT, Copyright (c) 2020-present Silero
Team, github.com/snakers4/silero-vad) ships inside the same ``pipecat-ai`` wheel as the
end-of-turn model (``pipeline.smart_turn_file``): ``requirements/smart-turn.txt`` pins that
wheel's version and sha256, ``pip download --no-deps --require-hashes`` fetches exactly that
file, never installed, and the one ONNX member is copied out of it with the wheel's licence
(pipecat's, the distributor's; the model's own terms are Silero's MIT licence above). The
model's size and sha256 are pinned here: the file is checked before it is written and again
every time it is loaded (``read_verified``); a file that differs is refused, never loaded.

Run ``python -m pipeline.silero_vad_file`` to fetch it (nothing is downloaded when a checked
copy is already there).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import smart_turn_file
from pipeline.smart_turn_file import MODELS_DIR, PINS_FILE, WHEELS_DIR, WheelModel

MODEL_PATH_VARIABLE = "PIPELINE_SILERO_VAD_MODEL"

SILERO_VAD = WheelModel(
    distribution="pipecat_ai-1.14.0-",
    member="pipecat/audio/vad/data/silero_vad.onnx",
    licence_member="pipecat_ai-1.14.0.dist-info/licenses/LICENSE",
    file_name="silero_vad.onnx",
    size_bytes=2_327_524,
    sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
)


class SileroFileError(Exception):
    """The model's file cannot be had, or is not the pinned file: it is never loaded."""


def default_model_path() -> Path:
    """``$PIPELINE_SILERO_VAD_MODEL``, else the checkout's ``build/models`` copy."""
    configured = os.environ.get(MODEL_PATH_VARIABLE, "")
    return Path(configured) if configured else MODELS_DIR / SILERO_VAD.file_name


def read_verified(path: Path) -> bytes:
    """The file's bytes once checked: what is loaded is exactly what was hashed."""
    try:
        return smart_turn_file.read_verified(path, SILERO_VAD)
    except smart_turn_file.SmartTurnFileError as error:
        raise SileroFileError(str(error).replace("smart_turn_file", "silero_vad_file")) from None


def fetch(pins: Path, wheels_dir: Path, target: Path) -> Path:
    """A checked model at ``target``; downloads and extracts only when it is not there yet."""
    try:
        read_verified(target)
        return target
    except SileroFileError:
        pass  # missing or not the pinned file: fetched again below
    try:
        wheel = smart_turn_file.download_wheel(pins, wheels_dir, SILERO_VAD)
        extracted = smart_turn_file.extract(wheel, target.parent, SILERO_VAD)
    except smart_turn_file.SmartTurnFileError as error:
        raise SileroFileError(str(error)) from None
    if extracted != target:
        os.replace(extracted, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.silero_vad_file", description=(
        "Fetch the Silero VAD model out of its pinned wheel and check it."
    ))  # fmt: skip
    parser.add_argument("--pins", type=Path, default=PINS_FILE, help="hashed pin file")
    parser.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="download folder")
    parser.add_argument("--model", type=Path, default=default_model_path(), help="model path")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.pins, args.wheels, args.model)
    except SileroFileError as error:
        print(f"silero vad model: {error}", file=sys.stderr)
        return 1
    print(f"silero vad model: {path} (sha256 {SILERO_VAD.sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
