"""transceiver.webrtc.sdp: offer sanitising and validation, answer candidate rewriting (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transceiver.webrtc.sdp import (
    HOST_PRIORITY,
    SdpError,
    answer_with_candidates,
    candidate_addresses,
    opus_fmtp,
    sanitise_offer,
)

# A Chrome-style offer: audio + data channel bundled, an mDNS candidate, a host candidate,
# and end-of-candidates (what a browser sends after gathering completes).
CHROME_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=candidate:1 1 udp 2122260223 1f4712db-ea17-4bcf-a596-105139dfd8bf.local 54400 typ host"
        " generation 0 network-id 1",
        "a=candidate:2 1 udp 2122194687 192.0.2.2 54401 typ host generation 0 network-id 2",
        "a=end-of-candidates",
        "a=ice-ufrag:EsAw",
        "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 0F:74:31:25:CB:A2:13:EC:28:6F:6D:2C:61:FF:5D:C2:BC:B9:DB:3D:98:14"
        ":8D:1A:BB:EA:33:0C:A4:60:A8:8E",
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=candidate:1 1 udp 2122260223 1f4712db-ea17-4bcf-a596-105139dfd8bf.local 54400 typ host",
        "a=ice-ufrag:EsAw",
        "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
        "a=fingerprint:sha-256 0F:74:31:25:CB:A2:13:EC:28:6F:6D:2C:61:FF:5D:C2:BC:B9:DB:3D:98:14"
        ":8D:1A:BB:EA:33:0C:A4:60:A8:8E",
        "a=setup:actpass",
        "a=mid:1",
        "a=sctp-port:5000",
        "",
    ]
)


def without(text: str, *prefixes: str) -> str:
    return "\r\n".join(
        line for line in text.split("\r\n") if not line.startswith(prefixes) or not line
    )


def test_sanitise_strips_mdns_candidates_and_end_of_candidates() -> None:
    clean = sanitise_offer(CHROME_OFFER)
    assert ".local" not in clean
    assert "a=end-of-candidates" not in clean
    assert candidate_addresses(clean) == [("192.0.2.2", 54401)]
    assert clean.endswith("\r\n") and "\n" not in clean.replace("\r\n", "")
    assert clean.count("m=") == 2


def test_sanitise_accepts_lf_line_endings() -> None:
    assert sanitise_offer(CHROME_OFFER.replace("\r\n", "\n")) == sanitise_offer(CHROME_OFFER)


def test_session_level_credentials_are_enough() -> None:
    lines = CHROME_OFFER.split("\r\n")
    moved = [line for line in lines if not line.startswith(("a=ice-ufrag", "a=ice-pwd"))]
    moved[4:4] = ["a=ice-ufrag:EsAw", "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y"]
    assert "a=ice-ufrag:EsAw" in sanitise_offer("\r\n".join(moved))


@pytest.mark.parametrize(
    ("offer", "code", "message"),
    [
        ("", "invalid_sdp", "SDP line 1 is not 'x=value': ''"),
        ("hello", "invalid_sdp", "SDP line 1 is not 'x=value': 'hello'"),
        ("o=- 1 1 IN IP4 0.0.0.0\r\nv=0\r\n", "invalid_sdp", "SDP must start with 'v=0'"),
        ("v=0\r\ns=-\r\n", "invalid_sdp", "offer has no m= section"),
        ("v=0\r\nbad line\r\n", "invalid_sdp", "SDP line 2 is not 'x=value': 'bad line'"),
        (
            without(CHROME_OFFER, "a=ice-ufrag"),
            "missing_ice_ufrag",
            "m= section 0 has no a=ice-ufrag",
        ),
        (without(CHROME_OFFER, "a=ice-pwd"), "missing_ice_pwd", "m= section 0 has no a=ice-pwd"),
        (
            without(CHROME_OFFER, "a=fingerprint"),
            "missing_fingerprint",
            "m= section 0 has no a=fingerprint",
        ),
        (
            without(CHROME_OFFER, "a=group"),
            "bundle_required",
            "offer must bundle every m= section (a=group:BUNDLE)",
        ),
        (
            CHROME_OFFER.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0"),
            "bundle_required",
            "offer must bundle every m= section (a=group:BUNDLE)",
        ),
        (
            CHROME_OFFER.replace("m=audio 9 ", "m=video 9 "),
            "no_audio",
            "offer has no active m=audio section",
        ),
        (
            CHROME_OFFER.replace("m=audio 9 ", "m=audio 0 "),
            "no_audio",
            "offer has no active m=audio section",
        ),
        ("v=0\r\n" + "a=x\r\n" * 2500, "sdp_too_long", "SDP has 2501 lines, more than 2000"),
    ],
)
def test_rejections_name_the_problem(offer: str, code: str, message: str) -> None:
    with pytest.raises(SdpError) as caught:
        sanitise_offer(offer)
    assert (caught.value.code, caught.value.message) == (code, message)


AIORTC_ANSWER = "\r\n".join(
    [
        "v=0",
        "o=- 3955 3955 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 40000 UDP/TLS/RTP/SAVPF 111 0",
        "c=IN IP4 10.9.9.9",
        "a=sendrecv",
        "a=rtpmap:111 opus/48000/2",
        "a=rtpmap:0 PCMU/8000",
        "a=mid:0",
        "a=ice-ufrag:AQcEfwAAAcI0G5fO0yrdeveSdeaXeQV+kteM",
        "a=ice-pwd:ZiEiNngwiB/gmb6bETlvZv+l13tLeFm9",
        "a=candidate:abc 1 udp 2130706431 10.9.9.9 40000 typ host",
        "a=candidate:def 1 udp 1694498815 203.0.113.9 40000 typ srflx raddr 10.9.9.9 rport 40000",
        "a=end-of-candidates",
        "m=application 40000 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 10.9.9.9",
        "a=mid:1",
        "a=candidate:abc 1 udp 2130706431 10.9.9.9 40000 typ host",
        "m=video 0 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 0.0.0.0",
        "a=mid:2",
        "",
    ]
)


def test_answer_carries_exactly_the_relay_candidates() -> None:
    public = [("198.51.100.7", 3478), ("2001:db8::7", 3478)]
    answer = answer_with_candidates(AIORTC_ANSWER, public)
    assert candidate_addresses(answer) == public * 2  # audio and data sections
    assert f"a=candidate:1 1 udp {HOST_PRIORITY} 198.51.100.7 3478 typ host" in answer
    assert f"a=candidate:2 1 udp {HOST_PRIORITY} 2001:db8::7 3478 typ host" in answer
    assert "m=audio 3478 UDP/TLS/RTP/SAVPF 111 0" in answer
    # Opus asks for in-band FEC (aiortc writes no fmtp; browsers send FEC only when asked)
    assert "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n" in answer
    assert answer.count("a=fmtp:") == 1  # PCMU gets none
    assert "10.9.9.9" not in answer and "srflx" not in answer
    assert answer.count("c=IN IP4 198.51.100.7") == 2
    assert answer.count("a=end-of-candidates") == 2
    # A rejected section stays rejected and gets no candidates.
    assert (
        answer.split("m=video")[1] == " 0 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n"
    )


def test_an_opus_format_line_already_there_is_kept() -> None:
    given = AIORTC_ANSWER.replace(
        "a=rtpmap:111 opus/48000/2\r\n", "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 stereo=1\r\n"
    )
    answer = answer_with_candidates(given, [("198.51.100.7", 3478)])
    assert "a=fmtp:111 stereo=1\r\n" in answer and answer.count("a=fmtp:") == 1


def test_an_agent_hearing_at_16_khz_asks_the_caller_for_no_wider_a_band() -> None:
    answer = answer_with_candidates(AIORTC_ANSWER, [("198.51.100.7", 3478)], 16_000)
    fmtp = "a=fmtp:111 minptime=10;useinbandfec=1;maxplaybackrate=16000\r\n"
    assert "a=rtpmap:111 opus/48000/2\r\n" + fmtp in answer
    assert answer.count("a=fmtp:") == 1  # PCMU gets none
    assert opus_fmtp() == "minptime=10;useinbandfec=1"  # an agent of no one rate: no limit
    for rate_hz in (7_999, 48_001):
        with pytest.raises(ValueError, match=f"not {rate_hz}"):
            opus_fmtp(rate_hz)


def test_a_lean_call_asks_the_caller_for_opus_dtx() -> None:
    answer = answer_with_candidates(AIORTC_ANSWER, [("198.51.100.7", 3478)], 16_000, True)
    fmtp = "a=fmtp:111 minptime=10;useinbandfec=1;maxplaybackrate=16000;usedtx=1\r\n"
    assert "a=rtpmap:111 opus/48000/2\r\n" + fmtp in answer
    assert opus_fmtp(caller_dtx=True) == "minptime=10;useinbandfec=1;usedtx=1"
    assert "usedtx" not in answer_with_candidates(AIORTC_ANSWER, [("198.51.100.7", 3478)])


def test_answer_for_an_ipv6_only_relay() -> None:
    answer = answer_with_candidates(AIORTC_ANSWER, [("::1", 4000)])
    assert candidate_addresses(answer) == [("::1", 4000)] * 2
    assert "c=IN IP6 ::1" in answer


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_is_accepted_or_rejected_with_sdp_error(text: str) -> None:
    try:
        sanitise_offer(text)
    except SdpError as exc:
        assert exc.code and exc.message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(CHROME_OFFER.split("\r\n")), max_size=40))
def test_shuffled_offer_lines_never_crash(lines: list[str]) -> None:
    try:
        sanitise_offer("\r\n".join(lines))
    except SdpError as exc:
        assert exc.code
