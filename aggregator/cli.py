"""``lens-aggregator``: serve the ingest API and manage tokens.

Exit status: 0 success, 1 runtime failure, 2 bad input (flag, config value, file).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import time
from pathlib import Path

import click

from agent.cliutil import run_click
from agent.config import Config
from agent.errors import UsageError
from agent.notify import Notifier

from . import __version__
from .config import load_aggregator_config
from .store import SQLiteStore, Store

log = logging.getLogger("aggregator")


def _now_us() -> int:
    return time.time_ns() // 1000


def _open_store(config: Config) -> Store:
    """A path means SQLite; ``postgresql://…`` means PostgreSQL (the ``[postgres]`` extra)."""
    db = str(config.get("storage", "db"))
    if db.startswith(("postgresql://", "postgres://")):
        try:
            from .pgstore import PostgresStore
        except ImportError:
            raise UsageError(
                "storage.db is a PostgreSQL URL: install psycopg (pip install 'llm-latency-lens[postgres]')"
            ) from None
        try:
            return PostgresStore(db)
        except Exception as exc:  # psycopg.OperationalError and friends: say what the server said
            safe = db.split("@")[-1]
            raise UsageError(f"storage.db = …@{safe}: cannot connect ({str(exc).strip().splitlines()[0]})") from None
    if "://" in db:
        raise UsageError(f"storage.db = {db!r}: expected a file path (SQLite) or a postgresql:// URL")
    try:
        return SQLiteStore(db)
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"storage.db = {db!r}: cannot be opened ({exc})") from None


def _config(config_path: Path | None, db: str | None) -> Config:
    return load_aggregator_config(config_path, overrides={("storage", "db"): ("--db", db)})


config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file."
)
db_option = click.option("--db", help="SQLite path or postgresql:// URL.  [default: storage.db]")


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
@config_option
@db_option
@click.option("--host", help="Listen address.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Listen port (0: any free port).  [default: 8443]")
def serve(config_path: Path | None, db: str | None, host: str | None, port: int | None) -> None:
    """Serve POST /api/v1/ingest, GET /api/v1/health, GET /api/v1/devices and GET /metrics (Prometheus).

    HTTPS when server.tls_cert and server.tls_key are set. Read endpoints are open while listening on loopback
    only; on any other address they need a read token. SIGTERM or SIGINT stops it after the batches in flight.

    \b
    Example:
        lens-aggregator serve --db /var/lib/lens-aggregator/aggregator.db --host 0.0.0.0 --port 8443
    """
    from aiohttp import web

    from .app import Settings, create_app

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
    settings = Settings(
        host=server["host"],
        max_body_bytes=server["max_body_bytes"],
        max_decompressed_bytes=server["max_decompressed_bytes"],
        max_metric_series=server["max_metric_series"],
        retention_s=config.get("storage", "retention"),
    )
    app = create_app(settings, _open_store(config))

    async def run() -> None:
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, server["host"], server["port"], ssl_context=ssl_context)
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

    asyncio.run(run())


@cli.group()
def token() -> None:
    """Manage device tokens (write only) and read tokens (dashboards, scripts)."""


@token.command("add")
@config_option
@db_option
@click.option("--read", "read_token", is_flag=True, help="A read token named SUBJECT instead of a device token.")
@click.argument("subject")
def token_add(config_path: Path | None, db: str | None, read_token: bool, subject: str) -> None:
    """Create a token for device SUBJECT and print it once; only its hash is stored.

    \b
    Example:
        lens-aggregator token add orin-017 > /etc/lens-agent/token
        lens-aggregator token add --read grafana
    """
    store = _open_store(_config(config_path, db))
    try:
        click.echo(store.add_token(subject, "read" if read_token else "device", _now_us()))
    finally:
        store.close()


@token.command("list")
@config_option
@db_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def token_list(config_path: Path | None, db: str | None, as_json: bool) -> None:
    """List tokens (by id: the first digits of their hash), with their state.

    \b
    Example:
        lens-aggregator token list --json
    """
    store = _open_store(_config(config_path, db))
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
        click.echo(f"{r['token_id']}  {r['kind']:<6}  {r['subject']:<24}  {r['created']}  {r['state']}")


@token.command("revoke")
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
    click.echo(f"revoked {count} token(s)", err=True)


@token.command("rotate")
@config_option
@db_option
@click.option("--grace", help="How long the old token keeps working, e.g. 24h.  [default: auth.rotate_grace]")
@click.argument("device_id")
def token_rotate(config_path: Path | None, db: str | None, grace: str | None, device_id: str) -> None:
    """Print a new token for DEVICE_ID; its old tokens keep working for the grace period.

    \b
    Example:
        lens-aggregator token rotate orin-017 --grace 48h
    """
    config = load_aggregator_config(
        config_path, overrides={("storage", "db"): ("--db", db), ("auth", "rotate_grace"): ("--grace", grace)}
    )
    store = _open_store(config)
    try:
        grace_us = int(config.get("auth", "rotate_grace") * 1_000_000)
        click.echo(store.rotate(device_id, _now_us(), grace_us))
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors; exit 2 for bad input, 1 for failures."""
    run_click(cli, "lens-aggregator", argv)
