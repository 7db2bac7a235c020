"""``python -m relay``: load the configuration, run the supervisor, exit with its code."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    from relay.config import ConfigError, load_config
    from relay.supervisor import run

    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as error:
        print(f"relay: bad configuration: {error}", file=sys.stderr)
        return 2
    return uvloop.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
