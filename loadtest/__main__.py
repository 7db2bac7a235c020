"""``python -m loadtest SCENARIO ...``: the load tester's entry point.

Scenarios: ``relay`` (sessions through a relay at scale), ``voice`` (real WebRTC voice calls
against a stack), ``ports`` (a port per session against one relay port); and
``lab-transceiver`` (the far end the relay scenario needs). ``python -m loadtest SCENARIO -h``
lists each one's options.
"""

from __future__ import annotations

import importlib
import sys

SCENARIOS = {
    "relay": "loadtest.relay_scenario",
    "voice": "loadtest.voice_scenario",
    "ports": "loadtest.ports",
    "lab-transceiver": "loadtest.lab_transceiver",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SCENARIOS:
        print(__doc__, file=sys.stderr)
        print(f"usage: python -m loadtest {{{','.join(SCENARIOS)}}} ...", file=sys.stderr)
        return 2
    module = importlib.import_module(SCENARIOS[argv[0]])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
