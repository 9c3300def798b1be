"""``lens-agent tune``: find faster engine settings for this device's model, apply them through a drop-in, verify
them over the next scheduled runs, roll them back when they are worse (docs/tuning.md).

A thin shell over :mod:`agent.tune_flow`, :mod:`agent.tuning` and :mod:`agent.adjuster`: parses, calls, prints.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lens_core.settings import CONFIG_KEYS, FIELDS

from .config import AgentConfig, load_config
from .errors import UsageError

if TYPE_CHECKING:
    from .measurement import Measurement

_config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file."
)
_data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Outbox and tuning state.  [default: agent.data_dir]"
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
TUNABLE = ("n_threads", "flash_attn", "n_batch", "n_gpu_layers")


def _config(
    config_path: Path | None, data_dir: Path | None, *, create: bool = True, **extra: tuple[str, object]
) -> AgentConfig:
    """The configuration, and its data directory checked: created if need be (``create``, the commands that tune),
    else it must exist already (status and rollback create nothing)."""
    overrides: dict[tuple[str, str], tuple[str, object]] = {
        ("agent", "data_dir"): ("--data-dir", str(data_dir) if data_dir else None)
    }
    for name, flag_value in extra.items():
        section, key = name.split("__")
        overrides[(section, key)] = flag_value
    config = load_config(config_path, overrides=overrides)
    from .cli import _existing_data_dir, _usable_data_dir

    if create:
        _usable_data_dir(config)
    else:
        _existing_data_dir(config)
    return config


def _setting_value(name: str, text: str, where: str) -> Any:
    kind = FIELDS[name]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("on", "true", "1", "yes"):
            return True
        if lowered in ("off", "false", "0", "no"):
            return False
        raise UsageError(f"{where}: {name} takes on or off, not {text!r}")
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{where}: {name} takes an integer, not {text!r}") from None


def _parse_try(items: tuple[str, ...]) -> dict[str, list[Any]]:
    """``--try n_threads=1,2,4`` → {"n_threads": [1, 2, 4]}."""
    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().removeprefix("model.")
        if not sep or name not in TUNABLE or not values.strip():
            raise UsageError(f"--try {item!r}: expected SETTING=V1,V2,… with SETTING one of {', '.join(TUNABLE)}")
        out[name] = [_setting_value(name, v, f"--try {item!r}") for v in values.split(",") if v.strip()]
    return out


def _parse_set(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().removeprefix("model.")
        if not sep or name not in TUNABLE:
            raise UsageError(f"--set {item!r}: expected SETTING=VALUE with SETTING one of {', '.join(TUNABLE)}")
        out[name] = _setting_value(name, value, f"--set {item!r}")
    return out


@click.group("tune")
def tune_group() -> None:
    """Find faster engine settings for this device, apply them, verify them, roll them back.

    \b
    lens-agent tune run        search (threads, flash attention, batch size, GPU layers) and apply the winner
    lens-agent tune status     what is applied, and how its verification stands
    lens-agent tune apply      apply given settings without a search (verified the same way)
    lens-agent tune rollback   restore the settings before the latest change

    \b
    Example:
        lens-agent tune run --config /etc/lens-agent/agent.toml --dry-run
        lens-agent tune status --json
    """


@tune_group.command("run")
@_config_option
@_data_dir_option
@click.option("--model", type=click.Path(path_type=Path), help="GGUF model.  [default: model.path, else SmolLM2]")
@click.option("--prompts", type=click.Path(path_type=Path), help="Prompt file.  [default: tune.prompts]")
@click.option(
    "--try", "tries", multiple=True, metavar="SETTING=V1,V2", help="Values to try, e.g. --try n_threads=1,2,4."
)
@click.option("--search", type=click.Choice(["coordinate", "grid"]), help="Search.  [default: tune.search]")
@click.option("--objective", type=click.Choice(["e2e", "tpot", "ttft"]), help="What to make faster.  [default: e2e]")
@click.option("--requests", type=int, help="Measured requests per candidate per round.  [default: 4]")
@click.option("--rounds", type=int, help="Rounds.  [default: 3]")
@click.option("--max-tokens", type=int, help="Output tokens per request.  [default: 32]")
@click.option("--dry-run", is_flag=True, help="Measure and report; apply nothing.")
@click.option(
    "--allow-contended",
    is_flag=True,
    help="Decide (and apply) even when other work contended more than a quarter of a stage's requests.  "
    "[default: tune.allow_contended]",
)
@click.option("--no-store", is_flag=True, help="Do not store the tuning records in the outbox.")
@_json_option
def run_command(
    config_path: Path | None,
    data_dir: Path | None,
    model: Path | None,
    prompts: Path | None,
    tries: tuple[str, ...],
    search: str | None,
    objective: str | None,
    requests: int | None,
    rounds: int | None,
    max_tokens: int | None,
    dry_run: bool,
    allow_contended: bool,
    no_store: bool,
    as_json: bool,
) -> None:
    """Measure candidate engine settings against the current ones and apply a significantly faster one.

    Every candidate runs the same prompts for the same number of tokens, in shuffled rounds; a winner must beat
    the current settings in a Mann-Whitney test (p < tune.alpha) by at least tune.min_improvement. The winner
    goes into a drop-in (<data_dir>/tune/settings.toml) that lens-agent run picks up at its next run and verifies
    over tune.verify_runs scheduled runs, rolling it back when it is more than 5 % worse. Exit 0 whether or not
    something was found; 2 on bad input; 1 when the search could not run (a gate closed, the model failed).
    What else used the device is sampled during every request ([interference]): when other work contended more
    than a quarter of any stage's requests, nothing is decided or applied unless --allow-contended.

    \b
    Example:
        lens-agent tune run --config /etc/lens-agent/agent.toml
        lens-agent tune run --try n_threads=1,2,4 --try flash_attn=on,off --dry-run --json
    """
    from .tune_flow import measure_lock, outbox_store, run_tune
    from .tuning import TuneOptions

    config = _config(
        config_path,
        data_dir,
        model__path=("--model", str(model) if model else None),
        tune__search=("--search", search),
        tune__objective=("--objective", objective),
        tune__requests=("--requests", requests),
        tune__rounds=("--rounds", rounds),
        tune__max_tokens=("--max-tokens", max_tokens),
    )
    options = TuneOptions.from_config(config)
    tried = _parse_try(tries)
    if tried:
        options = TuneOptions(**{**options.__dict__, "grid": {**options.grid, **tried}})
    if allow_contended:
        options = TuneOptions(**{**options.__dict__, "allow_contended": True})
    store: Callable[[Measurement], None] | None = None
    close: Callable[[], None] = _nothing
    count = [0]
    if not no_store:
        store, close, count = outbox_store(config)

    def say(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    try:
        with measure_lock(
            config.get("agent", "data_dir"),
            wait_s=900.0,
            waiting=lambda: say("waiting for the service's run to finish …"),
        ):
            outcome = run_tune(
                config,
                trigger="manual",
                apply=not dry_run,
                store=store,
                progress=say,
                options=options,
                prompts_path=prompts,
            )
    finally:
        close()
    result = outcome.result
    undo = _undo_command(config_path, data_dir) if outcome.adjustment is not None else None
    if as_json:
        click.echo(
            json.dumps(
                {
                    **result.as_dict(),
                    "applied": outcome.adjustment.as_dict() if outcome.adjustment else None,
                    "not_applied": outcome.not_applied,
                    "undo": undo,
                    "records_stored": count[0],
                },
                indent=2,
            )
        )
        return
    from .tuning import describe

    for line in describe(result):
        click.echo(line)
    if outcome.adjustment is not None:
        a = outcome.adjustment
        click.echo(
            f"applied ({a.adjustment_id}): {_changes_line(a.changes)} in "
            f"{Path(config.get('agent', 'data_dir')) / 'tune' / 'settings.toml'}; lens-agent run picks it up at its "
            f"next run and verifies it over {a.verify_runs} scheduled runs"
            + ("" if a.baseline else " (no scheduled runs under the old settings yet: it cannot be judged)")
        )
        click.echo(f"undo: {undo}")
    elif outcome.not_applied and result.no_decision is None:  # a contended search said so already
        click.echo(f"{outcome.not_applied}: nothing was changed")
    if count[0]:
        click.echo(f"stored {count[0]} tuning records in the outbox", err=True)


def _nothing() -> None:
    pass


def _changes_line(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k} {a} → {b}" for k, (a, b) in changes.items())


def _tune_command(verb: str, config_path: Path | None, data_dir: Path | None, *args: str) -> str:
    """The ``lens-agent tune VERB`` command line for the same configuration and data directory as this one."""
    parts = ["lens-agent", "tune", verb, *args]
    if config_path is not None:
        parts += ["--config", str(config_path)]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    return shlex.join(parts)


def _undo_command(config_path: Path | None, data_dir: Path | None) -> str:
    """The command that undoes the change just applied: a rollback of the latest change."""
    return _tune_command("rollback", config_path, data_dir)


def _redo_command(changes: dict[str, list[Any]], config_path: Path | None, data_dir: Path | None) -> str:
    """The command that applies a rolled-back change again."""
    sets: list[str] = []
    for key, (_, after) in changes.items():
        value = ("on" if after else "off") if isinstance(after, bool) else str(after)
        sets += ["--set", f"{key.split('.')[-1]}={value}"]
    return _tune_command("apply", config_path, data_dir, *sets)


def _config_file_words(config: AgentConfig) -> str:
    """Where the settings come from without the drop-in."""
    if config.path is not None:
        return f"the configuration file's settings ({config.path})"
    return "the configuration's settings (no configuration file: defaults, environment, flags)"


def _back_to_config(drop_in: Path, config: AgentConfig) -> str:
    """How to return to the configuration file from a drop-in."""
    return f"delete the drop-in to return to {_config_file_words(config)}: rm {shlex.quote(str(drop_in))}"


@tune_group.command("apply")
@_config_option
@_data_dir_option
@click.option("--set", "sets", multiple=True, required=True, metavar="SETTING=VALUE", help="e.g. --set n_threads=2")
@_json_option
def apply_command(config_path: Path | None, data_dir: Path | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Apply engine settings without a search; verified and rolled back like a tune's winner.

    \b
    Example:
        lens-agent tune apply --set n_threads=2 --set flash_attn=off
    """
    from .engines.llama import EngineSettings
    from .tune_flow import apply_changes, outbox_store

    config = _config(config_path, data_dir)
    wanted = _parse_set(sets)
    current = EngineSettings.from_config(config).as_dict()
    changes = {k: (current[k], v) for k, v in wanted.items() if current[k] != v}
    if not changes:
        raise UsageError("every --set value is the current one: nothing to apply")
    for name in changes:
        section, key = CONFIG_KEYS[name]
        from .config import SCHEMA

        try:
            SCHEMA[section][key].parse(changes[name][1])
        except Exception as exc:
            raise UsageError(f"--set {name}={changes[name][1]}: {exc}") from None
    store, close, _ = outbox_store(config)
    try:
        adjustment = apply_changes(config, changes, source="manual", store=store)
    finally:
        close()
    undo = _undo_command(config_path, data_dir)
    if as_json:
        click.echo(json.dumps({**adjustment.as_dict(), "undo": undo}, indent=2))
    else:
        click.echo(f"applied ({adjustment.adjustment_id}): {_changes_line(adjustment.changes)}")
        click.echo(f"undo: {undo}")


@tune_group.command("rollback")
@_config_option
@_data_dir_option
@_json_option
def rollback_command(config_path: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Restore the settings as they were before the latest change (the previous drop-in, or none).

    \b
    Example:
        lens-agent tune rollback --config /etc/lens-agent/agent.toml
    """
    from .adjuster import AdjusterError, DropInAdjuster
    from .config import set_aside_drop_in
    from .tune_flow import outbox_store
    from .tuning import tune_record

    config = _config(config_path, data_dir, create=False)
    adjuster = DropInAdjuster(config.get("agent", "data_dir"))
    try:
        current = adjuster.current()
    except AdjusterError as exc:  # a rollback always works: without readable state, the drop-in goes aside
        moved = set_aside_drop_in(config.get("agent", "data_dir"), f"rolled back by hand; {exc}")
        if moved is None:
            raise UsageError(f"{exc}; there is no drop-in to set aside either") from None
        message = (
            f"the tuning state is not readable ({exc}); the drop-in is set aside as {moved}: "
            "the configuration file's settings apply"
        )
        click.echo(json.dumps({"set_aside": str(moved), "reason": str(exc)}) if as_json else message)
        return
    if current is None:
        if config.drop_in_refused is not None or adjuster.drop_in.exists():
            moved = set_aside_drop_in(config.get("agent", "data_dir"), "rolled back by hand")
            message = (
                f"no change was recorded; the drop-in is set aside as {moved}: the configuration file's settings apply"
            )
            click.echo(json.dumps({"set_aside": str(moved)}) if as_json else message)
            return
        raise UsageError(
            f"nothing to roll back: no change was applied in {adjuster.dir} and there is no drop-in; "
            f"{_config_file_words(config)} apply"
        )
    if current.status == "rolled_back":
        if adjuster.drop_in.exists():
            then = f"the drop-in {adjuster.drop_in} still holds the settings from before it; " + _back_to_config(
                adjuster.drop_in, config
            )
        else:
            then = f"there is no drop-in: {_config_file_words(config)} apply"
        raise UsageError(
            f"the latest change ({_changes_line(current.changes)}) was already rolled back, and only the latest "
            f"change can be rolled back; {then}"
        )
    adjustment = adjuster.rollback(current.adjustment_id, "rolled back by hand (lens-agent tune rollback)")
    store, close, _ = outbox_store(config)
    try:
        store(
            tune_record(
                "rollback",
                {"adjustment_id": adjustment.adjustment_id, "status": adjustment.status, "reason": "by hand"},
                device_id=config.get("agent", "device_id"),
                model_name="unknown",
            )
        )
    finally:
        close()
    redo = _redo_command(adjustment.changes, config_path, data_dir)
    now = (
        f"the drop-in {adjuster.drop_in} holds the settings from before it"
        if adjuster.drop_in.exists()
        else f"no drop-in is left: {_config_file_words(config)} apply"
    )
    if as_json:
        click.echo(json.dumps({**adjustment.as_dict(), "undo": redo}, indent=2))
    else:
        click.echo(f"rolled back {adjustment.adjustment_id}: {_changes_line(adjustment.changes)} undone; {now}")
        click.echo(f"undo: {redo}")


def _with_directions(adjustment: dict[str, Any]) -> dict[str, Any]:
    """An adjustment for JSON, each verification figure with its ``direction`` (faster, slower, same)."""
    from .tuning import direction

    result = adjustment.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("per_workload"), dict):
        return adjustment
    per_workload = {
        name: {**figures, "direction": direction(figures["improvement"])}
        for name, figures in result["per_workload"].items()
    }
    return {**adjustment, "result": {**result, "per_workload": per_workload}}


@tune_group.command("status")
@_config_option
@_data_dir_option
@_json_option
def status_command(config_path: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """The applied drop-in, each tunable setting's value and source, the latest change and its verification.

    \b
    Example:
        lens-agent tune status --config /etc/lens-agent/agent.toml --json
    """
    from .adjuster import AdjusterError, DropInAdjuster

    config = _config(config_path, data_dir, create=False)
    adjuster = DropInAdjuster(config.get("agent", "data_dir"))
    state_problem = None
    try:
        current = adjuster.current()
    except AdjusterError as exc:  # the state is the device's own: shown, never a reason to stop
        current, state_problem = None, str(exc)
    effective = {
        ".".join(CONFIG_KEYS[k]): {"value": config.get(*CONFIG_KEYS[k]), "source": config.source(*CONFIG_KEYS[k])}
        for k in TUNABLE
    }
    from .adjuster import tune_summary

    summary = tune_summary(config.get("agent", "data_dir"), config.drop_in_refused) or {}
    in_effect = adjuster.drop_in.exists() and not config.drop_in_refused
    rollback = (
        _undo_command(config_path, data_dir)
        if current is not None and current.status != "rolled_back" and in_effect
        else None
    )
    answer = {
        "drop_in": str(adjuster.drop_in) if in_effect else None,
        "drop_in_refused": summary.get("refused"),
        "effective": effective,
        "latest": _with_directions(current.as_dict()) if current else None,
        "state_problem": state_problem,
        "undo": rollback,
        "back_to_config": f"rm {shlex.quote(str(adjuster.drop_in))}" if in_effect else None,
        "config_file": str(config.path) if config.path is not None else None,
    }
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"drop-in   {answer['drop_in'] or 'none'}")
    if answer["drop_in_refused"]:
        click.echo(f"  {answer['drop_in_refused']}")
    for key, item in effective.items():
        click.echo(f"  {key:<20} {item['value']!s:<8} ({item['source']})")
    if in_effect:
        click.echo(f"back      {_back_to_config(adjuster.drop_in, config)}")
    else:
        click.echo(f"back      nothing to return from: {_config_file_words(config)} apply")
    if state_problem is not None:
        click.echo(f"tuning state not readable: {state_problem}")
        return
    if current is None:
        click.echo("no change applied yet")
        return
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(current.applied_at))
    click.echo(f"latest    {_changes_line(current.changes)} ({current.source}, {when}): {current.status}")
    if current.status == "verifying":
        click.echo(f"  verified over {current.runs_after}/{current.verify_runs} scheduled runs so far")
    from .tuning import change_words

    for workload, figures in ((current.result or {}).get("per_workload") or {}).items():
        click.echo(
            f"  {workload}: median {figures['baseline_median']:.2f} → {figures['candidate_median']:.2f} ms "
            f"({change_words(figures['improvement'])}, p = {figures['p_value']:.2g})"
        )
    reason = (current.result or {}).get("reason")
    if reason:
        click.echo(f"  {reason}")
    if rollback is not None:
        click.echo(f"undo      {rollback}")
