"""voicerelay relay: a stateless UDP forwarder that routes WebRTC by the signed ICE ufrag.

Layers: protocol (``ufrag``, ``header``, ``stun``, ``routing``: pure, no sockets or asyncio),
I/O (``worker``, ``supervisor``, ``http``: sockets, processes, uvloop) and policy (``config``).
Protocol modules import nothing from the I/O layer. The transceiver imports ``ufrag`` and
``header`` from here: they are the wire contract between the two.
"""
