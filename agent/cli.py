"""``lens-agent``: the command-line shell over the agent library. Parses, calls, and turns errors into messages.

Exit status: 0 success, 1 runtime failure, 2 bad input (flag, config value, file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import click

from lens_core.cliutil import run_click

from . import __version__
from .config import AgentConfig, load_config
from .errors import LensError, UsageError

log = logging.getLogger("agent")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (not the stream of the first call), so a second
    setup — ``lens-agent bench -v`` after ``lens-agent`` — or a replaced stderr never writes to a closed stream."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(verbose: bool, service: bool = False) -> None:
    """Where log lines go: the service (``run``) logs warnings and errors (journald keeps them); every other command
    says what matters in its own output and one-line error, so the library's log stays out of the terminal unless
    ``-v`` asks for it."""
    import os

    # Under systemd (JOURNAL_STREAM set) journald stamps every line; elsewhere the log carries its own time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(stamp + "%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setLevel(logging.NOTSET if verbose or service else logging.CRITICAL + 1)
    logging.getLogger("llama.cpp").setLevel(logging.INFO if verbose else logging.ERROR)


def _verbose_here(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _setup_logging(True)


# `lens-agent bench -v` works like `lens-agent -v bench`
verbose_option = click.option(
    "-v", "--verbose", is_flag=True, expose_value=False, callback=_verbose_here, help="Same as lens-agent -v."
)


class _Commands(click.Group):
    """The command groups that live in their own modules load when they are named (or listed by --help), so the
    other commands never import them (docs/PERFORMANCE.md, the agent's footprint)."""

    LAZY: ClassVar[dict[str, tuple[str, str]]] = {
        "outbox": ("agent.outbox_cli", "outbox_group"),
        "tune": ("agent.tune_cli", "tune_group"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as exc:  # "did you mean" over every command, the lazy ones too
            raise click.exceptions.NoSuchCommand(
                exc.command_name, possibilities=self.list_commands(ctx), ctx=ctx
            ) from None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            import importlib

            module, name = self.LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(module), name), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lens-agent")
@click.option("-v", "--verbose", is_flag=True, help="Log more, including llama.cpp's own messages.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """LLM-Latency-Lens on-device agent: time local LLM inference faithfully.

    Configuration comes from a TOML file (--config, else /etc/lens-agent/agent.toml), then LENS_<SECTION>_<KEY>
    environment variables, then flags. See configs/agent.toml for every key.
    """
    _setup_logging(verbose, service=ctx.invoked_subcommand == "run")


@cli.command()
@verbose_option
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Path(path_type=Path),
    help="GGUF model to time (repeat to compare models). Default: [model] path, else the bundled SmolLM2.",
)
@click.option("--prompts", type=click.Path(path_type=Path), help="Prompt file: .txt (a prompt a line) or .jsonl.")
@click.option("--runs", type=int, help="Measured requests, cycling through the prompts.  [default: 10]")
@click.option("--warmup", type=int, help="Warm-up requests before them, not counted.  [default: 1]")
@click.option("--max-tokens", type=int, help="Output tokens per request at most.  [default: 128]")
@click.option("--output", type=click.Path(path_type=Path), help="Write the results JSON (schema-valid) here.")
@click.option("--raw", type=click.Path(path_type=Path), help="Write one JSON line per request here.")
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["lens", "llmperf", "protobuf"]),
    help="llmperf: also write LLMPerf's summary and individual-responses files; protobuf: also write the results "
    "and their requests as llm_latency_lens.v1.BenchmarkResults messages to --output's name with .pb "
    "(docs/wire-format.md).",
)
@click.option(
    "--llmperf-dir",
    type=click.Path(path_type=Path),
    help="Where LLMPerf's files go.  [default: beside --output, else the current directory]",
)
@click.option("--n-ctx", type=int, help="Context size in tokens.  [default: 2048]")
@click.option(
    "--n-threads",
    type=int,
    help="Threads.  [default: physical cores less those busy with other work (docs/interference.md)]",
)
@click.option("--n-batch", type=int, help="Prompt tokens per llama_decode call.  [default: 512]")
@click.option("--n-gpu-layers", type=int, help="Layers offloaded to a GPU, -1 for all.  [default: 0]")
@click.option("--flash-attn/--no-flash-attn", default=None, help="Flash attention.  [default: on]")
@click.option("--ignore-eos", is_flag=True, default=None, help="Generate --max-tokens tokens, past end-of-sequence.")
@click.option(
    "--chat-template",
    type=click.Choice(["auto", "on", "off"]),
    help="Wrap prompts in the model's chat template (auto: when it has one).  [default: auto]",
)
@click.option("--reuse-cache", is_flag=True, default=None, help="Keep the KV cache's common prefix between requests.")
@click.option("--device-id", help="Device id recorded with every measurement.  [default: the host name]")
@click.option("--no-text", is_flag=True, help="Leave prompt and output text out of --raw.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON array of results documents (one per model) on stdout instead of the table.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.  [default: when a terminal]")
@click.option("--sysfs-root", type=click.Path(path_type=Path), help="Read sensors under DIR instead of /.")
@click.option("--power-source", help="auto, none, or sources (jetson, rapl, battery, nvml, jtop; comma-separated).")
@click.option("--sample-rate", type=float, help="Power samples per second.  [default: 10]")
@click.option("--idle-baseline", help="Idle power measured before the run, e.g. 2s (0: none).  [default: 2s]")
@click.option(
    "--strategy",
    type=click.Choice(["local", "cloud", "speculative", "offload"]),
    help="local; cloud (OpenAI-compatible endpoint); speculative (--model drafts, the cloud verifies); offload.",
)
@click.option("--cloud-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1 (or cloud.url).")
@click.option("--cloud-model", help="Model name sent to the endpoint.  [default: the first it lists]")
@click.option(
    "--cloud-api",
    type=click.Choice(["auto", "chat", "completions"]),
    help="Cloud strategy: /v1/chat/completions or /v1/completions; auto: chat for a chat model.  [default: auto]",
)
@click.option(
    "--verify",
    type=click.Choice(["auto", "tokens", "generate", "logprobs"]),
    help="Speculative verification: tokens (llama-server's token ids), generate or logprobs (text); auto: tokens "
    "when the endpoint has the token-id API, else generate.  [default: auto]",
)
@click.option("--draft-tokens", type=int, help="Tokens drafted per round.  [default: 4]")
@click.option("--adaptive-draft", is_flag=True, default=None, help="Adapt the draft length to the acceptance seen.")
@click.option("--baselines", is_flag=True, default=None, help="Also run cloud-only and edge-only: speedup figures.")
@click.option(
    "--max-error-rate",
    type=float,
    help="Exit 1 when more than this share of requests failed (0 to 1; exit 1 anyway when none succeeded).  "
    "[default: 1]",
)
@click.option("--store", is_flag=True, help="Append every measurement to the outbox (durable before the next request).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Outbox directory.  [default: agent.data_dir]")
@click.option(
    "--suite",
    "suite_path",
    type=click.Path(path_type=Path),
    help="Run a benchmark suite (.json or .yaml, the specification's configuration document): every model × "
    "workload × load level; --output is then a directory (docs/suites.md).",
)
@click.option(
    "--guardrails",
    "guardrail_set",
    metavar="NAME",
    help="Time a guardrail set around every request: a [[guardrails]] set of the config, or the built-in rules "
    "or empty (docs/guardrails.md).",
)
def bench(
    config_path: Path | None,
    models: tuple[Path, ...],
    prompts: Path | None,
    runs: int | None,
    warmup: int | None,
    max_tokens: int | None,
    output: Path | None,
    raw: Path | None,
    formats: tuple[str, ...],
    llmperf_dir: Path | None,
    n_ctx: int | None,
    n_threads: int | None,
    n_batch: int | None,
    n_gpu_layers: int | None,
    flash_attn: bool | None,
    ignore_eos: bool | None,
    chat_template: str | None,
    reuse_cache: bool | None,
    device_id: str | None,
    no_text: bool,
    as_json: bool,
    progress: bool | None,
    strategy: str | None,
    cloud_url: str | None,
    cloud_model: str | None,
    cloud_api: str | None,
    verify: str | None,
    draft_tokens: int | None,
    adaptive_draft: bool | None,
    baselines: bool | None,
    sysfs_root: Path | None,
    power_source: str | None,
    sample_rate: float | None,
    idle_baseline: str | None,
    max_error_rate: float | None,
    store: bool,
    data_dir: Path | None,
    suite_path: Path | None,
    guardrail_set: str | None,
) -> None:
    """Benchmark local llama.cpp inference: TTFT, TPOT, every inter-token gap, load time and memory.

    Exit status 0 when the run succeeded, 1 when no request succeeded or more failed than --max-error-rate
    allows (the results are written all the same), 2 on bad input. Warm-up requests run first and are left out of
    the statistics; every measured request starts from an empty
    KV cache unless --reuse-cache is given. Decoding is greedy. Where the device has a power sensor, energy per
    prompt token and per output token is measured alongside (lens-agent probe shows what is there). A summary
    table goes to stdout, a progress bar to stderr.

    \b
    Example:
        lens-agent bench --runs 20 --max-tokens 64 --output results.json
        lens-agent bench --model a-Q4_1.gguf --model a-Q8_0.gguf --output compare.json
        lens-agent bench --prompts configs/prompts/short.txt --raw requests.jsonl --format llmperf
        lens-agent bench --runs 20 --output results.json --format protobuf
        lens-agent bench --config /etc/lens-agent/agent.toml --store
        lens-agent bench --strategy speculative --model draft.gguf --cloud-url http://host:8000/v1 \\
            --verify logprobs --draft-tokens 4 --baselines
        lens-agent bench --suite suite.yaml --output results/
        lens-agent bench --guardrails rules --runs 20 --output guarded.json
    """
    overrides: dict[tuple[str, str], tuple[str, object]] = {
        ("bench", "prompts"): ("--prompts", str(prompts) if prompts else None),
        ("bench", "runs"): ("--runs", runs),
        ("bench", "warmup"): ("--warmup", warmup),
        ("bench", "max_tokens"): ("--max-tokens", max_tokens),
        ("bench", "ignore_eos"): ("--ignore-eos", ignore_eos),
        ("bench", "chat_template"): ("--chat-template", chat_template),
        ("bench", "reuse_cache"): ("--reuse-cache", reuse_cache),
        ("model", "n_ctx"): ("--n-ctx", n_ctx),
        ("model", "n_threads"): ("--n-threads", n_threads),
        ("model", "n_batch"): ("--n-batch", n_batch),
        ("model", "n_gpu_layers"): ("--n-gpu-layers", n_gpu_layers),
        ("model", "flash_attn"): ("--flash-attn", flash_attn),
        ("agent", "device_id"): ("--device-id", device_id),
        ("agent", "data_dir"): ("--data-dir", str(data_dir) if data_dir else None),
        ("probes", "sysfs_root"): ("--sysfs-root", str(sysfs_root) if sysfs_root else None),
        ("probes", "power_source"): ("--power-source", power_source),
        ("collab", "strategy"): ("--strategy", strategy),
        ("cloud", "url"): ("--cloud-url", cloud_url),
        ("cloud", "model"): ("--cloud-model", cloud_model),
        ("cloud", "api"): ("--cloud-api", cloud_api),
        ("collab", "verify"): ("--verify", verify),
        ("collab", "draft_tokens"): ("--draft-tokens", draft_tokens),
        ("collab", "adaptive_draft"): ("--adaptive-draft", adaptive_draft),
        ("collab", "baselines"): ("--baselines", baselines),
        ("probes", "sample_rate_hz"): ("--sample-rate", sample_rate),
        ("probes", "idle_baseline"): ("--idle-baseline", idle_baseline),
        ("bench", "max_error_rate"): ("--max-error-rate", max_error_rate),
    }
    if suite_path is not None:
        given = {
            "--model": bool(models),
            "--prompts": prompts is not None,
            "--runs": runs is not None,
            "--warmup": warmup is not None,
            "--max-tokens": max_tokens is not None,
            "--ignore-eos": ignore_eos is not None,
            "--strategy": strategy is not None,
            "--cloud-url": cloud_url is not None,
            "--cloud-model": cloud_model is not None,
            "--format": bool(formats),
            "--baselines": baselines is not None,
            "--guardrails": guardrail_set is not None,
        }
        clash = [flag for flag, set_ in given.items() if set_]
        if clash:
            raise UsageError(
                f"--suite takes its models, prompts, requests and load from the suite: drop {', '.join(clash)} "
                '(engine settings go in a model\'s "settings", docs/suites.md)'
            )
        _bench_suite(
            suite_path,
            config_path=config_path,
            output=output,
            raw=raw,
            as_json=as_json,
            no_text=no_text,
            progress=progress,
            store=store,
            overrides={key: overrides[key] for key in SUITE_OVERRIDES},
        )
        return
    config = load_config(config_path, overrides=overrides)
    if llmperf_dir is not None and "llmperf" not in formats:
        raise UsageError("--llmperf-dir is used only with --format llmperf: add --format llmperf or drop it")
    protobuf_path = _protobuf_path(output) if "protobuf" in formats else None
    _check_sysfs_root(config)
    if store:
        _usable_data_dir(config)
    from .bench.session import BenchRequest, run_session

    request = BenchRequest(
        config=config,
        models=list(models),
        output=output,
        raw=raw,
        llmperf_dir=(llmperf_dir or (output.parent if output else Path("."))) if "llmperf" in formats else None,
        include_text=not no_text,
        progress=progress,
        store=store,
        guardrails=guardrail_set,
        keep_measurements=protobuf_path is not None,
    )
    session = run_session(request, status=lambda msg: click.echo(msg, err=True))
    if as_json:  # always an array: one results document per model (one for a single model), whatever was asked
        click.echo(json.dumps(session.documents, indent=2))
    else:
        for table in session.tables:
            click.echo(table)
            click.echo()
        if len(session.documents) > 1:
            click.echo(session.comparison)
    if protobuf_path is not None:
        _write_protobuf(protobuf_path, session.documents, session.measurements)
        session.written.append(protobuf_path)
    for path in session.written:
        click.echo(f"wrote {path}", err=True)
    if session.stored is not None:
        click.echo(f"stored {_count(session.stored, 'measurement')} in {session.outbox_file}", err=True)
    from .bench.report import failure

    failures = [f for f in (failure(doc, config.get("bench", "max_error_rate")) for doc in session.documents) if f]
    if failures:
        raise LensError("; ".join(failures))


def _protobuf_path(output: Path | None) -> Path:
    """Where --format protobuf writes (--output's name with .pb, else results.pb here); checked before the run: the
    protobuf runtime is there (the protobuf extra) and the file can be written."""
    import importlib.util

    if importlib.util.find_spec("google.protobuf") is None:
        raise UsageError(
            "--format protobuf needs the protobuf runtime: pip install 'llm-latency-lens[protobuf]' (or drop it)"
        )
    path = output.with_suffix(".pb") if output is not None else Path("results.pb")
    if output is not None and path == output:
        raise UsageError(f"--output {output}: --format protobuf writes {path}; name the results JSON otherwise")
    if path.is_dir() or not path.parent.is_dir():
        raise UsageError(f"--format protobuf: {path} cannot be written (not a file in an existing directory)")
    existed = path.exists()
    try:  # opened for append (nothing it holds changes), and removed again when this made it
        with path.open("ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise UsageError(f"--format protobuf: {path} cannot be written ({exc.strerror or exc})") from None
    return path


def _write_protobuf(path: Path, documents: list[dict[str, Any]], measurements: list[list[dict[str, Any]]]) -> None:
    """One BenchmarkResults message per model, length-delimited (google.protobuf is imported here only)."""
    from lens_core import protobuf

    try:
        body = protobuf.delimited(
            protobuf.results_message(document, records)
            for document, records in zip(documents, measurements, strict=True)
        )
    except protobuf.ProtobufError as exc:
        raise LensError(f"--format protobuf: the results do not encode: {exc}") from None
    try:
        path.write_bytes(body)
    except OSError as exc:
        raise UsageError(f"--format protobuf: {path} cannot be written ({exc.strerror})") from None


# the flags `bench --suite` takes (engine settings, identity, probes, output): the rest come from the suite
SUITE_OVERRIDES = (
    ("model", "n_ctx"),
    ("model", "n_threads"),
    ("model", "n_batch"),
    ("model", "n_gpu_layers"),
    ("model", "flash_attn"),
    ("agent", "device_id"),
    ("agent", "data_dir"),
    ("probes", "sysfs_root"),
    ("probes", "power_source"),
    ("probes", "sample_rate_hz"),
    ("probes", "idle_baseline"),
    ("bench", "chat_template"),
    ("bench", "max_error_rate"),
)


def _bench_suite(
    suite_path: Path,
    *,
    config_path: Path | None,
    output: Path | None,
    raw: Path | None,
    as_json: bool,
    no_text: bool,
    progress: bool | None,
    store: bool,
    overrides: dict[tuple[str, str], tuple[str, object]],
) -> None:
    """``lens-agent bench --suite``: the suite's every model × workload × level, a table per workload."""
    from .bench.report import failure
    from .bench.suite_run import SuiteRequest, run_suite, suite_policy
    from .outbox import open_outbox
    from .suite import load_suite

    config = load_config(config_path, overrides=overrides)
    _check_sysfs_root(config)
    if output is not None and output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: with --suite, a directory (one results document per level), not a file")
    suite = load_suite(suite_path, suite_policy(config, suite_path.resolve().parent))
    outbox = None
    stored = [0]
    if store:
        _usable_data_dir(config)
        outbox = open_outbox(config)

    def keep(record: Any) -> None:
        if outbox is not None:
            from .clock import stamp

            outbox.append(stamp(record.to_dict()))
            stored[0] += 1

    try:
        session = run_suite(
            SuiteRequest(
                suite=suite,
                config=config,
                policy=suite_policy(config, suite_path.resolve().parent),
                output_dir=output,
                raw=raw,
                include_text=not no_text,
                progress=progress,
                store=keep if outbox is not None else None,
            ),
            status=lambda msg: click.echo(msg, err=True),
        )
    finally:
        if outbox is not None:
            outbox.close()
    if as_json:
        click.echo(json.dumps(session.documents, indent=2))
    else:
        for table in session.tables:
            click.echo(table)
            click.echo()
    for note in dict.fromkeys(session.notes):
        click.echo(f"note: {note}", err=True)
    for path in session.written:
        click.echo(f"wrote {path}", err=True)
    if outbox is not None:
        click.echo(f"stored {_count(stored[0], 'measurement')} in {outbox.path}", err=True)
    limit = config.get("bench", "max_error_rate")
    failures = [f"{_suite_where(suite, doc)}{f}" for doc in session.documents if (f := failure(doc, limit))]
    if failures:
        raise LensError("; ".join(failures))


def _suite_where(suite: Any, document: dict[str, Any]) -> str:
    """``suite.yaml: $.models[0] × $.workloads[1] (concurrency 4): `` — where a suite level's failure comes from."""
    facts = document["configuration"].get("suite") or {}
    model = next((m.json_path for m in suite.models if m.name == facts.get("model")), "$.models[?]")
    workload = next((w.json_path for w in suite.workloads if w.name == facts.get("workload")), "$.workloads[?]")
    return f"{suite.source}: {model} × {workload} ({facts.get('level')}): "


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 measurement``, ``3 measurements``."""
    from .status import plural as counted

    return counted(n, noun, plural)


def _check_sysfs_root(config: AgentConfig) -> None:
    root = Path(config.get("probes", "sysfs_root"))
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise UsageError(
            f"probes.sysfs_root {root} ({config.source('probes', 'sysfs_root')}): {what}; give / or a copied "
            "tree that stands for / (with sys/ and proc/ inside)"
        )


def _usable_data_dir(config: AgentConfig) -> Path:
    """The data directory, created if need be and checked writable: one clear line (exit 2) when it is not."""
    import tempfile

    path = Path(config.get("agent", "data_dir"))
    where = f"agent.data_dir {path} ({config.source('agent', 'data_dir')})"
    if path.exists() and not path.is_dir():
        raise UsageError(f"{where}: is a file, not a directory; choose a directory with --data-dir or agent.data_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(
            f"{where}: cannot be written ({exc.strerror}); choose a writable directory with --data-dir or "
            "agent.data_dir, or run as the user who owns it"
        ) from None
    return path


def _existing_data_dir(config: AgentConfig) -> Path:
    """The data directory of a command that only reads (or changes only what is there): it must exist already —
    nothing is created — else one clear line (exit 2)."""
    path = Path(config.get("agent", "data_dir"))
    where = f"agent.data_dir {path} ({config.source('agent', 'data_dir')})"
    if not path.exists():
        raise UsageError(
            f"{where}: does not exist: no agent has run with it (lens-agent run or bench --store creates it); "
            "check --data-dir or agent.data_dir"
        )
    if not path.is_dir():
        raise UsageError(f"{where}: is a file, not a directory; choose a directory with --data-dir or agent.data_dir")
    return path


def _sync_config(config_path: Path | None, data_dir: Path | None) -> AgentConfig:
    return load_config(
        config_path, overrides={("agent", "data_dir"): ("--data-dir", str(data_dir) if data_dir else None)}
    )


@cli.command()
@verbose_option
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Outbox directory.  [default: agent.data_dir]")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--check",
    is_flag=True,
    help="Verify the URL, TLS, the token and the device binding (an OTLP endpoint: that it answers as OTLP); "
    "upload nothing.",
)
def sync(config_path: Path | None, data_dir: Path | None, as_json: bool, check: bool) -> None:
    """Upload everything pending in the outbox now.

    Records leave the outbox only on the aggregator's acknowledgement of their batch; a captive portal, proxy or
    redirect answering instead keeps everything and is reported. Exit status 0 when everything pending was
    delivered, 1 when something was not — an attempt failed, records are still pending, or records were quarantined
    (the reason is printed) — 2 on a usage error. The device token comes from
    LENS_SYNC_TOKEN or the file named by sync.token_file.

    Without sync.url and with otlp.endpoint set (a device without an aggregator), the outbox is exported to that
    OpenTelemetry backend instead, rows leaving only on its OTLP answers (docs/opentelemetry.md).

    \b
    Example:
        lens-agent sync --config /etc/lens-agent/agent.toml --check
        LENS_SYNC_URL=https://aggregator:8443 lens-agent sync --config /etc/lens-agent/agent.toml --json
    """
    import asyncio

    from .outbox import AsyncOutbox, open_outbox, outbox_path
    from .sync import Uploader, check_endpoint, sync_settings

    config = _sync_config(config_path, data_dir)
    from lens_core import otlp_config

    standalone = otlp_config.otlp_settings(config) if not config.get("sync", "url") else None
    make: Callable[[AsyncOutbox], Uploader]
    if standalone is not None:
        from .otlp_sync import OtlpUploader, standalone_sync_settings

        if check:
            checks = asyncio.run(_check_otlp(standalone))
            _print_checks(checks, all(c["ok"] for c in checks), standalone.endpoint, as_json, "OTLP check")
            return
        sync = standalone_sync_settings(config, standalone)
        target, make = standalone.endpoint, lambda outbox: OtlpUploader(outbox, sync, standalone)
    else:
        settings = sync_settings(config)
        if check:
            checks = asyncio.run(check_endpoint(settings))
            _print_checks(
                checks, all(c["ok"] for c in checks) and len(checks) == 4, settings.url, as_json, "sync check"
            )
            return
        from .schedule import expected_gap

        # the gap the service's schedule declares, or none: a gap declared before (a shorter schedule) is replaced
        settings = dataclasses.replace(settings, expected_gap_s=expected_gap(config))
        target, make = settings.url, lambda outbox: Uploader(outbox, settings)

    box_path = outbox_path(config.get("agent", "data_dir"))
    if not box_path.is_file():  # nothing to upload; a mistyped --data-dir is never created by a sync
        raise UsageError(
            f"no outbox at {box_path} (agent.data_dir from {config.source('agent', 'data_dir')}): nothing to upload; "
            "lens-agent bench --store, lens-agent run and the service create it"
        )

    async def run() -> Any:
        outbox = AsyncOutbox(open_outbox(config))
        uploader = make(outbox)
        try:
            return await uploader.sync_now()
        finally:
            await uploader.close()
            await outbox.close()

    _print_report(asyncio.run(run()), as_json, target)


def _print_checks(checks: list[dict[str, Any]], passed: bool, url: str, as_json: bool, what: str) -> None:
    """The endpoint checks of ``sync --check``, and exit status 1 when one failed."""
    if as_json:
        click.echo(json.dumps({"ok": passed, "url": url, "checks": checks}, indent=2))
    else:
        for c in checks:
            click.echo(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['check']:<10}  {c['detail']}")
    if not passed:
        raise LensError(f"{what} failed: {next((c['detail'] for c in checks if not c['ok']), 'incomplete')}")


async def _check_otlp(settings: Any) -> list[dict[str, Any]]:
    """An empty export request per signal: the backend must answer it as OTLP (a portal or proxy does not)."""
    import aiohttp

    from lens_core import otlp

    checks = []
    ssl_context: Any = False
    if settings.endpoint.startswith("https://"):
        import ssl

        ssl_context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context)) as session:
        for signal in settings.signals:
            answer = await otlp.post_export(
                session, settings.url(signal), signal, b"", settings.headers, settings.timeout
            )
            ok = answer.outcome == "accepted"
            detail = f"{settings.url(signal)}: " + ("an OTLP answer" if ok else answer.message)
            checks.append({"check": signal, "ok": ok, "detail": detail})
    return checks


def _print_report(report: Any, as_json: bool, target: str) -> None:
    """A sync pass's report (to ``target``), and the exit status it deserves."""
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        pending = "unknown" if report.pending is None else report.pending
        click.echo(
            f"uploaded {report.uploaded} in {report.batches} batch{'es' if report.batches != 1 else ''}: "
            f"{report.accepted} accepted, {_count(report.duplicates, 'duplicate')}, {report.quarantined} quarantined; "
            f"{pending} pending"
        )
        for line in report.details:
            click.echo(f"  {line}")
    if not report.ok:
        raise LensError(f"sync failed: {report.error} (uploading to {target})")
    if not report.delivered_all:
        raise LensError(
            f"sync incomplete: {_count(report.pending or 0, 'record')} still pending (new ones stored meanwhile?)"
        )
    if report.quarantined:
        raise LensError(
            f"{report.quarantined} record{'s' if report.quarantined != 1 else ''} quarantined instead of delivered "
            "(lens-agent outbox list shows why; outbox retry or drop decides)"
        )


@cli.command()
@verbose_option
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Outbox directory.  [default: agent.data_dir]")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--probe/--no-probe", default=True, help="Check that the aggregator answers.  [default: probe]")
def status(config_path: Path | None, data_dir: Path | None, as_json: bool, probe: bool) -> None:
    """How the agent is doing: the service, its last runs, outbox backlog, drops, last sync, the aggregator.

    Exit status 0 when healthy, 1 when unhealthy (the reasons are printed), 2 on a usage error.

    \b
    Example:
        lens-agent status --json | jq .reasons
    """
    import asyncio
    import time

    from lens_core.sqlite_readonly import NotUsable

    from .clock import boot_id
    from .errors import ConfigError
    from .outbox import check_outbox_readable, open_outbox, outbox_path
    from .status import evaluate, render, service_view, state_path, status_document
    from .sync import probe_aggregator, sync_settings

    config = _sync_config(config_path, data_dir)
    data = Path(config.get("agent", "data_dir"))
    if data.exists() and not data.is_dir():
        raise UsageError(f"agent.data_dir {data} ({config.source('agent', 'data_dir')}): is a file, not a directory")
    path = outbox_path(data)
    stats = None
    state: dict[str, str | None] = {}
    salvage = None
    unreadable = None
    if path.exists():
        try:
            check_outbox_readable(path)
        except NotUsable as exc:
            unreadable = f"outbox {exc}"
    if path.exists() and unreadable is None:
        box = open_outbox(config)
        try:
            stats = box.stats()
            for key in (
                "last_attempt_us",
                "last_success_us",
                "last_success_monotonic",
                "last_success_boot_id",
                "last_error",
                "last_error_kind",
                "last_result",
            ):
                state[key] = box.get_state(key)
            salvage = box.last_salvage()
        finally:
            box.close()
    reachable = None
    url = config.get("sync", "url")
    if probe and url:
        try:
            settings = sync_settings(config)
        except ConfigError:
            settings = None
        if settings is not None:
            reachable = asyncio.run(probe_aggregator(settings))
    now_us = time.time_ns() // 1000
    service = None
    service_file = state_path(config.get("agent", "data_dir"))
    if service_file.exists():
        try:
            service = service_view(json.loads(service_file.read_text()), time.time())
        except (OSError, ValueError) as exc:
            raise LensError(f"{service_file}: unreadable service state ({exc})") from None
    health = evaluate(
        stats,
        state,
        interval_s=config.get("sync", "interval"),
        now_us=now_us,
        service=service,
        sync_configured=bool(url or config.get("otlp", "endpoint")),
        monotonic_now=time.monotonic(),
        current_boot=boot_id(),
    )
    if not data.is_dir():
        health.fail(
            f"the data directory {data} ({config.source('agent', 'data_dir')}) does not exist: no agent has run with "
            "it (lens-agent run or bench --store creates it); check --data-dir or agent.data_dir"
        )
    elif not path.exists() and not service_file.exists():
        health.fail(
            f"the data directory {data} ({config.source('agent', 'data_dir')}) holds neither an outbox nor service "
            "state: no agent has run with it (lens-agent run or bench --store fills it); check --data-dir or "
            "agent.data_dir"
        )
    if unreadable is not None:
        health.fail(unreadable)
    doc = status_document(
        outbox_file=path,
        stats=stats,
        state=state,
        health=health,
        reachable=reachable,
        aggregator_url=url,
        last_salvage=salvage,
        now_us=now_us,
        service=service,
    )
    if unreadable is not None:
        doc["outbox_unreadable"] = f"not read: {unreadable}"
    from .adjuster import tune_summary

    doc["tune"] = tune_summary(Path(config.get("agent", "data_dir")), config.drop_in_refused)
    from .campaigns import status_summary

    doc["campaigns"] = status_summary(Path(config.get("agent", "data_dir")))
    click.echo(json.dumps(doc, indent=2) if as_json else render(doc))
    if not health.healthy:
        sys.exit(1)


@cli.command()
@verbose_option
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--sysfs-root", type=click.Path(path_type=Path), help="Read sensors under DIR instead of /.")
@click.option("--power-source", help="auto, none, or sources to try (comma-separated).  [default: auto]")
@click.option("--samples", type=click.IntRange(0, 1000), default=5, show_default=True, help="Live power samples.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def probe(
    config_path: Path | None, sysfs_root: Path | None, power_source: str | None, samples: int, as_json: bool
) -> None:
    """Show what this device is and which power and memory figures the agent can read, and why not the others.

    The first thing to run on a new device. --sysfs-root reads a copied tree (DIR stands for /).

    \b
    Example:
        lens-agent probe
        lens-agent probe --json --samples 20 | jq .power
    """
    from .probes.report import probe_document, render_probe

    config = load_config(
        config_path,
        overrides={
            ("probes", "sysfs_root"): ("--sysfs-root", str(sysfs_root) if sysfs_root else None),
            ("probes", "power_source"): ("--power-source", power_source),
        },
    )
    _check_sysfs_root(config)
    doc = probe_document(config, samples=samples)
    click.echo(json.dumps(doc, indent=2) if as_json else render_probe(doc))


@cli.command()
@verbose_option
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Outbox and state.  [default: agent.data_dir]")
@click.option("--model", type=click.Path(path_type=Path), help="GGUF model.  [default: model.path, else SmolLM2]")
@click.option("--once", is_flag=True, help="Run every workload once now, sync, and exit.")
def run(config_path: Path | None, data_dir: Path | None, model: Path | None, once: bool) -> None:
    """Run as a service: scheduled workloads, the outbox, sync, housekeeping, systemd notify.

    Workloads come from [[workloads]] in the config (default: 3 requests every 15 minutes). SIGTERM stops it
    cleanly (the request in flight finishes and is stored, a last sync is tried); SIGHUP reloads the config.
    With --once it prints one line per workload and exits 1 when one failed (an error, or no request succeeded).

    \b
    Example:
        lens-agent run --config /etc/lens-agent/agent.toml
        lens-agent run --config configs/demo.toml --once
    """
    import asyncio

    from .service import AgentService

    service = AgentService(
        config_path,
        {
            ("agent", "data_dir"): ("--data-dir", str(data_dir) if data_dir else None),
            ("model", "path"): ("--model", str(model) if model else None),
        },
        once=once,
    )
    _usable_data_dir(service.config)
    _check_sysfs_root(service.config)
    code = asyncio.run(service.run())
    if once:
        failed = False
        for workload in service.config.workloads:
            line, ok = _run_line(workload["name"], service.runs.get(workload["name"]))
            click.echo(line)
            for note in (service.runs.get(workload["name"]) or {}).get("notes") or ():
                click.echo(f"  note: {note}")
            failed = failed or not ok
        if failed and code == 0:
            code = 1
    sys.exit(code)


def _run_line(name: str, run: dict[str, Any] | None) -> tuple[str, bool]:
    """One line per workload after ``run --once``, and whether it counts as a success."""
    if run is None:
        return f"{name}: did not run (stopped first)", False
    if run.get("error"):
        return f"{name}: FAILED: {run['error']}", False
    if run.get("skipped"):
        return f"{name}: skipped: {run['skipped']}", True
    requests, errors = int(run.get("requests") or 0), int(run.get("errors") or 0)
    ok = requests > 0 and errors < requests
    ttft = run.get("ttft_p50_ms")
    rate = run.get("tokens_per_second")
    figures = ""
    if ttft is not None:
        figures += f", TTFT p50 {ttft:.1f} ms"
    if rate is not None:
        figures += f", {rate:.1f} tok/s"
    from .status import _contended

    figures += _contended(run)  # docs/interference.md: ", 2 of 2 contended (cpu ×2)"
    blocked = int(run.get("blocked") or 0)
    served = requests - errors - blocked
    if blocked and served:  # by the workload's guardrails (docs/guardrails.md): neither a success nor an error
        figures += f", {blocked} blocked by guardrails"
    if errors:
        from .bench.report import errors_line

        figures += f"; errors: {errors_line(run.get('errors_by_type') or {'unknown': errors})}"
    verdict = "ok" if ok else "FAILED"
    if blocked and not served:  # "0/3 requests ok" would read as a failure: the guardrails did their work
        counts = f"{_count(requests, 'request')}: {blocked} blocked by guardrails, 0 served"
        return f"{name}: {verdict}: {counts}{figures}", ok
    return f"{name}: {verdict}: {served}/{_count(requests, 'request')} ok{figures}", ok


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors; exit 2 for bad input, 1 for failures."""
    try:
        run_click(cli, "lens-agent", argv)
    finally:  # the command's log handler goes with it (matters when main runs more than once in one process)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
            root.removeHandler(handler)
