"""One worker process per core: a pod of shared-nothing transceiver workers, and their supervisor.

``python -m transceiver --workers N`` (``TRANSCEIVER_WORKERS``; ``auto``: the cores this process
may use) runs a supervisor (``supervisor``) that starts N workers, each a whole transceiver with
its own calls, admission, link socket (the link port + its index, so the ufrag a worker mints
names the worker itself and media needs no extra hop) and transceiver identity. ``seats`` is the
contract between them (which worker a call id names, where each worker answers privately);
``pod_metrics`` folds the workers' ``/metrics`` into the pod's.

Signalling: every worker binds the public HTTP port with SO_REUSEPORT (the kernel spreads new
connections evenly; the supervisor carries no request, and a dead worker's share goes to the
others at once), and a private loopback port the supervisor holds open across its restarts.
Follow-ups are routed explicitly (``transceiver.http.owner_routing``, ``worker_routing``):
SO_REUSEPORT hashes a new connection to any worker, so a hang-up reaches the owner only about
1/N of the time. The requests the pod sends itself carry the hop header signed with the pod's
own key (``transceiver.http.hop_signature``), which the supervisor makes and the seats carry.

May import: transceiver.config, transceiver.background, transceiver.restarts,
    transceiver.http.hop_signature
Pure: seats
"""
