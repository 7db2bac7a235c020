"""One native thread for BLAS and OpenMP in every voicerelay process, set before numpy loads.

numpy's bundled OpenBLAS starts a server thread per core when numpy is imported, hands any
BLAS call on more than 10 000 elements to them, and lets them busy-wait for the next one. A
voice server makes small numeric calls 50 times a second per call, so those threads never rest:
one echo call cost a whole core while a per-frame ``np.dot`` ran (issue 9), and a pod with N
cores would spin N - 1 threads. A real-time server wants its numeric work on the calling thread
and its parallelism from processes. OpenBLAS, OpenMP and MKL read these variables once, when
they load, and processes we start (``spawn`` workers, launched servers) inherit them.
``setdefault``: an operator's explicit setting still wins.

Called from the ``__init__`` of ``pipeline``, ``transceiver`` and ``loadtest`` (the first code
of ours any of their processes runs); the relay, which imports nothing from here, does the
same in its ``__main__``.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

NATIVE_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_native_threads(environ: MutableMapping[str, str] = os.environ) -> None:
    """One BLAS/OpenMP thread unless ``environ`` already says otherwise."""
    for name in NATIVE_THREAD_VARIABLES:
        environ.setdefault(name, "1")
