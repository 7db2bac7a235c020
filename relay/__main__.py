"""``python -m relay``: load the configuration, run the supervisor, exit with its code."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# One BLAS/OpenMP thread, as pipeline/native_threads.py explains (the relay imports nothing from
# the pipeline). The relay loads no numpy today; its spawned workers inherit this if it ever does.
NATIVE_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def main(argv: Sequence[str] | None = None) -> int:
    for name in NATIVE_THREAD_VARIABLES:
        os.environ.setdefault(name, "1")  # an operator's explicit setting still wins
    from relay.config import ConfigError, load_config

    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as error:
        print(f"relay: bad configuration: {error}", file=sys.stderr)
        return 2
    # Only a configuration that passed imports the supervisor and workers (redis, prometheus,
    # asyncio: 0.4 s): a bad setting is answered at once.
    import uvloop

    from relay.supervisor import run

    return uvloop.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
