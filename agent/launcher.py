"""``lens-agent``'s console entry point: says in one line when the agent role is not installed.

The base install of ``llm-latency-lens`` is the shared core and the aggregator; the agent's engine and probes come
with the ``agent`` extra. Without them, ``lens-agent`` names what is missing and how to install it (exit 2) instead of
failing with an import traceback. This module imports nothing the base install lacks.
"""

from __future__ import annotations

import importlib.util
import sys

# import name → distribution, for the agent extra's dependencies (pyproject.toml)
AGENT_DEPENDENCIES = {
    "llama_cpp": "llama-cpp-python",
    "gguf": "gguf",
    "psutil": "psutil",
    "tqdm": "tqdm",
    "apscheduler": "apscheduler",
    "yaml": "pyyaml",
}


def missing_dependencies() -> list[str]:
    """The agent extra's distributions that cannot be imported here."""
    return [dist for module, dist in AGENT_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> None:
    missing = missing_dependencies()
    if missing:
        print(
            "lens-agent: error: the agent role is not installed (missing: "
            + ", ".join(missing)
            + "); install it with: pip install 'llm-latency-lens[agent]'",
            file=sys.stderr,
        )
        sys.exit(2)
    from .cli import main as cli_main  # the agent's dependencies are known to be importable only from here

    cli_main(argv)
