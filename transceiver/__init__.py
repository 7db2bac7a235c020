"""voicerelay transceiver: the stateful WebRTC endpoint (aiortc owns ICE, DTLS and SRTP).

Sub-packages, one concern each: ``http`` (signalling, client secrets, auth, health, static
files), ``webrtc`` (the link to the relays, ICE, SDP, calls and admission, audio), ``realtime``
(the Realtime session over the data channel, driving the pipeline) and ``store`` (session state
in Redis). The modules here: ``__main__`` (load and check the config, then serve), ``server``
(the lifecycle: bind, serve, drain; a pod's supervisor and workers),
``agents`` (what calls run: echo, or the Realtime session and its storage), ``webhooks``
(``call.ended`` events, signed by ``webhook_signing``), ``config``
(``TRANSCEIVER_*``), ``metrics``, ``background`` (owned, supervised loops) and ``restarts``
(their restart policy).

It imports the relay's wire contract (``relay.wire``) and its event-loop stall watch
(``relay.loop_lag``: process plumbing both share), no other relay module, and the pipeline.
The aioice/aiortc internals it touches are confined to ``webrtc.ice``,
``webrtc.rtp_tuning`` and ``webrtc.lean_media``.

May import: relay.wire, relay.loop_lag, pipeline
Pure: config, restarts, webhook_signing
"""

from pipeline.native_threads import pin_native_threads

pin_native_threads()  # before numpy is first imported: see pipeline/native_threads.py
