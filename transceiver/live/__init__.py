"""GPT-Live: OpenAI's Live voice contract (``openai.types.live``) at the edge of the same
session and engine as Realtime.

A second translation, not a second pipeline: ``client_events`` parses and validates what a Live
client sends (strictly: an unknown field is refused) and holds the Live session config and how
it maps onto a Realtime one; ``translation`` turns the engine's events into Live server events;
``contract`` is the ``ClientContract`` a ``transceiver.realtime.session.RealtimeSession`` speaks
through (``use_contract``), handling the client's commands with the session's own controls.
The WebSocket that carries it is ``transceiver.http.live_websocket``.

May import: pipeline, transceiver.realtime
Pure: client_events, translation
"""
