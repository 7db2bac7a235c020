"""The transceiver's HTTP face: OpenAI's Realtime WebRTC signalling (``POST/DELETE
/v1/realtime/calls``, hang-up), ``ek_`` client secrets, bearer auth, ``/livez``, ``/readyz``,
``/metrics`` and the web client's static files.

Layers: protocol (``client_secrets``, ``auth``: pure) and I/O (FastAPI): ``app`` (the routes),
``offers`` (a calls request's SDP offer and session), ``errors`` (every error as JSON),
``websocket`` (the Realtime WebSocket), ``live_websocket`` (GPT-Live's), ``sideband`` (a
trusted server joining a running session, for both contracts), ``owner_hop`` (a sideband
forwarded to the transceiver running its session) and ``hop_signature`` (the forwarded hop's
proof, pure). It is the top of the transceiver: it turns requests into calls on ``webrtc``,
``realtime``, ``live`` and ``store``.

May import: transceiver, relay.wire, pipeline.untrusted_json
Pure: auth, client_secrets, hop_signature
"""
