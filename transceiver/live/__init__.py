"""GPT-Live: OpenAI's Live voice contract (``openai.types.live``) at the edge of the same
session and engine as Realtime.

A second translation, not a second pipeline: ``client_events`` parses and validates what a Live
client sends (strictly: an unknown field is refused) and holds the Live session config and how
it maps onto a Realtime one; ``translation`` turns the engine's events into Live server events;
``contract`` is the ``ClientContract`` a ``transceiver.realtime.session.RealtimeSession`` speaks
through (``use_contract``), handling the client's commands with the session's own controls.
``sessions`` finds a running Live session by its id (for a sideband). The WebSockets that carry
it (primary and sideband) are ``transceiver.http.live_websocket``; a WebRTC call, made by
``POST /v1/live/sessions``, is ``transceiver.http.live_calls``.

May import: pipeline, transceiver.realtime
Pure: client_events, translation
"""
