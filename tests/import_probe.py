"""Run ``lens-agent ARGS…`` in this process and write, at exit, every module it loaded (JSON list) to OUT.

Usage: ``python tests/import_probe.py OUT ARGS…``. The import-graph checks (tests/test_footprint.py) and
``bench/footprint.py`` run the real command line this way: what a command imports is what this file lists.
"""

from __future__ import annotations

import atexit
import json
import sys


def _dump(out: str) -> None:
    with open(out, "w") as handle:
        json.dump(sorted(sys.modules), handle)


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    atexit.register(_dump, out)
    sys.argv = ["lens-agent", *args]
    from agent.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
