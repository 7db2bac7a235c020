"""voicerelay pipeline: the voice agent, independent of WebRTC (PCM in, PCM and events out).

Layers: protocol (``providers``, the roles a provider plays; ``events``; ``turns``;
``chunker``; pure), I/O (the providers' implementations and the wrappers that retry and fall
back; ``engine``, which runs a conversation) and policy (``config``, every setting as frozen
dataclasses). Imports nothing from ``relay`` or ``transceiver``.

May import: (nothing of ours)
Pure: providers, events, turns, chunker, pricing, knowledge, untrusted_json, native_threads,
    config, local_llm_chat, context_window, pinned_bytes, streamed_json, event_stream, http1,
    clock_words
"""

from pipeline.native_threads import pin_native_threads

pin_native_threads()  # before numpy is first imported: see pipeline/native_threads.py
