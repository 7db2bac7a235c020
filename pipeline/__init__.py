"""voicerelay pipeline: the voice agent, independent of WebRTC (PCM in, PCM and events out).

Imports nothing from ``relay`` or ``transceiver``. ``providers`` is the pure protocol layer;
provider implementations and wrappers are the I/O layer; ``config`` is policy.
"""

from pipeline.native_threads import pin_native_threads

pin_native_threads()  # before numpy is first imported: see pipeline/native_threads.py
