"""voicerelay transceiver: the stateful WebRTC endpoint (aiortc owns ICE, DTLS and SRTP).

May import ``relay.ufrag``, ``relay.header``, ``relay.hello`` and ``relay.route_record`` (the
wire contract) and ``pipeline``; never the relay's I/O modules. The aioice/aiortc internals it
touches are confined to ``ice``.
"""

from pipeline.native_threads import pin_native_threads

pin_native_threads()  # before numpy is first imported: see pipeline/native_threads.py
