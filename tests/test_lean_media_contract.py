"""The aiortc/aioice/libopus internals transceiver/webrtc/lean_media.py relies on are still where
it expects them, with the shapes it expects.

Fails loudly on an upgrade that moves them: read lean_media's docstring, re-check each hook
against the new source, then update the pins (``ice.PINNED_VERSIONS``) and this test together.
One test looks at the source and signatures; one at a live call between two aiortc peers.
"""

from __future__ import annotations

import importlib.metadata
import inspect

import aioice
import aioice.ice
import pylibsrtp
import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcpeerconnection import RTCPeerConnection as PeerConnectionClass

from deploy.waiting import eventually
from transceiver import config
from transceiver.webrtc import calls, ice, lean_media
from transceiver.webrtc.rtp_extensions import AUDIO_LEVEL_URI, MID_URI


def test_pinned_versions() -> None:
    for package, version in ice.PINNED_VERSIONS.items():
        assert importlib.metadata.version(package) == version, f"{package} moved: re-check"
    assert importlib.metadata.version("pylibsrtp") == "1.0.0"


def test_media_starts_through_send_and_receive_once_dtls_is_connected() -> None:
    connect = inspect.getsource(PeerConnectionClass._RTCPeerConnection__connect)
    dtls_up = connect.index('if dtlsTransport.state == "connected":')
    assert dtls_up < connect.index("await transceiver.sender.send(self.__localRtp(transceiver))")
    assert dtls_up < connect.index("await transceiver.receiver.receive(")
    for method in (RTCRtpSender.stop, RTCRtpReceiver.stop):  # never started: they do nothing
        assert "if self.__started:" in inspect.getsource(method), method
    assert list(inspect.signature(RTCRtpSender.send).parameters) == ["self", "parameters"]
    assert list(inspect.signature(RTCRtpReceiver.receive).parameters) == ["self", "parameters"]


def test_srtp_sessions_and_the_datagram_path() -> None:
    setup = inspect.getsource(RTCDtlsTransport._setup_srtp)
    assert "self._rx_srtp = Session(rx_policy)" in setup
    assert "self._tx_srtp = Session(tx_policy)" in setup
    receive = inspect.getsource(RTCDtlsTransport._recv_next)
    assert "first_byte > 127 and first_byte < 192 and self._rx_srtp" in receive
    assert "self._set_state(State.CONNECTED)" in inspect.getsource(RTCDtlsTransport.start)
    assert '"statechange"' in inspect.getsource(RTCDtlsTransport._set_state)
    stun = inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    assert "self.receiver.data_received(data, self.local_candidate.component)" in stun
    assert "self._nominated[component] = CandidatePair(protocol, remote_candidate)" in (
        inspect.getsource(aioice.Connection)
    )
    pair = inspect.getsource(aioice.ice.CandidatePair)
    assert "self.protocol = protocol" in pair and "def remote_addr(self)" in pair
    methods = {"protect", "unprotect", "protect_rtcp", "unprotect_rtcp"}
    assert methods <= set(dir(pylibsrtp.Session)) and issubclass(pylibsrtp.Error, Exception)
    # lean_media.SrtpReceiver calls libsrtp on the session's own context and buffer, as
    # Session.unprotect does
    process = inspect.getsource(vars(pylibsrtp.Session)["_Session__process"])
    assert "self._buffer[0 : len(data)] = data" in process
    assert "_srtp_assert(func(self._srtp[0], self._cdata, len_p))" in process
    assert "return self._buffer[0 : len_p[0]]" in process
    assert "return self.__process(packet, lib.srtp_unprotect)" in inspect.getsource(
        pylibsrtp.Session.unprotect
    )


def test_libopus_has_what_the_path_calls() -> None:
    for symbol in (
        "opus_encoder_create",
        "opus_encode",
        "opus_encoder_ctl",
        "opus_decoder_create",
        "opus_decode",
        "opus_packet_has_lbrr",
    ):
        assert hasattr(lean_media.OPUS, symbol), symbol
    assert lean_media.OPUS.opus_get_version_string().startswith(b"libopus 1.")
    assert "av.libs" in lean_media.libopus_path()  # PyAV's own copy, not whatever the host has


def test_the_setting_and_the_calls_agree_on_the_paths() -> None:
    assert config.MEDIA_PATHS == calls.MEDIA_PATHS
    keys = {"TRANSCEIVER_KEYS": "3:" + "ab" * 32}
    assert config.TransceiverConfig.load([], keys).media_path == "lean"
    stock = config.TransceiverConfig.load([], keys | {"TRANSCEIVER_MEDIA_PATH": "aiortc"})
    assert stock.media_path == "aiortc"
    assert config.TransceiverConfig.load(["--media-path", "aiortc"], keys).media_path == "aiortc"
    with pytest.raises(config.ConfigError, match="TRANSCEIVER_MEDIA_PATH='fast'"):
        config.TransceiverConfig.load([], keys | {"TRANSCEIVER_MEDIA_PATH": "fast"})


async def test_a_live_call_has_the_shapes_lean_media_reads() -> None:
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    try:
        offerer.addTransceiver("audio")
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        (transceiver,) = answerer.getTransceivers()
        assert isinstance(transceiver.sender._ssrc, int)
        dtls = transceiver.sender.transport
        assert isinstance(dtls, RTCDtlsTransport) and dtls is transceiver.receiver.transport
        await eventually(lambda: dtls.state == "connected", 10.0, "DTLS to connect")
        assert isinstance(dtls._rx_srtp, pylibsrtp.Session)
        assert isinstance(dtls._tx_srtp, pylibsrtp.Session)
        connection = dtls.transport._connection
        assert isinstance(connection, aioice.Connection)
        await eventually(lambda: 1 in connection._nominated, 10.0, "a nominated pair")
        pair = connection._nominated[1]
        assert pair.protocol in connection._protocols
        assert isinstance(pair.protocol, aioice.ice.StunProtocol)
        assert callable(pair.protocol.transport.sendto)
        assert isinstance(pair.remote_addr, tuple) and len(pair.remote_addr) == 2
        assert "datagram_received" not in vars(pair.protocol)  # ours to wrap on the instance
        parameters = answerer._RTCPeerConnection__localRtp(transceiver)
        assert lean_media._is_opus(parameters.codecs[0]) and parameters.codecs[0].payloadType
        assert parameters.muxId == transceiver.mid and parameters.rtcp.cname
        uris = {extension.uri: extension.id for extension in parameters.headerExtensions}
        assert MID_URI in uris and AUDIO_LEVEL_URI in uris
        received = answerer._RTCPeerConnection__remoteRtp(transceiver)
        assert any(lean_media._is_opus(c) for c in received.codecs)
    finally:
        await offerer.close()
        await answerer.close()
