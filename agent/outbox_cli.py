"""``lens-agent outbox``: look into the outbox and repair it — the quarantine, exports, damage notices.

A thin shell over :class:`agent.outbox.Outbox`: parses, calls, prints. The outbox module is imported inside the
commands, so ``lens-agent --help`` stays quick.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .config import AgentConfig, load_config
from .errors import UsageError
from .status import human_size, plural

if TYPE_CHECKING:
    from .outbox import Outbox, OutboxStats

CODES_HELP = "undecodable, refused, too_large, other_device, salvaged, unencodable or other"

_config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file."
)
_data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Outbox directory.  [default: agent.data_dir]"
)


def _config(config_path: Path | None, data_dir: Path | None) -> AgentConfig:
    return load_config(
        config_path, overrides={("agent", "data_dir"): ("--data-dir", str(data_dir) if data_dir else None)}
    )


def _open(config: AgentConfig, *, reading: bool = False) -> Outbox:
    """The outbox, which must exist; ``reading`` (list, export): it must also be this agent's outbox at its schema
    version, checked read-only first, so that a read never migrates, salvages or creates anything."""
    from lens_core.sqlite_readonly import NotUsable

    from .outbox import check_outbox_readable, open_outbox, outbox_path

    path = outbox_path(config.get("agent", "data_dir"))
    if not path.exists():
        raise UsageError(f"no outbox at {path}: check agent.data_dir (or --data-dir)")
    if reading:
        try:
            check_outbox_readable(path)
        except NotUsable as exc:
            raise UsageError(f"outbox {exc}") from None
    return open_outbox(config)


def _selection(seqs: tuple[int, ...], code: str | None, all_: bool, verb: str) -> list[int] | None:
    """The seqs to act on (None: every row matching --code, or all), refusing an empty or mixed selection."""
    if all_ and (seqs or code):
        raise UsageError(f"outbox {verb}: give --all, or SEQ and/or --code, not both")
    if not (all_ or seqs or code):
        raise UsageError(f"outbox {verb}: say which quarantined records: SEQ ..., --code CODE, or --all")
    return list(seqs) if seqs else None


def _iso(us: int | None) -> str:
    return "-" if us is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(us / 1e6))


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in counts.items() if n) or "none"


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@click.group("outbox")
def outbox_group() -> None:
    """Look into the outbox and repair it: pending records, the quarantine, damage notices.

    Records the aggregator refused, or that do not decode, are quarantined (kept, counted, not resent); each has a
    reason code: undecodable, refused, too_large, other_device, salvaged, other. Nothing leaves the quarantine
    uncounted: evicted by outbox.max_quarantine_bytes, dropped here, or retried here.

    \b
    Example:
        lens-agent outbox list
        lens-agent outbox export quarantined.ndjson
        lens-agent outbox retry --code other_device --as-device orin-017
        lens-agent outbox drop 12 13 --yes
        lens-agent outbox ack-damage
    """


@outbox_group.command("list")
@_config_option
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_command(config_path: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Show what is pending and every quarantined record: seq, id, code, reason, times, size, device.

    \b
    Example:
        lens-agent outbox list
        lens-agent outbox list --json | jq '.quarantine.rows[] | select(.code == "other_device")'
    """
    from .outbox import decoded_device_id

    box = _open(_config(config_path, data_dir), reading=True)
    try:
        stats = box.stats()
        rows = box.quarantined()
        path = box.path
    finally:
        box.close()
    doc = {
        "path": str(path),
        "pending": {"records": stats.records, "bytes": stats.bytes, "max_bytes": stats.max_bytes},
        "quarantine": {
            "records": stats.quarantine_records,
            "bytes": stats.quarantine_bytes,
            "max_bytes": stats.max_quarantine_bytes,
            "quarantined": dict(stats.quarantined_by_code),
            "evicted": dict(stats.quarantine_evicted),
            "dropped": dict(stats.quarantine_dropped),
            "retried": dict(stats.quarantine_retried),
            "rows": [
                {
                    "seq": row.seq,
                    "id": row.id.hex() if row.id is not None else None,
                    "code": row.code,
                    "reason": row.reason,
                    "device_id": decoded_device_id(row),
                    "created": _iso(row.created_us),
                    "quarantined": _iso(row.quarantined_us),
                    "size": row.size,
                    "codec": row.codec,
                }
                for row in rows
            ],
        },
        "damage": stats.damage,
        "disk_full_since": None if stats.disk_full_since_us is None else _iso(stats.disk_full_since_us),
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(_render_list(doc, stats))


def _render_list(doc: dict[str, Any], stats: OutboxStats) -> str:
    quarantine = doc["quarantine"]
    lines = [
        f"outbox      {doc['path']}",
        f"pending     {plural(stats.records, 'record')} ({human_size(stats.bytes)} of {human_size(stats.max_bytes)})",
        f"quarantine  {plural(quarantine['records'], 'record')} ({human_size(quarantine['bytes'])} of "
        f"{human_size(quarantine['max_bytes'])})",
    ]
    if quarantine["rows"]:
        lines.append(
            f"  {'SEQ':>6}  {'CODE':<12}  {'DEVICE':<16}  {'ID':<32}  {'QUARANTINED':<20}  {'SIZE':>6}  REASON"
        )
        for row in quarantine["rows"]:
            lines.append(
                f"  {row['seq']:>6}  {row['code']:<12}  {(row['device_id'] or '?'):<16}  {(row['id'] or '-'):<32}  "
                f"{row['quarantined']:<20}  {row['size']:>6}  {row['reason']}"
            )
    lines += [
        f"  quarantined so far  {_counts(quarantine['quarantined'])}",
        f"  evicted (bound)     {_counts(quarantine['evicted'])}",
        f"  dropped (operator)  {_counts(quarantine['dropped'])}",
        f"  retried             {_counts(quarantine['retried'])}",
    ]
    if doc["disk_full_since"]:
        lines.append(f"disk full   since {doc['disk_full_since']}: {stats.disk_full_message}")
    if doc["damage"]:
        lines.append(f"damage      {doc['damage']}")
        lines.append("            (lens-agent outbox ack-damage once you have looked)")
    return "\n".join(lines)


@outbox_group.command("export")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True))
@click.option(
    "--quarantined/--pending",
    "quarantined",
    default=True,
    help="Export the quarantine, or the records waiting to be uploaded.  [default: --quarantined]",
)
@_config_option
@_data_dir_option
def export_command(file: Path, quarantined: bool, config_path: Path | None, data_dir: Path | None) -> None:
    """Write records as NDJSON, one a line: seq, code, reason and the decoded measurement ("record").

    A record that does not decode is written with its "error" and its raw bytes ("body_hex"), so nothing has to be
    dropped unseen. FILE "-" writes to stdout. A file is written whole or not at all (through a temporary file renamed
    over it); a device or FIFO (/dev/stdout, a named pipe) is written into.

    \b
    Example:
        lens-agent outbox export quarantined.ndjson
        lens-agent outbox export --pending - | jq -c .record.model_name
    """
    which = "quarantined" if quarantined else "pending"
    box = _open(_config(config_path, data_dir), reading=True)
    count = 0
    try:
        if str(file) == "-":
            for row in box.export_rows(which):
                click.echo(json.dumps(row, default=_json_default))
                count += 1
        elif file.exists() and not file.is_file():
            # a device, a FIFO or /dev/stdout (through its link): written into, never renamed over
            try:
                with file.open("w", encoding="utf-8") as handle:
                    for row in box.export_rows(which):
                        handle.write(json.dumps(row, default=_json_default) + "\n")
                        count += 1
            except OSError as exc:
                raise UsageError(f"{file}: cannot be written ({exc.strerror})") from None
        else:
            file = file.resolve() if file.is_symlink() else file  # a link to a file: the file is replaced, not the link
            temporary = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            try:
                with temporary.open("w", encoding="utf-8") as handle:
                    for row in box.export_rows(which):
                        handle.write(json.dumps(row, default=_json_default) + "\n")
                        count += 1
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, file)
            except OSError as exc:
                temporary.unlink(missing_ok=True)
                raise UsageError(f"{file}: cannot be written ({exc.strerror})") from None
    finally:
        box.close()
    click.echo(f"exported {plural(count, which + ' record')} to {'stdout' if str(file) == '-' else file}", err=True)


_code_option = click.option("--code", help=f"Only records with this reason code: {CODES_HELP}.")


@outbox_group.command("retry")
@click.argument("seqs", nargs=-1, type=int)
@_code_option
@click.option("--all", "all_", is_flag=True, help="Every quarantined record.")
@click.option("--as-device", help="Rewrite the device_id inside each record first (records stored under an old id).")
@_config_option
@_data_dir_option
def retry_command(
    seqs: tuple[int, ...],
    code: str | None,
    all_: bool,
    as_device: str | None,
    config_path: Path | None,
    data_dir: Path | None,
) -> None:
    """Move quarantined records (by SEQ, --code or --all) back into the queue; the next sync uploads them.

    --as-device is the way out for records stored before agent.device_id was set (the default device id is the host
    name): the aggregator refuses them under this device's token, and the uploader quarantines them with code
    other_device. Each record is decoded, given the new device_id and encoded again in its codec.

    \b
    Example:
        lens-agent outbox retry 7 9
        lens-agent outbox retry --code other_device --as-device orin-017
        lens-agent outbox retry --all && lens-agent sync
    """
    selected = _selection(seqs, code, all_, "retry")
    box = _open(_config(config_path, data_dir))
    try:
        moved = box.retry_quarantined(selected, code=code, as_device=as_device)
    finally:
        box.close()
    device = f" as device {as_device}" if as_device else ""
    click.echo(f"moved {plural(moved, 'quarantined record')} back to the queue{device}; lens-agent sync uploads them")


@outbox_group.command("drop")
@click.argument("seqs", nargs=-1, type=int)
@_code_option
@click.option("--all", "all_", is_flag=True, help="Every quarantined record.")
@click.option("--yes", is_flag=True, help="Yes, delete them for good (they are counted as dropped by the operator).")
@_config_option
@_data_dir_option
def drop_command(
    seqs: tuple[int, ...], code: str | None, all_: bool, yes: bool, config_path: Path | None, data_dir: Path | None
) -> None:
    """Delete quarantined records (by SEQ, --code or --all) for good; each is counted as dropped by the operator.

    \b
    Example:
        lens-agent outbox export quarantined.ndjson && lens-agent outbox drop --code undecodable --yes
        lens-agent outbox drop 12 13 --yes
    """
    selected = _selection(seqs, code, all_, "drop")
    if not yes:
        raise UsageError(
            "outbox drop deletes quarantined records for good: add --yes (keep a copy first: lens-agent outbox "
            "export FILE)"
        )
    box = _open(_config(config_path, data_dir))
    try:
        dropped = box.drop_quarantined(selected, code=code)
    finally:
        box.close()
    click.echo(f"dropped {plural(dropped, 'quarantined record')} (counted as dropped by the operator)")


@outbox_group.command("ack-damage")
@_config_option
@_data_dir_option
def ack_damage_command(config_path: Path | None, data_dir: Path | None) -> None:
    """Acknowledge the notice left by salvaging a damaged outbox, so status is healthy again.

    The notice says what was recovered and what was lost; lost_total keeps counting it. The damaged file stays
    beside the outbox (outbox.db.damaged-TIME) until you delete it.

    \b
    Example:
        lens-agent status; lens-agent outbox ack-damage
    """
    box = _open(_config(config_path, data_dir))
    try:
        notice = box.ack_damage()
    finally:
        box.close()
    if notice is None:
        click.echo("no damage notice to acknowledge")
    else:
        click.echo(f"acknowledged: {notice}")
