"""voicerelay relay: a stateless UDP forwarder that routes WebRTC by the signed ICE ufrag.

Layers: protocol (``ufrag``, ``header``, ``hello``, ``stun``, ``routing``, ``route_record``:
pure, no sockets or asyncio), I/O (``worker``, ``supervisor``, ``http``, ``route_lookup``:
sockets, processes, uvloop, Redis) and policy (``config``). Protocol modules import nothing
from the I/O layer, and nothing here imports the transceiver. The transceiver imports
``ufrag``, ``header``, ``hello`` and ``route_record`` from here: they are the wire contract
between the two.
"""
