"""The Realtime session: OpenAI's Realtime GA events on the ``oai-events`` data channel, driving
the voice pipeline of one call.

``client_events`` parses and validates what the client sends (``session_fields``: the
session's truncation, reasoning, tracing, prompt and include; ``image_urls``: a user
message's images; ``event_errors``: its errors);
``server_events`` builds what it is sent; ``translation`` turns pipeline events into server
events (``stable_words``: the settled words of a revising recogniser's partials, which its
transcription deltas carry); ``policy`` holds the session's configuration rules (defaults,
limits, what ``session.update`` may change);
``responses`` reads what a ``response.create`` asks of its response, ``side_responses`` runs
the out-of-band ones, ``item_audio`` keeps the recent items' audio for retrieve, ``idle`` is
the idle timeout (``idle_timeout_ms``); ``limits`` the session's own timings and bounds
(``TRANSCEIVER_REALTIME_*``); ``transcription`` is the contract of a transcription session
(``type: "transcription"``: heard and transcribed, never answered); ``translation_session`` is
the contract of a Realtime translation session (``client.realtime.translations``: heard, and
spoken back in another language; its fields: ``translation_fields``);
``session`` is the live session (engine, tasks, persistence); ``pipeline_agent`` makes one
per call; ``call_recording`` turns a session's events and turns into its call record,
and ``call_tracing`` into OpenTelemetry spans (when ``OTEL_*`` asks).

May import: pipeline, transceiver.metrics, transceiver.background, transceiver.store,
    transceiver.webrtc.audio
Pure: client_events, event_errors, session_fields, server_events, translation, limits,
    call_recording, responses, item_audio, image_urls, translation_fields, stable_words
"""
