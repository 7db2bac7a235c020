"""voicerelay pipeline: the voice agent, independent of WebRTC (PCM in, PCM and events out).

Imports nothing from ``relay`` or ``transceiver``. ``providers`` is the pure protocol layer;
provider implementations and wrappers are the I/O layer; ``config`` is policy.
"""
