"""voicerelay transceiver: the stateful WebRTC endpoint (aiortc owns ICE, DTLS and SRTP).

May import ``relay.ufrag`` and ``relay.header`` (the wire contract) and ``pipeline``; never the
relay's I/O modules. The aioice/aiortc internals it touches are confined to ``ice``.
"""
