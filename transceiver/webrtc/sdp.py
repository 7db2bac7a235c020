"""SDP offers in, SDP answers out: sanitise, validate, rewrite candidates.

Protocol layer: pure text in, text or ``SdpError`` out; no aiortc, no I/O.

- Offers lose remote ``.local`` (mDNS) candidates and ``a=end-of-candidates``: behind the relay
  the client is reached as a peer-reflexive candidate anyway, and with end-of-candidates and no
  usable candidate aioice prunes the component and the session never connects.
- Answers carry exactly one host candidate per relay public address (one per family), and
  nothing else, so a client can only ever reach this transceiver through the relay.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

Address = tuple[str, int]
MAX_LINES = 2_000
# RFC 8445 §5.1.2.1 with aioice's choices: type preference 126 (host), local preference 65535.
HOST_PRIORITY = (126 << 24) | (65_535 << 8) | (256 - 1)
_LINE = re.compile(r"[a-z]=.*")


class SdpError(ValueError):
    """An offer we will not negotiate; ``code`` is stable, the message names the problem."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Section:
    """The session part (``media`` empty) or one ``m=`` section, as its lines."""

    lines: tuple[str, ...]

    @property
    def media(self) -> str:
        first = self.lines[0]
        return first[2:].split(" ", 1)[0] if first.startswith("m=") else ""

    def attribute(self, name: str) -> str | None:
        prefix = f"a={name}:"
        return next((line[len(prefix) :] for line in self.lines if line.startswith(prefix)), None)


def split_lines(text: str) -> list[str]:
    """SDP lines (CRLF or LF), each checked to be ``x=value``; trailing blank lines ignored."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    if len(lines) > MAX_LINES:
        raise SdpError("sdp_too_long", f"SDP has {len(lines)} lines, more than {MAX_LINES}")
    for number, line in enumerate(lines, 1):
        if not _LINE.fullmatch(line):
            raise SdpError("invalid_sdp", f"SDP line {number} is not 'x=value': {line[:60]!r}")
    return lines


def sections(lines: Sequence[str]) -> list[Section]:
    starts = [0] + [i for i, line in enumerate(lines) if line.startswith("m=")]
    ends = starts[1:] + [len(lines)]
    return [Section(tuple(lines[a:b])) for a, b in zip(starts, ends, strict=True) if b > a]


def sanitise_offer(text: str) -> str:
    """The offer without mDNS candidates and end-of-candidates; SdpError if unusable."""
    lines = split_lines(text)
    if lines[0] != "v=0":
        raise SdpError("invalid_sdp", "SDP must start with 'v=0'")
    kept = [line for line in lines if not _stripped(line)]
    validate_offer(sections(kept))
    return "\r\n".join(kept) + "\r\n"


def _stripped(line: str) -> bool:
    if line == "a=end-of-candidates":
        return True
    if not line.startswith("a=candidate:"):
        return False
    fields = line.split(" ")
    return len(fields) > 4 and fields[4].lower().endswith(".local")


def validate_offer(parts: Sequence[Section]) -> None:
    session, media = parts[0], parts[1:]
    if not media:
        raise SdpError("invalid_sdp", "offer has no m= section")
    if not any(m.media == "audio" and not m.lines[0].startswith("m=audio 0 ") for m in media):
        raise SdpError("no_audio", "offer has no active m=audio section")
    for name in ("ice-ufrag", "ice-pwd", "fingerprint"):
        for index, section in enumerate(media):
            if section.attribute(name) is None and session.attribute(name) is None:
                raise SdpError(
                    f"missing_{name.replace('-', '_')}", f"m= section {index} has no a={name}"
                )
    _validate_bundle(session, media)


def _validate_bundle(session: Section, media: Sequence[Section]) -> None:
    """One ICE agent per session (its ufrag is the route): every m= section must be bundled."""
    if len(media) == 1:
        return
    group = (session.attribute("group") or "").split()
    mids = [m.attribute("mid") for m in media]
    if group[:1] != ["BUNDLE"] or any(mid is None or mid not in group[1:] for mid in mids):
        raise SdpError("bundle_required", "offer must bundle every m= section (a=group:BUNDLE)")


OPUS_FMTP = "minptime=10;useinbandfec=1"  # 10 ms frames at least, in-band FEC wanted
OPUS_PLAYBACK_RATES_HZ = range(8_000, 48_001)  # RFC 7587 section 6.1: maxplaybackrate


def opus_fmtp(max_playback_rate_hz: int | None = None, caller_dtx: bool = False) -> str:
    """The answer's Opus format parameters: ``OPUS_FMTP`` and, for an agent that hears the
    caller at ``max_playback_rate_hz`` (the pipeline's 16 kHz), RFC 7587's ``maxplaybackrate``.
    A browser then codes its microphone no wider (Chromium's Opus encoder sets its maximum
    bandwidth from it: SILK wideband at 16 kHz) instead of hybrid fullband, whose band above 8
    kHz a 16 kHz listener never hears; the caller's packets then decode at 16 kHz in 19
    against 29 us (``loadtest.media_stages``), the largest cost of an idle lean call.

    ``caller_dtx``: RFC 7587's ``usedtx=1``, the receiver's wish that the caller send nothing
    while it is silent (Opus DTX: a packet every 400 ms; Chromium turns its encoder's DTX on
    when the answer says so). Only where the lean path hears the call: it feeds the engine
    the silence in the gaps (``lean_media.LeanCall``); aiortc's path would not."""
    fmtp = OPUS_FMTP
    if max_playback_rate_hz is not None:
        if max_playback_rate_hz not in OPUS_PLAYBACK_RATES_HZ:
            raise ValueError(
                f"maxplaybackrate must be 8000 to 48000 Hz, not {max_playback_rate_hz}"
            )
        fmtp += f";maxplaybackrate={max_playback_rate_hz}"
    return fmtp + ";usedtx=1" if caller_dtx else fmtp


def host_candidate(address: Address, foundation: int) -> str:
    host, port = address
    return f"a=candidate:{foundation} 1 udp {HOST_PRIORITY} {host} {port} typ host"


def answer_with_candidates(
    text: str,
    public: Sequence[Address],
    max_playback_rate_hz: int | None = None,
    caller_dtx: bool = False,
) -> str:
    """The answer with every candidate replaced by the relay's (one host candidate each), and
    Opus format parameters where it has none (:func:`opus_fmtp`)."""
    if not public:
        raise ValueError("no relay public address to advertise")
    fmtp = opus_fmtp(max_playback_rate_hz, caller_dtx)
    lines = [line for line in split_lines(text) if not _is_candidate_line(line)]
    out: list[str] = []
    for section in sections(lines):
        out += _rewrite_section(section, public, fmtp) if section.media else section.lines
    return "\r\n".join(out) + "\r\n"


def _is_candidate_line(line: str) -> bool:
    return line.startswith("a=candidate:") or line == "a=end-of-candidates"


def _rewrite_section(section: Section, public: Sequence[Address], fmtp: str) -> list[str]:
    host, port = public[0]
    family = "IP6" if ipaddress.ip_address(host).version == 6 else "IP4"
    media_fields = section.lines[0].split(" ")
    if media_fields[1] == "0":  # a rejected section keeps port 0 and gets no candidates
        return list(section.lines)
    lines = [" ".join([media_fields[0], str(port), *media_fields[2:]])]
    for line in _with_opus_fmtp(section.lines[1:], fmtp):
        lines.append(f"c=IN {family} {host}" if line.startswith("c=") else line)
    candidates = [host_candidate(a, i + 1) for i, a in enumerate(public)]
    return lines + candidates + ["a=end-of-candidates"]


def _with_opus_fmtp(lines: Sequence[str], fmtp: str) -> list[str]:
    """Each Opus payload type without a format line gets ``fmtp``: ``useinbandfec=1`` (RFC 7587
    section 7: the answerer asks to receive in-band FEC) and what else :func:`opus_fmtp` says.
    aiortc writes no ``a=fmtp`` for Opus, and a browser sends FEC only when the answer asks, so
    without it the caller's audio had none."""
    have = {line.split(" ")[0][len("a=fmtp:") :] for line in lines if line.startswith("a=fmtp:")}
    out: list[str] = []
    for line in lines:
        out.append(line)
        if _is_opus_rtpmap(line) and (pt := line.split(" ")[0][len("a=rtpmap:") :]) not in have:
            out.append(f"a=fmtp:{pt} {fmtp}")
    return out


def _is_opus_rtpmap(line: str) -> bool:
    fields = line.split(" ")
    return (
        line.startswith("a=rtpmap:")
        and len(fields) == 2
        and fields[1].lower().startswith("opus/48000")
    )


def candidate_addresses(text: str) -> list[Address]:
    """Every ``a=candidate`` transport address in an SDP, in order (for checks and tests)."""
    found: list[Address] = []
    for line in split_lines(text):
        fields = line.split(" ")
        if line.startswith("a=candidate:") and len(fields) > 5 and fields[5].isdigit():
            found.append((fields[4], int(fields[5])))
    return found
