"""The transceiver's WebRTC calls: aiortc peer connections whose ICE runs over the relay link.

``link`` is the one UDP socket a process shares with the relays (demux by client address, keyed
HELLO, routes), its datagrams moved in batches by ``mmsg``; ``ice`` confines the aioice hooks;
``sdp`` rewrites answers to carry the relay's candidate; ``calls`` owns every call, its admission
and its watcher; ``audio`` bridges Opus and PCM in 20 ms frames; ``rtp_tuning`` holds the aiortc
tunings; ``sctp_bundling`` sends a burst of data-channel messages in one SCTP packet;
``lean_media`` carries a call's audio itself once DTLS is up
(``TRANSCEIVER_MEDIA_PATH=lean``), with the RTP header extensions of ``rtp_extensions``; ``echo`` is
the diagnostic agent; ``link_policy`` holds the link's timings and bounds as data.
A call runs an agent given to it (the Realtime session, or echo): this package knows no agent,
no Redis and no Realtime event.

May import: relay.wire, transceiver.background, transceiver.restarts
Pure: sdp, keyed_relays, link_policy, rtp_extensions
"""
