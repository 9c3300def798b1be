"""The command-line edge shared by ``lens-agent`` and ``lens-aggregator``: errors become one line and an exit status.

Exit status: 0 success, 1 runtime failure, 2 bad input (flag, config value, file), 130 interrupted.
"""

from __future__ import annotations

import sys

import click

from .errors import LensError, UsageError


def run_click(group: click.Group, prog_name: str, argv: list[str] | None = None) -> None:
    try:
        result = group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        ctx = exc.ctx
        where = f"{prog_name} {ctx.info_name}" if ctx and ctx.info_name != prog_name else prog_name
        click.echo(f"{where}: error: {exc.format_message()} (see --help)", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"{prog_name}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo(f"{prog_name}: interrupted", err=True)
        sys.exit(130)
    except UsageError as exc:
        click.echo(f"{prog_name}: error: {exc}", err=True)
        sys.exit(2)
    except LensError as exc:
        click.echo(f"{prog_name}: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
