"""CPU the sending end of a data channel spends on a voice turn's events, by SCTP transport.

``python -m loadtest.bench_data_channel`` connects this process (the transceiver's side: it
answers, and its SCTP association is aiortc's or ``sctp_bundling``'s) to a stock aiortc peer in
a child process over loopback, then sends ``--turns`` voice turns' server events: the 22
data-channel messages of a voice turn with the delta joining on, in the bursts a session sends
them (the events of one engine event go in one loop iteration), ``--gap-ms`` apart so that the
peer's SACKs come back between bursts, as they do in a call. CPU is this process's
(``time.process_time``: its SACK handling included, the peer's work not), per turn, median
over ``--rounds`` rounds, the transports' order alternating round by round; the ratio is
bundling's against aiortc's, measured in the same run on the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiortc.rtcpeerconnection
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcsctptransport import RTCSctpTransport

from transceiver.realtime.server_events import message_item, server_event
from transceiver.webrtc.sctp_bundling import BundlingSctpTransport

TRANSPORTS: dict[str, type[RTCSctpTransport]] = {
    "aiortc": RTCSctpTransport,
    "bundling": BundlingSctpTransport,
}
SETUP_TIMEOUT_S = 20.0
ARRIVAL_TIMEOUT_S = 60.0


def voice_turn(n: int) -> list[list[str]]:
    """One voice turn's data-channel messages, in the bursts a session sends them."""
    user, answer, response = f"item_u{n}", f"item_a{n}", f"resp_{n}"
    said = "Coffee is a brewed drink made from roasted coffee beans, the seeds of berries."
    heard = "Tell me about coffee and espresso."
    part = {"type": "output_audio", "transcript": ""}
    body = {"id": response, "object": "realtime.response", "status": "in_progress", "output": []}
    done = {**body, "status": "completed", "output": [message_item(answer, "assistant", said,
            audio=True)], "usage": {"total_tokens": 412, "input_tokens": 380,
            "output_tokens": 32}}  # fmt: skip
    bursts: list[list[dict[str, Any]]] = [
        [server_event("input_audio_buffer.speech_started", audio_start_ms=1200, item_id=user)],
        [
            server_event("input_audio_buffer.speech_stopped", audio_end_ms=3100, item_id=user),
            server_event("input_audio_buffer.committed", previous_item_id=None, item_id=user),
            server_event(
                "conversation.item.added",
                previous_item_id=None,
                item=message_item(user, "user", "", audio=True, status="in_progress"),
            ),
        ],  # fmt: skip
        [
            server_event(
                "conversation.item.input_audio_transcription.delta",
                item_id=user,
                content_index=0,
                delta=heard,
            ),
            server_event(
                "conversation.item.input_audio_transcription.completed",
                item_id=user,
                content_index=0,
                transcript=heard,
            ),
            server_event(
                "conversation.item.done",
                previous_item_id=None,
                item=message_item(user, "user", heard, audio=True),
            ),
        ],  # fmt: skip
        [
            server_event("response.created", response=body),
            server_event(
                "conversation.item.added",
                previous_item_id=user,
                item=message_item(answer, "assistant", "", audio=True, status="in_progress"),
            ),
            server_event(
                "response.output_item.added",
                response_id=response,
                output_index=0,
                item=message_item(answer, "assistant", "", audio=True, status="in_progress"),
            ),
            server_event(
                "response.content_part.added",
                response_id=response,
                item_id=answer,
                output_index=0,
                content_index=0,
                part=part,
            ),
        ],  # fmt: skip
        [server_event("output_audio_buffer.started", response_id=response)],
    ]
    for words in (said[:30], said[30:60], said[60:]):
        bursts.append([server_event("response.output_audio_transcript.delta",
                                    response_id=response, item_id=answer, output_index=0,
                                    content_index=0, delta=words)])  # fmt: skip
    bursts.append(
        [
            server_event("response.output_audio.done", response_id=response, item_id=answer,
                         output_index=0, content_index=0),
            server_event("response.output_audio_transcript.done", response_id=response,
                         item_id=answer, output_index=0, content_index=0, transcript=said),
            server_event("response.content_part.done", response_id=response, item_id=answer,
                         output_index=0, content_index=0, part={**part, "transcript": said}),
            server_event("response.output_item.done", response_id=response, output_index=0,
                         item=message_item(answer, "assistant", said, audio=True)),
            server_event("conversation.item.done", previous_item_id=user,
                         item=message_item(answer, "assistant", said, audio=True)),
            server_event("response.done", response=done),
        ]
    )  # fmt: skip
    bursts.append([server_event("output_audio_buffer.stopped", response_id=response)])
    return [[json.dumps(event) for event in burst] for burst in bursts]


MESSAGES_PER_TURN = sum(len(burst) for burst in voice_turn(0))


async def receive() -> None:
    """The peer (a child process): answers the offer on stdin, reports what it received."""
    pc = RTCPeerConnection()
    received = 0
    loop = asyncio.get_running_loop()

    @pc.on("datachannel")
    def on_channel(channel: RTCDataChannel) -> None:
        def on_message(_message: str | bytes) -> None:
            nonlocal received
            received += 1

        channel.on("message", on_message)

    offer = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    await pc.setRemoteDescription(RTCSessionDescription(**offer))
    await pc.setLocalDescription(await pc.createAnswer())
    print(json.dumps({"sdp": pc.localDescription.sdp, "type": "answer"}), flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "count":
        print(received, flush=True)
    await pc.close()


class Peer:
    """The child process's peer connection, and this side's, with the SCTP transport asked."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.pc = RTCPeerConnection()
        self.process: asyncio.subprocess.Process | None = None

    async def connect(self) -> RTCDataChannel:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.bench_data_channel", "--receive",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        saved = vars(aiortc.rtcpeerconnection)["RTCSctpTransport"]
        aiortc.rtcpeerconnection.RTCSctpTransport = TRANSPORTS[self.transport]  # type: ignore[attr-defined]
        try:  # the association is built with the first channel
            channel = self.pc.createDataChannel("oai-events")
        finally:
            aiortc.rtcpeerconnection.RTCSctpTransport = saved  # type: ignore[attr-defined]
        assert type(self.pc.sctp) is TRANSPORTS[self.transport]
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        answer = json.loads(await self._ask(json.dumps(offer)))
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await asyncio.wait_for(opened.wait(), SETUP_TIMEOUT_S)
        return channel

    async def _ask(self, line: str) -> str:
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        return (await asyncio.wait_for(self.process.stdout.readline(), SETUP_TIMEOUT_S)).decode()

    async def received(self, count: int) -> None:
        deadline_s = time.monotonic() + ARRIVAL_TIMEOUT_S
        while int(await self._ask("count")) < count:
            if time.monotonic() > deadline_s:
                raise SystemExit(f"the peer did not receive {count} messages")
            await asyncio.sleep(0.01)  # asking a child process how far it got

    async def aclose(self) -> None:
        await self.pc.close()
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.write(b"bye\n")
            await asyncio.wait_for(self.process.wait(), SETUP_TIMEOUT_S)


async def cpu_ms_per_turn(transport: str, turns: int, gap_s: float) -> tuple[float, float]:
    """CPU ms a turn costs this process, and the SCTP packets a turn sends."""
    peer = Peer(transport)
    try:
        channel = await peer.connect()
        assert peer.pc.sctp is not None
        dtls = peer.pc.sctp.transport
        packets = dtls._send_data
        sent = 0

        async def counted(data: bytes) -> None:
            nonlocal sent
            sent += 1
            await packets(data)

        dtls._send_data = counted  # type: ignore[method-assign]
        bursts = [burst for n in range(turns) for burst in voice_turn(n)]
        started = time.process_time()
        for burst in bursts:
            for message in burst:
                channel.send(message)
            await asyncio.sleep(gap_s)  # the bursts of a turn are apart in a call
        await peer.received(turns * MESSAGES_PER_TURN)
        return 1000 * (time.process_time() - started) / turns, sent / turns
    finally:
        await peer.aclose()


async def bench(turns: int, rounds: int, gap_s: float) -> dict[str, Any]:
    results: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
    packets: dict[str, float] = {}
    for round_index in range(rounds):
        order = list(TRANSPORTS) if round_index % 2 == 0 else list(reversed(TRANSPORTS))
        for name in order:
            cpu_ms, packets[name] = await cpu_ms_per_turn(name, turns, gap_s)
            results[name].append(cpu_ms)
    medians = {name: round(statistics.median(values), 3) for name, values in results.items()}
    return {
        "messages_per_turn": MESSAGES_PER_TURN,
        "packets_per_turn": {name: round(count, 2) for name, count in packets.items()},
        "cpu_ms_per_turn": medians,
        "rounds": {name: [round(v, 3) for v in values] for name, values in results.items()},
        "bundling_to_aiortc_ratio": round(medians["bundling"] / medians["aiortc"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_data_channel", description=__doc__
    )
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive:
        asyncio.run(receive())
        return 0
    if args.turns < 1 or args.rounds < 1 or not 0 <= args.gap_ms <= 1000:
        parser.error("--turns and --rounds must be >= 1, --gap-ms within 0..1000")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    result = asyncio.run(bench(args.turns, args.rounds, args.gap_ms / 1000))
    result["loadavg"] = {
        "before": load_before,
        "after": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
