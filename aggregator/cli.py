"""``lens-aggregator``: the central service's command line."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lens-aggregator")
def cli() -> None:
    """LLM-Latency-Lens aggregator: receives agents' batches and serves the fleet view.

    The ingest service (serve, token) is not part of this release yet.
    """


def main() -> None:
    cli.main(prog_name="lens-aggregator")
