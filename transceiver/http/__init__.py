"""The transceiver's HTTP face: OpenAI's Realtime WebRTC signalling (``POST/DELETE
/v1/realtime/calls``, hang-up), ``ek_`` client secrets, bearer auth, ``/livez``, ``/readyz``,
``/metrics`` and the web client's static files.

Layers: protocol (``client_secrets``, ``auth``: pure) and I/O (FastAPI): ``app`` (the routes),
``offers`` (a calls request's SDP offer and session), ``errors`` (every error as JSON),
``websocket`` (the Realtime WebSocket), ``live_websocket`` (GPT-Live's),
``translation_websocket`` (Realtime translation sessions and their secrets), ``sideband`` (a
trusted server joining a running session, for both contracts), ``owner_routing`` (where a
sideband or a hang-up goes when its session runs elsewhere: another worker of the pod, another
transceiver), ``owner_hop`` (the forwarded WebSocket or request), ``worker_routing`` (a pod's
health and spilled offers) and ``hop_signature`` (a hop's proof, pure). It is the top of the
transceiver: it turns requests into calls on ``webrtc``, ``realtime``, ``live`` and ``store``.

May import: transceiver, relay.wire, pipeline.untrusted_json
Pure: auth, client_secrets, hop_signature
"""
