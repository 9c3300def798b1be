"""``lens-aggregator``: serve the ingest API and manage tokens.

Exit status: 0 success, 1 runtime failure, 2 bad input (flag, config value, file).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any, Literal

import click

from lens_core.cliutil import run_click
from lens_core.config import Config
from lens_core.errors import LensError, UsageError
from lens_core.notify import Notifier

from . import __version__
from .config import load_aggregator_config
from .store import QueryTimeout, SQLiteStore, Store

log = logging.getLogger("aggregator")


def _now_us() -> int:
    return time.time_ns() // 1000


def _db_source(config: Config) -> str:
    """Where storage.db came from, as the "reading …" line says it: from --db, from config FILE, … or default."""
    source = config.source("storage", "db")
    if source == "default":
        return "default"
    if source.startswith(("--", "environment variable", "drop-in")):
        return f"from {source}"
    return f"from config {source}"


def _safe_db(db: str) -> str:
    """The database as it may be shown: a PostgreSQL URL without its credentials."""
    if db.startswith(("postgresql://", "postgres://")) and "@" in db:
        return "…@" + db.split("@")[-1]
    return db


def _open_store(config: Config, mode: str = "write") -> Store:
    """A path means SQLite; ``postgresql://…`` means PostgreSQL (the ``[postgres]`` extra).

    ``mode``: ``"read"`` opens it read-only — it must exist and hold this release's schema, nothing is created or
    migrated, and stderr says which database is read; ``"serve"`` creates it (and its directory) if need be;
    ``"create"`` creates the file only in an existing directory; ``"write"`` needs an existing database. Every
    mode but ``"read"`` migrates an older schema forward; none touches another program's database.
    """
    db = str(config.get("storage", "db"))
    readonly = mode == "read"
    where = f"storage.db {_safe_db(db)} ({config.source('storage', 'db')})"
    store = _open_store_at(db, where, mode)
    if readonly:  # once it opened: a database that cannot be read is the one error line, which names it
        click.echo(f"reading {_safe_db(db)} ({_db_source(config)})", err=True)
    return store


def _open_store_at(db: str, where: str, mode: str) -> Store:
    from lens_core.sqlite_readonly import NotUsable

    readonly = mode == "read"
    if db.startswith(("postgresql://", "postgres://")):
        try:
            from .pgstore import PostgresStore
        except ImportError:
            raise UsageError(
                "storage.db is a PostgreSQL URL: install psycopg (pip install 'llm-latency-lens[postgres]')"
            ) from None
        try:
            return PostgresStore(db, readonly=readonly)
        except NotUsable as exc:
            raise UsageError(f"{where}: {exc.problem}") from None
        except Exception as exc:  # psycopg.OperationalError and friends: say what the server said
            raise UsageError(f"{where}: cannot connect ({str(exc).strip().splitlines()[0]})") from None
    if "://" in db:
        raise UsageError(f"storage.db = {db!r}: expected a file path (SQLite) or a postgresql:// URL")
    if Path(db).is_dir():
        raise UsageError(f"{where}: is a directory; give a database file path, e.g. --db {Path(db) / 'aggregator.db'}")
    create: Literal["parents", "file", "never"] = (
        "parents" if mode == "serve" else "file" if mode == "create" else "never"
    )
    try:
        return SQLiteStore(db, readonly=readonly, create=create)
    except NotUsable as exc:
        raise UsageError(f"{where}: {exc.problem}") from None
    except sqlite3.OperationalError as exc:
        raise UsageError(
            f"{where}: cannot be opened ({exc}); check that its directory exists and is writable"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise UsageError(
            f"{where}: not a usable SQLite database ({exc}); give the aggregator's database file or a new path"
        ) from None
    except (OSError, RuntimeError, sqlite3.Error) as exc:
        raise UsageError(f"{where}: cannot be opened ({exc}); check the path and its permissions") from None


def _config(config_path: Path | None, db: str | None) -> Config:
    return load_aggregator_config(config_path, overrides={("storage", "db"): ("--db", db)})


config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file."
)
db_option = click.option("--db", help="SQLite path or postgresql:// URL.  [default: storage.db]")


def _verbose_here(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s", force=True)


# `lens-aggregator serve -v` works like `lens-aggregator -v serve`
verbose_option = click.option(
    "-v", "--verbose", is_flag=True, expose_value=False, callback=_verbose_here, help="Same as lens-aggregator -v."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lens-aggregator")
@click.option("-v", "--verbose", is_flag=True, help="Log every batch.")
def cli(verbose: bool) -> None:
    """LLM-Latency-Lens aggregator: receives agents' measurement batches and serves the fleet view.

    Configuration: a TOML file (--config, else /etc/lens-aggregator/aggregator.toml), then LENS_<SECTION>_<KEY>
    environment variables, then flags. See configs/aggregator.toml.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s")


@cli.command()
@verbose_option
@config_option
@db_option
@click.option("--host", help="Listen address.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Listen port (0: any free port).  [default: 8443]")
def serve(config_path: Path | None, db: str | None, host: str | None, port: int | None) -> None:
    """Serve POST /api/v1/ingest, GET /api/v1/health, GET /api/v1/devices and GET /metrics (Prometheus).

    HTTPS when server.tls_cert and server.tls_key are set. Read endpoints are open while listening on loopback
    only; on any other address they need a read token. SIGTERM or SIGINT stops it after the batches in flight.
    Connections are bounded: server.header_timeout, body_timeout, max_connections (from the open-file limit, whose
    soft value is raised to the hard one at start), max_subscribers (docs/connections.md).

    \b
    Example:
        lens-aggregator serve --db /var/lib/lens-aggregator/aggregator.db --host 0.0.0.0 --port 8443
    """
    from aiohttp import web

    from .app import GUARD, Settings, create_app
    from .connections import KEEPALIVE_S, GuardedSite, install_repeat_filter, raise_open_files

    overrides: dict[tuple[str, str], tuple[str, object]] = {
        ("storage", "db"): ("--db", db),
        ("server", "host"): ("--host", host),
        ("server", "port"): ("--port", port),
    }
    config = load_aggregator_config(config_path, overrides=overrides)
    server = config.values["server"]
    ssl_context = None
    if server["tls_cert"] or server["tls_key"]:
        if not (server["tls_cert"] and server["tls_key"]):
            raise UsageError("server.tls_cert and server.tls_key must be set together")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(str(server["tls_cert"]), str(server["tls_key"]))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"server.tls_cert/tls_key: cannot be loaded ({exc})") from None
    files = raise_open_files()  # before anything is opened; the connection cap is sized from it
    if files.error:
        log.warning(
            "open files: the soft limit stays %d (raising it to %d failed: %s)", files.soft, files.hard, files.error
        )
    elif files.soft != files.before:
        log.info("open files: soft limit raised from %d to %d (the hard limit)", files.before, files.soft)
    settings = Settings.from_config(config)
    app = create_app(settings, _open_store(config, "serve"), triggers=config.tables.get("triggers") or ())
    # a flood of one error line: once per interval, counted (installed once the server will run, and taken off the
    # handlers when it stops: a refused serve leaves the process's logging as it found it)
    repeat = install_repeat_filter(server["log_repeat_interval"])
    guard = app[GUARD]
    log.info(
        "connections: at most %d at once (%s; open files %d); headers within %g s, bodies within %g s",
        guard.max_connections,
        guard.how,
        files.soft,
        guard.header_timeout_s,
        guard.body_timeout_s,
    )
    if settings.max_subscribers >= guard.max_connections:
        log.warning(
            "server.max_subscribers (%d) is not below the connection cap (%d): streams could take every connection",
            settings.max_subscribers,
            guard.max_connections,
        )

    async def run() -> None:
        runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=KEEPALIVE_S)
        await runner.setup()
        site = GuardedSite(runner, server["host"], server["port"], guard=guard, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UsageError(f"cannot listen on {server['host']}:{server['port']} ({exc.strerror})") from None
        scheme = "https" if ssl_context else "http"
        for address in runner.addresses:
            click.echo(f"lens-aggregator: listening on {scheme}://{address[0]}:{address[1]}", err=True)
        notifier = Notifier()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        notifier.ready(f"listening on {server['host']}:{runner.addresses[0][1]}")

        async def watchdog() -> None:
            while notifier.watchdog_s:
                notifier.watchdog()
                await asyncio.sleep(notifier.watchdog_s / 2)

        pinger = asyncio.create_task(watchdog())
        await stop.wait()
        notifier.send("STOPPING=1")
        pinger.cancel()
        await runner.cleanup()

    try:
        asyncio.run(run())
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(repeat)


@cli.group()
def token() -> None:
    """Manage device tokens (write only) and read tokens (dashboards, scripts)."""


_SUBJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_SUBJECT_ALLOWED = "1 to 128 letters, digits and . _ : @ - (starting with a letter or digit), as agent.device_id"


def _check_subject(what: str, value: str) -> str:
    if not _SUBJECT_RE.fullmatch(value):
        raise UsageError(f"{what} {json.dumps(value)} is not allowed: expected {_SUBJECT_ALLOWED}")
    return value


def _agent_settings(device_id: str, db: str, url: str | None, tls: bool, out: Path | None = None) -> str:
    """What to paste into the device's agent.toml for this token (printed on stderr; the token goes to stdout or
    the --out file)."""
    url = url or f"{'https' if tls else 'http'}://<aggregator-host>:8443"
    db = _safe_db(db)
    saved = f"copy {out} to the device as" if out is not None else "save the token printed on stdout as"
    lines = [
        f"token for device {device_id} stored in {db}; the aggregator must serve that database:",
        f"  lens-aggregator serve --db {db}",
        f"on the device: {saved} /etc/lens-agent/token, readable by lens-agent only",
        f"(sudo install -m 0640 -g lens-agent {out.name if out else device_id + '.token'} /etc/lens-agent/token)",
        "or pass it as LENS_SYNC_TOKEN, and set in /etc/lens-agent/agent.toml:",
        "  [agent]",
        f'  device_id = "{device_id}"',
        "  [sync]",
        f'  url = "{url}"',
        '  token_file = "/etc/lens-agent/token"',
    ]
    if url.startswith("http://"):
        lines.append("  allow_http = true          # plain HTTP: the token crosses the network unencrypted")
    else:
        lines.append('  # ca_file = "/etc/lens-agent/ca.pem"   # when the certificate is not signed by a system CA')
    lines.append("then check it: lens-agent sync --check --config /etc/lens-agent/agent.toml")
    return "\n".join(lines)


class _TokenFile:
    """``--out FILE``: the token written mode 0600 through a temp file beside it, renamed into place only once
    complete — a failure never leaves an empty or partial token file, and FILE is replaced only with ``--force``."""

    def __init__(self, path: Path, force: bool) -> None:
        self.path = path
        if path.is_dir():
            raise UsageError(f"--out {path}: is a directory; give a file path, e.g. --out {path / 'device.token'}")
        if (path.exists() or path.is_symlink()) and not path.is_symlink() and not path.is_file():
            # a device node, a FIFO, a socket: renaming over it would replace it with a regular file
            raise UsageError(f"--out {path}: is not a regular file; give a file path")
        if path.is_symlink():
            raise UsageError(f"--out {path}: is a symbolic link; give the file it points to, or another path")
        if path.exists() and not force:
            raise UsageError(f"--out {path}: exists; give --force to replace it, or another path")
        if not path.parent.is_dir():
            raise UsageError(f"--out {path}: its directory {path.parent} does not exist")
        self.temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise UsageError(f"--out {path}: cannot be written ({exc.strerror or exc})") from None

    def write(self, token: str) -> None:
        try:
            os.write(self.fd, (token + "\n").encode())
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.discard()
            raise LensError(f"--out {self.path}: cannot be written ({exc.strerror or exc})") from None

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.temp.unlink(missing_ok=True)


def _deliver_token(store: Store, token: str, out: _TokenFile | None) -> None:
    """The token on stdout, or into ``--out``; a token whose file cannot be written is revoked at once."""
    if out is None:
        click.echo(token)
        return
    try:
        out.write(token)
    except LensError:
        from .store import hash_token

        store.revoke(hash_token(token)[:12], _now_us())
        raise
    click.echo(f"token written to {out.path} (mode 0600)", err=True)


def _out_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    if value is not None and value.endswith("/"):  # Path() would drop the slash: the user named a directory
        raise click.BadParameter(f"{value}: names a directory; give a file path, e.g. {value}device.token")
    return None if value is None else Path(value)


out_option = click.option(
    "--out",
    "out_path",
    type=str,
    callback=_out_path,
    help="Write the token to this file (mode 0600, atomically) instead of stdout.",
)
force_option = click.option("--force", is_flag=True, help="With --out: replace an existing file.")


def _live_device_tokens(store: Store, device_id: str, now: int) -> list[Any]:
    return [
        t
        for t in store.list_tokens()
        if t.subject == device_id
        and t.kind == "device"
        and t.revoked_us is None
        and (t.expires_us is None or t.expires_us > now)
    ]


@token.command("add")
@verbose_option
@config_option
@db_option
@click.option("--read", "read_token", is_flag=True, help="A read token named SUBJECT instead of a device token.")
@click.option(
    "--kind",
    type=click.Choice(["device", "read", "operator"]),
    help="The token's kind: device (uploads; the default), read (dashboards, scripts) or operator (benchmark "
    "campaigns: start, read, cancel). --read is --kind read.",
)
@click.option(
    "--url",
    help="The aggregator's URL as the device reaches it, for the agent settings printed on stderr.  "
    "[default: a placeholder]",
)
@click.option(
    "--also",
    is_flag=True,
    help="A device that already has a live token gets a second one (both work); without it, add refuses.",
)
@out_option
@force_option
@click.argument("subject")
def token_add(
    config_path: Path | None,
    db: str | None,
    read_token: bool,
    kind: str | None,
    url: str | None,
    also: bool,
    out_path: Path | None,
    force: bool,
    subject: str,
) -> None:
    """Create a token for device SUBJECT and print it once on stdout (or write it to --out FILE, mode 0600); only
    its hash is stored.

    For a device token, the agent-side settings to paste (device_id, sync.url, token_file, allow_http or
    ca_file) go to stderr. SUBJECT is the device's agent.device_id exactly (which defaults to its host name). A
    device that already has a live token is refused: token rotate DEVICE replaces it, --also adds a second one.
    The database is created when it does not exist yet, in an existing directory only.

    \b
    Example:
        lens-aggregator token add orin-017 --db aggregator.db --url https://aggregator.example:8443 --out orin-017.token
        lens-aggregator token add --read grafana --db aggregator.db
        lens-aggregator token add --kind operator ci-bench --db aggregator.db --out ci-bench.token
    """
    if read_token and kind not in (None, "read"):
        raise UsageError(f"--read and --kind {kind} ask for different kinds: give one")
    kind = "read" if read_token else (kind or "device")
    _check_subject("device id" if kind == "device" else f"{kind}-token name", subject)
    if url is not None and not url.startswith(("http://", "https://")):
        raise UsageError(f"--url {json.dumps(url)} is not allowed: expected http://HOST:PORT or https://HOST:PORT")
    if force and out_path is None:
        raise UsageError("--force replaces the --out file: give --out FILE")
    config = _config(config_path, db)
    store = _open_store(config, "create")
    out = None
    try:
        if kind == "device" and not also:
            live = _live_device_tokens(store, subject, _now_us())
            if live:
                ids = ", ".join(t.token_id for t in live)
                raise UsageError(
                    f"device {json.dumps(subject)} already has a live token ({ids}) in "
                    f"{_safe_db(str(config.get('storage', 'db')))}: use lens-aggregator token rotate {subject} to "
                    "replace it, or --also to add a second one"
                )
        out = _TokenFile(out_path, force) if out_path is not None else None
        _deliver_token(store, store.add_token(subject, kind, _now_us()), out)
    finally:
        if out is not None:
            out.discard()
        store.close()
    if kind == "device":
        tls = bool(config.get("server", "tls_cert"))
        click.echo(_agent_settings(subject, str(config.get("storage", "db")), url, tls, out_path), err=True)


@token.command("list")
@verbose_option
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def token_list(config_path: Path | None, db: str | None, as_json: bool) -> None:
    """List tokens (by id: the first digits of their hash), with their state.

    Reads the database read-only and says on stderr which one; a missing, empty, foreign or older one is an error
    (exit 2), never created.

    \b
    Example:
        lens-aggregator token list --json
    """
    store = _open_store(_config(config_path, db), "read")
    try:
        tokens = store.list_tokens()
    finally:
        store.close()
    now = _now_us()
    rows = []
    for t in tokens:
        state = "revoked" if t.revoked_us else ("expired" if t.expires_us and t.expires_us <= now else "active")
        if state == "active" and t.expires_us:
            state = f"active until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t.expires_us / 1e6))}"
        rows.append(
            {
                "token_id": t.token_id,
                "subject": t.subject,
                "kind": t.kind,
                "state": state,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.created_us / 1e6)),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['token_id']}  {r['kind']:<8}  {r['subject']:<24}  {r['created']}  {r['state']}")


@token.command("revoke")
@verbose_option
@config_option
@db_option
@click.argument("selector")
def token_revoke(config_path: Path | None, db: str | None, selector: str) -> None:
    """Revoke every token of device (or read-token name) SELECTOR, or one token by its id.

    \b
    Example:
        lens-aggregator token revoke orin-017
    """
    store = _open_store(_config(config_path, db))
    try:
        count = store.revoke(selector, _now_us())
    finally:
        store.close()
    if count == 0:
        raise UsageError(f"no active token matches {selector!r} (see lens-aggregator token list)")
    click.echo(f"revoked {count} token{'' if count == 1 else 's'}", err=True)


@token.command("rotate")
@verbose_option
@config_option
@db_option
@click.option("--grace", help="How long the old token keeps working, e.g. 24h.  [default: auth.rotate_grace]")
@out_option
@force_option
@click.argument("device_id")
def token_rotate(
    config_path: Path | None, db: str | None, grace: str | None, out_path: Path | None, force: bool, device_id: str
) -> None:
    """Print a new token for DEVICE_ID (or write it to --out FILE, mode 0600); its old tokens keep working for the
    grace period.

    \b
    Example:
        lens-aggregator token rotate orin-017 --grace 48h --out orin-017.token --force
    """
    config = load_aggregator_config(
        config_path, overrides={("storage", "db"): ("--db", db), ("auth", "rotate_grace"): ("--grace", grace)}
    )
    _check_subject("device id", device_id)
    if force and out_path is None:
        raise UsageError("--force replaces the --out file: give --out FILE")
    store = _open_store(config)
    out = None
    try:
        now = _now_us()
        if not _live_device_tokens(store, device_id, now):
            raise UsageError(
                f"device {json.dumps(device_id)} has no active token to rotate "
                "(see lens-aggregator token list; a new device gets one with token add)"
            )
        out = _TokenFile(out_path, force) if out_path is not None else None
        grace_us = int(config.get("auth", "rotate_grace") * 1_000_000)
        _deliver_token(store, store.rotate(device_id, now, grace_us), out)
    finally:
        if out is not None:
            out.discard()
        store.close()


@cli.command("migrate")
@verbose_option
@config_option
@db_option
def migrate_command(config_path: Path | None, db: str | None) -> None:
    """Bring an existing database to this release's schema (what a starting serve does), and say from which version.

    The read-only commands (triggers, regressions, feedback, token list, otlp status, campaign
    status/list/results/export) never migrate: an older database makes them point here. Stop every lens-aggregator
    that serves the database first when the release notes say the migration is long.

    \b
    Example:
        lens-aggregator migrate --db /var/lib/lens-aggregator/aggregator.db
    """
    config = _config(config_path, db)
    store = _open_store(config, "write")
    try:
        before = store.opened_version
        after = store.schema_version()
    finally:
        store.close()
    shown = _safe_db(str(config.get("storage", "db")))
    if before is None or before == after:
        click.echo(f"{shown}: schema version {after}, this release's: nothing to migrate", err=True)
    else:
        click.echo(f"{shown}: migrated from schema version {before} to {after}", err=True)


@cli.group()
def otlp() -> None:
    """OpenTelemetry export: how far the forwarding to the OTLP backend got (docs/opentelemetry.md)."""


@otlp.command("status")
@verbose_option
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def otlp_status(config_path: Path | None, db: str | None, as_json: bool) -> None:
    """Each signal's cursor as the store keeps it: records forwarded, spans or points accepted and rejected,
    records waiting and the oldest one's age; and the regression events' cursor (log records). Works whether the
    server runs or not; reads the database read-only.

    \b
    Example:
        lens-aggregator otlp status --json
    """
    from .otlp_forward import stored_status

    config = _config(config_path, db)
    store = _open_store(config, "read")
    try:
        status = stored_status(store)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    finally:
        store.close()
    endpoint = config.get("otlp", "endpoint")
    if as_json:
        click.echo(json.dumps({"endpoint": endpoint, **status}, indent=2))
        return
    click.echo(f"endpoint: {endpoint or 'none (otlp.endpoint is not set: nothing is exported)'}")
    for name, s in status.items():
        when = (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["last_success_us"] / 1e6))
            if s["last_success_us"]
            else "never"
        )
        if "dropped_events" in s:  # the regression events' cursor (docs/opentelemetry.md "Regression events")
            click.echo(
                f"{name} forwarded {s['forwarded_records']} events ({s['accepted_items']} accepted, "
                f"{s['rejected_items']} rejected, {s['dropped_events']} dropped); "
                f"waiting {s['pending_records']} (oldest {s['lag_seconds']:.0f} s); last accepted {when}"
            )
            continue
        click.echo(
            f"{name:<8} forwarded {s['forwarded_records']} records ({s['accepted_items']} accepted, "
            f"{s['rejected_items']} rejected, {s['unencodable_records']} unencodable); "
            f"waiting {s['pending_records']} (oldest {s['lag_seconds']:.0f} s); "
            f"last accepted {when}"
        )


def _detection(config: Config, include_contended: bool | None) -> Any:
    """The change-point search's settings: ``[fleet] regression_*``; ``include_contended`` (not None) over the
    file's ``regression_include_contended``."""
    from .regressions import Settings as Detection

    include = config.get("fleet", "regression_include_contended") if include_contended is None else include_contended
    return Detection(
        min_change=config.get("fleet", "regression_min_change"),
        alpha=config.get("fleet", "regression_alpha"),
        include_contended=include,
        window=config.get("fleet", "regression_max_requests"),
        window_s=config.get("fleet", "regression_window"),
        min_duration_s=config.get("fleet", "regression_min_duration"),
    )


@cli.command("triggers")
@verbose_option
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts (what GET /api/v1/triggers answers).")
@click.option(
    "--include-contended",
    is_flag=True,
    help="Regression conditions also search requests other work on the device contended with (ext.interference). "
    " [default: fleet.regression_include_contended, false]",
)
def triggers_command(config_path: Path | None, db: str | None, as_json: bool, include_contended: bool) -> int:
    """Evaluate the [[triggers]] of the configuration once against the store now and print each series' state.

    Nothing is recorded: the fires and cooldowns are the server's (kept in the store); a series whose condition
    holds and that is not cooling down shows as firing (the server fires it at its next evaluation, if it has not
    yet). Exit status: 0 when every trigger was judged and no condition holds; 1 when at least one holds (firing
    or cooling down) or the evaluation failed (said on stderr); 2 for a bad configuration or a database that is
    missing, empty, another program's or of another schema version (opened read-only: never created); 3 when no
    condition holds but some series had too few requests to judge, or a trigger had no request in its window
    (insufficient data: not "all clear"). See docs/triggers.md.

    \b
    Example:
        lens-aggregator triggers --config /etc/lens-aggregator/aggregator.toml || echo "a trigger holds or cannot see"
    """
    from .triggers import TriggerWatch

    config = _config(config_path, db)
    triggers = config.tables.get("triggers") or []
    store = _open_store(config, "read")  # checked even without triggers: a wrong database is never "fine"
    if not triggers:
        store.close()
        where = config.path or "the configuration (no file)"
        click.echo(f"no [[triggers]] in {where}: none are evaluated (docs/triggers.md)", err=True)
        if as_json:
            click.echo(json.dumps(TriggerWatch([]).answer(), indent=2))
        return 0
    try:
        watch = TriggerWatch(triggers, interval_s=config.get("fleet", "trigger_interval"))
        watch.load(store)
        found: list[dict[str, object]] = []
        if watch.needs_regressions:
            from .regressions import MAX_ACTIVE_READ, find_regressions, for_triggers

            found = for_triggers(
                find_regressions(store, _detection(config, include_contended or None)),
                store.regressions("active", limit=MAX_ACTIVE_READ),
            )
        watch.evaluate(store, found, record=False)
    except QueryTimeout as exc:
        raise LensError(f"the triggers could not be evaluated: {exc}") from None
    finally:
        store.close()
    answer = watch.answer()
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        for trigger in answer["triggers"]:
            click.echo(f"{trigger['name']}: {trigger['description']}")
            if not trigger["series"]:
                click.echo("  no requests in the window")
            for series in trigger["series"]:
                click.echo(f"  {series['state']:<17} {series['summary'].split(': ', 1)[1]}")
        rows = answer["rows"]
        if rows["truncated"]:
            named = ", ".join(rows["truncated_devices"]) + (
                f" and {rows['truncated_devices_more']} more" if rows["truncated_devices_more"] else ""
            )
            click.echo(
                f"(of {named}: only the latest {rows['limit']} requests of the window were read; every other device "
                "was read whole)",
                err=True,
            )
    status = watch.status()
    if status == "insufficient_data":
        unjudged = sum(1 for s in watch.states if s.state == "insufficient_data")
        empty = [t["name"] for t in answer["triggers"] if not t["series"]]
        said = f"{unjudged} series with too few requests to judge" + (
            f"; no request in the window of {', '.join(empty)}" if empty else ""
        )
        click.echo(f"insufficient data: {said} (exit 3; docs/triggers.md)", err=True)
    return {"firing": 1, "insufficient_data": 3}.get(status, 0)


def _when(us: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(us / 1e6)) if us else "–"


@cli.group("regressions", invoke_without_command=True)
@verbose_option
@config_option
@db_option
@click.option(
    "--state",
    type=click.Choice(["open", "acknowledged", "resolved", "all"]),
    default="open",
    show_default=True,
    help="Which regression objects to list.",
)
@click.option("--device", help="Only this device's.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts (the objects GET /api/v1/regressions lists).")
@click.pass_context
def regressions_command(
    ctx: click.Context,
    config_path: Path | None,
    db: str | None,
    state: str,
    device: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The regression objects the server keeps (docs/fleet.md "Regressions"), newest first: each with its id,
    state, series, since when, size and when it was last confirmed. Reads the database read-only (an older one:
    run lens-aggregator migrate); the server's searches open, confirm and resolve them.

    \b
    Example:
        lens-aggregator regressions --state all --db /var/lib/lens-aggregator/aggregator.db
        lens-aggregator regressions ack 12 --note "driver update, rollback planned" --db …
    """
    if ctx.invoked_subcommand is not None:
        return
    config = _config(config_path, db)
    store = _open_store(config, "read")
    try:
        items = store.regressions(state, device=device, limit=limit)
    except QueryTimeout as exc:
        raise LensError(f"the regressions could not be read: {exc}") from None
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"state": state, "regressions": items}, indent=2))
        return
    if not items:
        click.echo(f"no {state if state != 'all' else ''} regressions".replace("  ", " "), err=True)
    for item in items:
        extra = f", resolved {_when(item['resolved_us'])}" if item["resolved_us"] else ""
        if item["acknowledged_us"]:
            note = f": {item['note']}" if item["note"] else ""
            extra += f", acknowledged by {item['acknowledged_by']} {_when(item['acknowledged_us'])}{note}"
        click.echo(
            f"{item['id']:>6} {item['state']:<12} {item['kind']:<11} {item['summary'].split(' (', 1)[0]} "
            f"(last confirmed {_when(item['last_confirmed_us'])}{extra})"
        )


@regressions_command.command("ack")
@verbose_option
@config_option
@db_option
@click.argument("regression_id", metavar="ID", type=click.IntRange(1))
@click.option("--note", help="Why (at most 1000 characters): shown beside the regression.")
@click.option("--by", "by", help="Who acknowledges.  [default: cli:$USER]")
def regressions_ack(
    config_path: Path | None, db: str | None, regression_id: int, note: str | None, by: str | None
) -> None:
    """Acknowledge an open regression: it stays acknowledged (said, no longer a health warning) until its series
    recovers. What POST /api/v1/regressions/ID/acknowledge does with an operator token.

    \b
    Example:
        lens-aggregator regressions ack 12 --note "known: new quantization" --db /var/lib/lens-aggregator/aggregator.db
    """
    import getpass

    from .store import note_problem

    problem = note_problem(note) if note is not None else None
    if problem is not None:
        raise UsageError(f"--note: {problem}")
    config = _config(config_path, db)
    store = _open_store(config, "write")
    try:
        before = store.acknowledge_regression(
            regression_id, by or f"cli:{getpass.getuser()}", note, time.time_ns() // 1000
        )
    finally:
        store.close()
    if before is None:
        raise UsageError(f"ID {regression_id}: no such regression (lens-aggregator regressions --state all lists them)")
    if before == "resolved":
        raise LensError(f"regression {regression_id} is resolved already: nothing to acknowledge")
    click.echo(f"regression {regression_id}: acknowledged" + (" (note updated)" if before == "acknowledged" else ""))


@cli.command("feedback")
@verbose_option
@config_option
@db_option
@click.option("--device", help="Only this device's documents.")
@click.option("--model", help="Only this model's documents.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts (what GET /api/v1/feedback answers).")
@click.option(
    "--include-contended",
    is_flag=True,
    help="Use requests other work on the device contended with (ext.interference) as evidence and in the change "
    "points; by default they are left out and counted. Devices' recommendations never use them.  "
    "[default: fleet.feedback_include_contended, false]",
)
def feedback_command(
    config_path: Path | None,
    db: str | None,
    device: str | None,
    model: str | None,
    as_json: bool,
    include_contended: bool,
) -> None:
    """Compute the performance-feedback documents from the store now and print them: each device × model's window,
    its figures, its anomalies and the recommendations measured evidence supports (docs/feedback.md).

    Nothing is changed or sent: a device receives its own recommendations with its next ingest acknowledgement from
    the server; the database is opened read-only. Exit status 0; 2 for a bad configuration or a database that is
    missing, empty, another program's or of another schema version.

    \b
    Example:
        lens-aggregator feedback --device orin-017
        lens-aggregator feedback --json | jq '.documents[].recommendations'
    """
    import dataclasses

    from . import feedback
    from .regressions import Watch

    config = _config(config_path, db)
    settings = feedback.Settings.from_config(config)
    if include_contended:  # the flag over fleet.feedback_include_contended
        settings = dataclasses.replace(settings, include_contended=True)
    store = _open_store(config, "read")
    try:
        watch = Watch(0.0, _detection(config, settings.include_contended))
        watch.search(store, time.monotonic(), _now_us())
        cache = feedback.FeedbackCache(config.get("fleet", "feedback_interval"), settings)
        documents, advice, all_contended = feedback.compute(store, cache.settings, watch.found, _now_us())
        cache.update(documents, advice, time.monotonic(), _now_us(), all_contended)
    finally:
        store.close()
    answer = cache.answer(device, model)
    if as_json:
        click.echo(json.dumps(answer, indent=2, ensure_ascii=False))
        return
    if not answer["documents"] and not answer["all_contended"]:
        click.echo("no device × model with a successful request" + (" matches" if device or model else ""))
    for doc in answer["documents"]:
        for line in feedback.describe(doc):
            click.echo(line)
    for left in answer["all_contended"]:
        n = left["contended_excluded"]
        click.echo(
            f"{left['device_id']} · {left['model_name']} ({left['strategy'] or 'local'}): no document: its "
            f"{n} successful request{'s' if n != 1 else ''} {'were' if n != 1 else 'was'} all contended and left out "
            "(--include-contended uses them)"
        )


@cli.group()
def campaign() -> None:
    """Benchmark campaigns: a suite pushed to devices, run by each when it syncs (docs/campaigns.md)."""


def _campaign_call(config_path: Path | None, db: str | None, fn: Any, *args: Any, mode: str = "read") -> Any:
    """``fn(store, config, *args)`` on the configured store (opened in ``mode``, see ``_open_store``), a refusal as
    a one-line error."""
    from .campaigns import BadRequest

    config = _config(config_path, db)
    store = _open_store(config, mode)
    try:
        return fn(store, config, *args)
    except BadRequest as exc:
        raise UsageError(
            str(exc) if exc.path is None or str(exc).startswith(exc.path) else f"{exc.path}: {exc}"
        ) from None
    except QueryTimeout as exc:
        raise LensError(str(exc)) from None
    finally:
        store.close()


def _read_suite(path: Path) -> Any:
    """A suite file as a document: JSON, or YAML when PyYAML is installed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--suite {path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > 1024**2:
        raise UsageError(f"--suite {path}: {len(data)} bytes; a campaign's suite is at most 1 MiB")
    text = data.decode("utf-8", errors="replace")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(
                f"--suite {path}: a YAML file needs PyYAML (pip install pyyaml); or give it as JSON"
            ) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"--suite {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--suite {path}: not valid JSON ({exc}); a .yaml/.yml file is read as YAML") from None


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@campaign.command("start")
@verbose_option
@config_option
@db_option
@click.option(
    "--suite", "suite_path", required=True, type=click.Path(path_type=Path), help="Suite file (.json, .yaml)."
)
@click.option("--device", "devices", multiple=True, help="A device id (repeat for more).")
@click.option("--class", "classes", multiple=True, help="Every device of this device class (repeat for more).")
@click.option("--tag", "tags", multiple=True, help="Every device carrying this tag (repeat for more).")
@click.option("--all", "everyone", is_flag=True, help="Every device the store knows.")
@click.option("--deadline", default="24h", show_default=True, help="Jobs not finished by then time out (1m … 7d).")
@click.option("--callback", "callback_url", help="POSTed (signed) when the campaign finishes.")
@click.option("--name", help="The campaign's name.  [default: the suite's test_suite.name]")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts (what POST /api/v1/benchmark/start answers).")
def campaign_start(
    config_path: Path | None,
    db: str | None,
    suite_path: Path,
    devices: tuple[str, ...],
    classes: tuple[str, ...],
    tags: tuple[str, ...],
    everyone: bool,
    deadline: str,
    callback_url: str | None,
    name: str | None,
    as_json: bool,
) -> None:
    """Start a campaign: the suite goes to the targeted devices with their next acknowledgement.

    The targets are a snapshot of the devices the store knows now (class and tags from their latest facts); a
    named device the store does not know is skipped.

    \b
    Example:
        lens-aggregator campaign start --suite nightly.json --class orin-agx --deadline 12h
        lens-aggregator campaign start --suite nightly.yaml --device orin-017 --device orin-018 --json
    """
    from lens_core.config import Invalid, parse_duration

    from .campaigns import CampaignSettings
    from .campaigns import start as start_campaign

    try:
        seconds = int(parse_duration(deadline))
    except Invalid as exc:
        raise UsageError(f"--deadline {deadline!r}: {exc} (such as 24h, 90m)") from None
    target: dict[str, Any] = {}
    if devices:
        target["devices"] = list(devices)
    if classes:
        target["classes"] = list(classes)
    if tags:
        target["tags"] = list(tags)
    if everyone:
        target["all"] = True
    if not target:
        raise UsageError("name the devices: --device ID, --class CLASS, --tag TAG or --all")
    body: dict[str, Any] = {"configuration": _read_suite(suite_path), "target": target, "deadline_seconds": seconds}
    if callback_url is not None:
        body["callback_url"] = callback_url
    if name is not None:
        body["name"] = name

    def run(store: Store, config: Config) -> dict[str, Any]:
        return start_campaign(store, body, CampaignSettings.from_config(config), "cli", _now_us())

    answer = _campaign_call(config_path, db, run, mode="write")
    if as_json:
        _echo_json(answer)
        return
    click.echo(answer["benchmark_id"])
    click.echo(f"{len(answer['devices'])} devices: {', '.join(answer['devices'])}", err=True)
    for device, reason in answer["skipped"].items():
        click.echo(f"skipped {device}: {reason}", err=True)


@campaign.command("status")
@verbose_option
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON (what GET /api/v1/benchmark/ID/status answers).")
@click.argument("benchmark_id")
def campaign_status(config_path: Path | None, db: str | None, as_json: bool, benchmark_id: str) -> None:
    """A campaign's state, progress and each device's job.

    \b
    Example:
        lens-aggregator campaign status 0b6c…-…
    """
    from .campaigns import status

    answer = _campaign_call(config_path, db, lambda store, config: status(store, benchmark_id))
    if as_json:
        _echo_json(answer)
        return
    counts = ", ".join(f"{n} {state}" for state, n in sorted(answer["counts"].items()))
    click.echo(f"{answer['name']}  {answer['status']}  {answer['progress_percent']:g}%  ({counts})")
    click.echo(f"created {answer['created_at']}  deadline {answer['deadline']}")
    for device, job in answer["devices"].items():
        reason = f"  {job['reason']}" if job["reason"] else ""
        click.echo(f"  {device:<24} {job['state']:<10} {job['progress_percent']:>5.1f}%{reason}")


@campaign.command("list")
@verbose_option
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON (what GET /api/v1/benchmark answers).")
def campaign_list(config_path: Path | None, db: str | None, as_json: bool) -> None:
    """The newest 100 campaigns, newest first.

    \b
    Example:
        lens-aggregator campaign list
    """
    from .campaigns import listing

    answer = _campaign_call(config_path, db, lambda store, config: listing(store))
    if as_json:
        _echo_json(answer)
        return
    if not answer:
        click.echo("no campaigns (lens-aggregator campaign start --suite FILE --all)")
    for row in answer:
        click.echo(
            f"{row['benchmark_id']}  {row['status']:<9}  {row['progress_percent']:>5.1f}%  {row['created_at']}  "
            f"{row['name']}"
        )


@campaign.command("cancel")
@verbose_option
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@click.argument("benchmark_id")
def campaign_cancel(config_path: Path | None, db: str | None, as_json: bool, benchmark_id: str) -> None:
    """Cancel a campaign: queued jobs at once, running ones when their device next syncs.

    \b
    Example:
        lens-aggregator campaign cancel 0b6c…-…
    """
    from .campaigns import cancel

    answer = _campaign_call(config_path, db, lambda store, config: cancel(store, benchmark_id, _now_us()), mode="write")
    if as_json:
        _echo_json(answer)
    else:
        click.echo(f"{answer['benchmark_id']} cancelled")


@campaign.command("results")
@verbose_option
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON (what GET /api/v1/benchmark/ID/results answers).")
@click.argument("benchmark_id")
def campaign_results(config_path: Path | None, db: str | None, as_json: bool, benchmark_id: str) -> None:
    """A campaign's results: per device its results documents, per device class the comparison table.

    \b
    Example:
        lens-aggregator campaign results 0b6c…-… --json > results.json
    """
    from .campaigns import results

    answer = _campaign_call(config_path, db, lambda store, config: results(store, benchmark_id))
    if as_json:
        _echo_json(answer)
        return
    click.echo(f"{answer['benchmark_id']}  {answer['status']}")
    for device, entry in answer["results"]["devices"].items():
        click.echo(
            f"  {device:<24} {entry['device_class'] or '-':<16} {entry['state']:<10} {len(entry['documents'])} levels"
        )
    for device_class, rows in answer["results"]["classes"].items():
        click.echo(f"class {device_class}:")
        for row in rows:
            click.echo(
                f"  {row['model']} / {row['workload']} / {row['level']}: {row['devices']} devices, "
                f"TTFT p50 {row['ttft_p50_ms']} ms, {row['tokens_per_second']} tok/s"
            )


@campaign.command("export")
@verbose_option
@config_option
@db_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "csv", "parquet", "arrow", "protobuf"]),
    default="csv",
    show_default=True,
)
@click.option("--output", type=click.Path(path_type=Path), help="Write to this file.  [default: stdout]")
@click.argument("benchmark_id")
def campaign_export(config_path: Path | None, db: str | None, fmt: str, output: Path | None, benchmark_id: str) -> None:
    """One row per device × model × workload × level.

    \b
    Example:
        lens-aggregator campaign export 0b6c…-… --format parquet --output nightly.parquet
    """
    from .campaigns import export_rows

    answer = _campaign_call(config_path, db, lambda store, config: export_rows(store, benchmark_id, fmt))
    if output is not None:
        try:
            output.write_bytes(answer.body)
        except OSError as exc:
            raise UsageError(f"--output {output}: cannot be written ({exc.strerror or exc})") from None
    elif fmt in ("parquet", "arrow", "protobuf"):
        raise UsageError(f"--format {fmt} is binary: give --output FILE")
    else:
        click.echo(answer.body.decode("utf-8"), nl=False)
    _echo_left_out(answer.notes)


def _echo_left_out(notes: dict[str, Any]) -> None:
    """What an export left out, on stderr (the JSON export's skipped_documents, skip_reasons and rows_dropped)."""
    skipped, dropped = notes["skipped_documents"], notes.get("rows_dropped", 0)
    if skipped:
        click.echo(f"skipped {skipped} results document{'s' * (skipped != 1)} (not in the export):", err=True)
        for reason in notes.get("skip_reasons", []):
            click.echo("  " + reason.encode("unicode_escape").decode("ascii"), err=True)  # no control characters
    if dropped:
        click.echo(f"dropped {dropped} row{'s' * (dropped != 1)} past the export's bounds", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors; exit 2 for bad input, 1 for failures."""
    run_click(cli, "lens-aggregator", argv)
