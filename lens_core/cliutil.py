"""The command-line edge shared by ``lens-agent`` and ``lens-aggregator``: errors become one line and an exit status.

Exit status: 0 success, 1 runtime failure, 2 bad input (flag, config value, file), 130 interrupted.
"""

from __future__ import annotations

import errno
import sqlite3
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
    except OSError as exc:  # a path the command could not use: name it and say what to do, no traceback
        click.echo(f"{prog_name}: error: {describe_os_error(exc)}", err=True)
        sys.exit(2)
    except sqlite3.Error as exc:  # reached only where no layer below knew the file; say so all the same
        click.echo(f"{prog_name}: error: SQLite: {exc} (is the database file intact and writable?)", err=True)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


_WHAT_TO_DO = {
    errno.EEXIST: "it exists and is not a directory: choose another path or remove it",
    errno.ENOTDIR: "a part of it is a file, not a directory: choose another path",
    errno.EISDIR: "it is a directory: give a file path",
    errno.EACCES: "permission denied: run as a user who may write there, or choose another path",
    errno.EPERM: "operation not permitted here: choose another path",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "the disk is full: free some space or choose another path",
    errno.ENOENT: "no such file or directory: check the path",
}


def describe_os_error(exc: OSError) -> str:
    """``PATH: what went wrong; what to do`` for an OSError, in one line."""
    path = exc.filename if exc.filename is not None else "(unknown path)"
    reason = exc.strerror or str(exc)
    hint = _WHAT_TO_DO.get(exc.errno or 0)
    return f"{path}: {reason}" + (f" ({hint})" if hint else "")
