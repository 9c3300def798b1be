"""Run a benchmark suite (the seed's §2.3 document, :mod:`agent.suite`): every model × workload × load level.

Each level gives one results document (the seed's results schema, ``concurrency_levels`` as run) and one row of
the workload's comparison table. An endpoint is loaded by :mod:`agent.loadgen` — closed loop at each concurrency
level, open loop at each request rate — and a local GGUF runs through the lens's own timed llama.cpp loop, one
request at a time: llama.cpp on the device serves one request at a time, so a level that asks for more runs at
concurrency 1 and the run says so (``notes``, the document's ``configuration.suite.note``, the table).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from lens_core.suite import rate_text

from ..config import AgentConfig
from ..device import device_info
from ..engines.cloud import (
    MAX_ANSWER_MIN_BYTES,
    AnswerTooLarge,
    CloudClient,
    CloudSettings,
    check_served_model,
    clean_text,
    read_bounded,
    redirect_message,
)
from ..engines.llama import EngineSettings, LlamaEngine
from ..errors import RequestError, UsageError
from ..loadgen import Level, LevelRun, run_level, saturation
from ..measurement import Measurement
from ..memory import ProcessMemory
from ..probes.interference import (
    InterferenceMonitor,
    ThreadChoice,
    choose_threads,
    monitor_from_config,
    thread_source,
)
from ..probes.power import detect_power
from ..probes.sampler import PowerSampler
from ..probes.sysfs import Root
from ..prompts import Prompt
from ..suite import Suite, SuiteModel, SuitePolicy, SuiteWorkload, read_credentials, workload_prompts
from .report import _fmt, results_document
from .runner import BenchOptions, ModelRun, new_record, prepare_text, run_bench
from .session import _device_facts, _open_for_writing

RAN_LOCAL = "concurrency 1"  # how a local model runs every level: one request at a time, closed loop
DEFAULT_REQUESTS = 32  # measured requests per level when the workload gives neither requests nor a duration
PROMPTS_PER_WORKLOAD = 64  # distinct prompts made per model × workload (requests cycle through them)


def suite_policy(config: AgentConfig, suite_dir: Path | None = None) -> SuitePolicy:
    """What a suite may ask of this device: the ``[suite]`` table, the data directory's ``datasets/`` and
    ``credentials/``, and — for a suite file the operator gave (``suite_dir``) — the suite's own directory."""
    s = config.values["suite"]
    data_dir = Path(config.get("agent", "data_dir"))
    own = (suite_dir,) if suite_dir is not None else ()
    model_path = config.get("model", "path")
    models = [*s["model_dirs"], *own]
    if model_path is not None:
        models.append(Path(model_path).parent)
    return SuitePolicy(
        dataset_dirs=(*s["dataset_dirs"], data_dir / "datasets", *own),
        credentials_dirs=(*s["credentials_dirs"], data_dir / "credentials", *own),
        model_dirs=tuple(models),
        max_concurrency=s["max_concurrency"],
        max_rate=s["max_rate"],
        max_duration_s=int(s["max_duration"]),
        max_requests=s["max_requests"],
        max_output_tokens=s["max_output_tokens"],
        default_model=Path(model_path) if model_path is not None else None,
    )


@dataclass
class SuiteRequest:
    suite: Suite
    config: AgentConfig
    policy: SuitePolicy
    output_dir: Path | None = None  # one results document per model × workload × level
    raw: Path | None = None  # one JSON line per request
    include_text: bool = True
    progress: bool | None = None
    store: Callable[[Measurement], None] | None = None  # durable storage, called as each request finishes
    should_stop: Callable[[], bool] | None = None
    engine: LlamaEngine | None = None  # a loaded engine reused for a local model of the same file and settings
    extra_ext: dict[str, Any] = field(default_factory=dict)  # added to every record's ext (workload, campaign)
    # (model, workload, level label) → True: that level is not run (a campaign's levels already done)
    skip: Callable[[str, str, str], bool] | None = None
    # called with (model, workload, level label, results document) as each level completes — not for a level the
    # run was stopped in (should_stop)
    on_level_done: Callable[[str, str, str, dict[str, Any]], None] | None = None


@dataclass
class SuiteSession:
    run_id: str
    documents: list[dict[str, Any]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    measured: list[Measurement] = field(default_factory=list)
    stopped: bool = False


def levels_of(workload: SuiteWorkload, max_duration_s: float | None = None) -> list[Level]:
    """The workload's load levels: closed loop at each concurrency, then open loop at each rate. Each level's
    duration is the workload's ``duration_seconds`` held to ``max_duration_s`` (the ``[suite] max_duration``):
    sending stops there whether or not the suite gives a duration (the level's label does not change)."""
    requests = workload.requests if workload.requests is not None or workload.duration_s else DEFAULT_REQUESTS
    durations = [d for d in (workload.duration_s, max_duration_s) if d is not None]
    duration = min(durations) if durations else None
    common = {"duration_s": duration, "requests": requests, "seed": workload.seed}
    out = [Level(mode="closed", concurrency=c, **common) for c in workload.concurrency]  # type: ignore[arg-type]
    out += [
        Level(mode="open", rate=r, arrival=workload.arrival, max_concurrency=workload.max_concurrency, **common)  # type: ignore[arg-type]
        for r in workload.rates
    ]
    return out or [Level(mode="closed", concurrency=1, **common)]  # type: ignore[arg-type]


def _slug(text: str) -> str:
    """A file-name part: runs of other characters as ``-``, no leading or trailing dots or dashes (a name of only
    dots is not ``..``), at most 60 characters; ``x`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60].strip("-.") or "x"


def output_name(suite: Suite, model: SuiteModel, workload: SuiteWorkload, level: Level, taken: set[str]) -> str:
    """The file name of a level's results document in ``--output``: ``<suite>-<model>-<workload>-<level>.json``
    slugged, with ``-2``, ``-3`` … when two levels of the run slug to the same name (models ``a/b`` and ``a:b``):
    a run never overwrites its own documents. ``taken`` (lower-cased names) is updated."""
    stem = "-".join(_slug(x) for x in (suite.name, model.name, workload.name, _level_slug(level)))
    name, n = f"{stem}.json", 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}-{n}.json"
    taken.add(name.lower())
    return name


def run_suite(request: SuiteRequest, status: Callable[[str], None] = lambda _: None) -> SuiteSession:
    suite, config = request.suite, request.config
    session = SuiteSession(run_id=str(uuid.uuid4()))
    device = device_info()
    root = Root(config.get("probes", "sysfs_root"))
    device.update(_device_facts(root))
    raw_file = _open_for_writing(request.raw, "--raw file") if request.raw else None
    by_workload: dict[str, list[tuple[SuiteModel, Level, LevelRun | None, dict[str, Any]]]] = {
        w.name: [] for w in suite.workloads
    }

    def finished(record: Measurement) -> None:
        record.ext.update(request.extra_ext)
        if request.store is not None:
            request.store(record)
        if raw_file is not None:
            raw_file.write(json.dumps(record.to_dict(include_text=request.include_text)) + "\n")
            raw_file.flush()

    def stopping() -> bool:
        return request.should_stop is not None and request.should_stop()

    max_duration = request.policy.max_duration_s
    taken: set[str] = set()

    def skipped(model: SuiteModel, workload: SuiteWorkload, level: Level) -> bool:
        return request.skip is not None and request.skip(model.name, workload.name, level.label)

    try:
        for model in suite.models:
            if stopping():
                session.stopped = True
                break
            if all(skipped(model, w, level) for w in suite.workloads for level in levels_of(w, max_duration)):
                continue
            runner = _LocalModel if model.kind == "local" else _EndpointModel
            with runner.open(model, request, status) as target:
                target.status = status
                for workload in suite.workloads:
                    if stopping():
                        session.stopped = True
                        break
                    levels = [lv for lv in levels_of(workload, max_duration) if not skipped(model, workload, lv)]
                    if not levels:
                        continue
                    for level, run, document in target.run_workload(
                        workload, session, finished, device, stopping, levels
                    ):
                        by_workload[workload.name].append((model, level, run, document))
                        session.documents.append(document)
                        if request.on_level_done is not None and not stopping():
                            request.on_level_done(model.name, workload.name, level.label, document)
                        if request.output_dir is not None:
                            path = request.output_dir / output_name(suite, model, workload, level, taken)
                            with _open_for_writing(path, "--output file") as handle:
                                json.dump(document, handle, indent=2)
                                handle.write("\n")
                            session.written.append(path)
    finally:
        if raw_file is not None:
            raw_file.close()
    if request.raw:
        session.written.append(request.raw)
    for workload in suite.workloads:
        if by_workload[workload.name]:
            session.tables.append(workload_table(workload, by_workload[workload.name]))
    return session


def _level_slug(level: Level) -> str:
    if level.mode == "closed":
        return f"c{level.concurrency}"
    return f"r{rate_text(level.rate)}-{level.arrival}"


class _Target:
    """One model of the suite, open for the length of its workloads."""

    model: SuiteModel
    request: SuiteRequest
    warmed: bool = False
    status: Callable[[str], None] = staticmethod(lambda _: None)

    def run_workload(
        self,
        workload: SuiteWorkload,
        session: SuiteSession,
        finished: Callable[[Measurement], None],
        device: dict[str, Any],
        stopping: Callable[[], bool],
        levels: list[Level] | None = None,
    ) -> Iterator[tuple[Level, LevelRun | None, dict[str, Any]]]:
        raise NotImplementedError

    def _record(self, prompt: Prompt, index: int, warmup: bool, workload: SuiteWorkload, level: Level) -> Measurement:
        record = new_record(
            self._engine(),
            prompt,
            run_id=self._run_id,
            device_id=self.request.config.get("agent", "device_id"),
            prompt_index=index,
            warmup=warmup,
            include_text=self.request.include_text,
            model_name=self.model.name,
        )
        suite = self.request.suite
        record.ext["suite"] = {
            "name": suite.name,
            "version": suite.version,
            "sha256": suite.sha256,
            "model": self.model.name,
            "workload": workload.name,
            "level": level.label,
        }
        record.ext["workload"] = workload.name
        return record

    def _record_at(
        self, prompts: list[Prompt], warmup: bool, workload: SuiteWorkload, level: Level, index: int
    ) -> Measurement:
        return self._record(prompts[index], index, warmup, workload, level)

    def _engine(self) -> LlamaEngine | None:
        return None

    _run_id: str = ""


def _document_extras(
    document: dict[str, Any],
    suite: Suite,
    model: SuiteModel,
    workload: SuiteWorkload,
    level: Level,
    run: LevelRun | None,
    concurrency_run: int,
    note: str | None,
    prompt_note: str,
) -> None:
    """The suite's own facts on a results document: which suite, workload and level, the load as run."""
    params = document["configuration"]["test_parameters"]
    params["concurrency_levels"] = [concurrency_run]
    load: dict[str, Any] = {"mode": level.mode, "label": level.label}
    if level.mode == "open":
        load.update(offered_rate_rps=level.rate, arrival=level.arrival, max_concurrency=level.max_concurrency)
    else:
        load["concurrency"] = level.concurrency
    load.update(duration_s=level.duration_s, requests=level.requests)
    params["load"] = load
    params["input_token_range"] = list(workload.input_tokens) if workload.input_tokens else None
    params["output_token_target"] = workload.output_tokens
    document["configuration"]["suite"] = {
        "name": suite.name,
        "description": suite.description,
        "version": suite.version,
        "source": suite.source,
        "sha256": suite.sha256,
        "model": model.name,
        "endpoint": model.endpoint if model.kind == "local" else model.url,
        "api_type": model.api_type,
        "workload": workload.name,
        "dataset": workload.dataset_ref,
        "prompts": prompt_note,
        "level": level.label,
        "note": note,
    }
    if run is not None:
        document["results"]["load"] = {
            "offered_rate_rps": run.offered_rate,
            "sent_rate_rps": run.sent_rate,
            "achieved_rate_rps": run.achieved_rate,
            "throughput_tokens_per_second": run.throughput_tps,
            "peak_in_flight": run.peak_in_flight,
            "wall_seconds": run.wall_s,
            "latency_slope_ms_per_s": run.latency_slope,
            "saturated": run.saturated,
            "saturation_reason": run.saturation_reason,
            "errors_by_type": run.errors_by_type,
        }


class _LocalModel(_Target):
    """A GGUF file on the device, through the lens's timed llama.cpp loop (one request at a time)."""

    def __init__(self, model: SuiteModel, request: SuiteRequest, engine: LlamaEngine, owned: bool) -> None:
        self.model, self.request, self.engine, self.owned = model, request, engine, owned
        self._run_id = str(uuid.uuid4())
        probes = request.config.values["probes"]
        self.root = Root(probes["sysfs_root"])
        self.sources, self.unavailable = detect_power(self.root, probes["power_source"])
        self.threads: ThreadChoice | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, model: SuiteModel, request: SuiteRequest, status: Callable[[str], None]) -> Iterator[_LocalModel]:
        assert model.path is not None
        settings = replace(EngineSettings.from_config(request.config), **model.settings)  # type: ignore[arg-type]
        reuse = request.engine
        # the suite's own settings are configuration; a default count is chosen like bench's (docs/interference.md)
        # unless the service hands in the engine it loaded at start
        origin = request.config.source("model", "n_threads")
        threads = ThreadChoice(settings.n_threads, "config" if "n_threads" in model.settings else thread_source(origin))
        if threads.source == "default" and reuse is None:
            threads = choose_threads(
                settings.n_threads,
                "default",
                Root(request.config.get("probes", "sysfs_root")),
                physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
            )
            status(threads.line)
            settings = replace(settings, n_threads=threads.n_threads)
        if (
            reuse is not None
            and reuse.info is not None
            and Path(reuse.info.path).resolve() == model.path.resolve()
            and reuse.settings == settings
        ):
            engine, owned = reuse, False
        else:
            status(f"loading {model.path} …")
            engine, owned = LlamaEngine.load(model.path, settings), True
        target = cls(model, request, engine, owned)
        target.threads = threads
        try:
            yield target
        finally:
            for source in target.sources:
                source.close()
            if owned:
                engine.close()

    def _engine(self) -> LlamaEngine | None:
        return self.engine

    def _tokenizer(self) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
        engine = self.engine

        def detokenize(ids: list[int]) -> str:
            return bytes(engine.llm.detokenize(ids)).decode("utf-8", errors="ignore")

        return (lambda text: engine.tokenize(text, add_bos=False)), detokenize

    def run_workload(
        self,
        workload: SuiteWorkload,
        session: SuiteSession,
        finished: Callable[[Measurement], None],
        device: dict[str, Any],
        stopping: Callable[[], bool],
        levels: list[Level] | None = None,
    ) -> Iterator[tuple[Level, LevelRun | None, dict[str, Any]]]:
        tokenize, detokenize = self._tokenizer()
        prompts, prompt_note = workload_prompts(
            workload, PROMPTS_PER_WORKLOAD, tokenize, detokenize, source=self.request.suite.source
        )
        template = self._template_tokens(prompts)
        probes = self.request.config.values["probes"]
        for level in levels if levels is not None else levels_of(workload):
            if stopping():
                session.stopped = True
                return
            self.status(f"{self.model.name} · {workload.name} · {level.label} …")
            note = None
            asked = None
            if level.mode == "open" or (level.concurrency or 1) > 1:
                asked = level.label
                note = (
                    f"{self.model.name} is a local llama.cpp model: it serves one request at a time, so "
                    f"'{level.label}' ran as concurrency 1 (closed loop)"
                )
                session.notes.append(f"{workload.name}: {note}")
            warmup = 0 if self.warmed else workload.warmup
            self.warmed = True
            runs = level.requests if level.requests is not None else self.request.policy.max_requests
            options = BenchOptions(
                runs=runs,
                warmup=warmup,
                max_tokens=workload.output_tokens,
                ignore_eos=True,
                chat_template=self.request.config.get("bench", "chat_template"),
                include_text=self.request.include_text,
            )
            sampler = PowerSampler(self.sources, rate_hz=probes["sample_rate_hz"])
            settings = self.engine.settings
            monitor = monitor_from_config(
                self.request.config.values,
                needed_cores=settings.n_threads if settings is not None else 1,
                uses_gpu=settings is not None and settings.n_gpu_layers != 0,
            )
            sampler.start()
            if monitor is not None:
                monitor.start()
            # the level's duration counts from its first measured request (after the warm-up)
            clock: dict[str, float] = {}

            def make(
                prompt: Prompt,
                index: int,
                warm: bool,
                _level: Level = level,
                _clock: dict[str, float] = clock,
                _asked: str | None = asked,
            ) -> Measurement:
                if not warm and "deadline" not in _clock and _level.duration_s:
                    _clock["deadline"] = time.monotonic() + _level.duration_s
                record = self._record(prompt, index, warm, workload, _level)
                # what ran (one request at a time), and what the level asked for when that differs
                record.ext["load"] = {"mode": "closed", "concurrency": 1, "level": RAN_LOCAL}
                if _asked is not None:
                    record.ext["load"]["asked"] = _asked
                return record

            def should_stop(_clock: dict[str, float] = clock) -> bool:
                return stopping() or time.monotonic() >= _clock.get("deadline", math.inf)

            try:
                run = run_bench(
                    self.engine,
                    prompts,
                    options,
                    run_id=self._run_id,
                    device_id=self.request.config.get("agent", "device_id"),
                    memory=ProcessMemory(),
                    on_result=finished,
                    sampler=sampler,
                    should_stop=should_stop,
                    model_name=self.model.name,
                    make_record=make,
                    interference=monitor,
                )
            finally:
                sampler.stop()
                if monitor is not None:
                    monitor.stop()
            session.measured.extend(run.measured)
            document = results_document(
                run,
                run_id=session.run_id,
                device=device,
                options=options,
                prompt_source=prompt_note,
                sampler=sampler,
                power_unavailable=self.unavailable,
                power_source=probes["power_source"],
                interference=monitor,
                threads=self.threads,
            )
            _document_extras(document, self.request.suite, self.model, workload, level, None, 1, note, prompt_note)
            document["configuration"]["suite"]["template_tokens"] = template
            if asked is not None:
                document["configuration"]["test_parameters"]["load"]["ran"] = RAN_LOCAL
            yield level, None, document

    def _template_tokens(self, prompts: list[Prompt]) -> dict[str, Any]:
        """What the model receives beyond each prompt's text: the tokens the chat template (and BOS) add, min and
        max over the workload's distinct prompts. ``input_token_range`` counts the prompt text alone; a record's
        ``input_tokens`` is the text the model received, template included."""
        mode = self.request.config.get("bench", "chat_template")
        added: list[int] = []
        for prompt in {p.text: p for p in prompts}.values():
            sent, _ = prepare_text(self.engine, prompt, mode)
            added.append(len(self.engine.tokenize(sent)) - len(self.engine.tokenize(prompt.text, add_bos=False)))
        used = any(prepare_text(self.engine, p, mode)[1] for p in prompts[:1])
        return {"chat_template": used, "min": min(added), "max": max(added)} if added else {"chat_template": used}


class _EndpointModel(_Target):
    """An OpenAI-compatible endpoint, loaded by :mod:`agent.loadgen` at each level."""

    def __init__(self, model: SuiteModel, request: SuiteRequest, client: CloudClient, loop: asyncio.AbstractEventLoop):
        self.model, self.request, self.client, self.loop = model, request, client, loop
        self._run_id = str(uuid.uuid4())
        self.chat = False
        self.served = model.served_model or ""
        self.rtt_ms: float | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, model: SuiteModel, request: SuiteRequest, status: Callable[[str], None]) -> Iterator[_EndpointModel]:
        assert model.url is not None
        key = read_credentials(model, request.policy, request.suite.source)
        timeout = float(request.config.get("cloud", "timeout"))
        settings = CloudSettings(
            url=model.url.rstrip("/"),
            model=model.served_model,
            api_key=key,
            api_key_header="X-API-Key" if model.auth_type == "api_key" else None,
            timeout=timeout,
            api=model.api,
            api_reason=f"suite {request.suite.source}: api {model.api}",
        )
        loop = asyncio.new_event_loop()
        client = CloudClient(settings)
        target = cls(model, request, client, loop)
        try:
            status(f"connecting to {model.url} …")
            target._prepare()
            yield target
        finally:
            loop.run_until_complete(client.close())
            loop.close()

    def _prepare(self) -> None:
        run = self.loop.run_until_complete
        if not self.model.served_model:
            self.served = run(self._listed_model())
        if self.model.api == "auto":
            self.chat, _ = run(self.client.choose_api(self.served))
        else:
            self.chat = self.model.api == "chat"
        self.rtt_ms = run(self.client.rtt_ms())

    async def _listed_model(self) -> str:
        """The first model the endpoint lists (GET /models, checked: 1–256 printable characters), or a UsageError
        saying what it answered instead. A redirect is not followed."""
        assert self.model.url is not None
        where = self._where()
        try:
            session = await self.client.session()
            async with session.get(
                self.model.url.rstrip("/") + "/models", headers=self.client._headers(), allow_redirects=False
            ) as answer:
                status = answer.status
                if 300 <= status < 400:
                    raise UsageError(f"{where}: redirect: {redirect_message(answer, 'GET /models')}")
                raw = await read_bounded(answer, MAX_ANSWER_MIN_BYTES) if status == 200 else b""
            data = json.loads(raw) if raw else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            message = clean_text(str(exc), 200)
            raise UsageError(f"{where}: GET /models failed ({type(exc).__name__}: {message})") from None
        except AnswerTooLarge:
            raise UsageError(f"{where}: GET /models answered more than {MAX_ANSWER_MIN_BYTES} bytes") from None
        if status in (401, 403):
            raise self._refused("GET /models", status)
        try:
            listed = data["data"][0]["id"]  # type: ignore[index]
        except (TypeError, KeyError, IndexError):
            raise UsageError(
                f"{where}: GET /models answered HTTP {status} without a model list; name the model with the "
                'model\'s "model" field'
            ) from None
        try:
            return check_served_model(listed)
        except RequestError as exc:
            raise UsageError(f"{where}: {exc.message}") from None

    def _refused(self, what: str, status: int) -> UsageError:
        """The endpoint refused the suite's credentials (HTTP 401/403): which file, or that none was sent."""
        path = self.model.credentials_path
        whose = f"the credentials in {path}" if path else "a request without credentials"
        return UsageError(f"{self._where()}: {what} answered HTTP {status}: the endpoint refuses {whose}")

    def _where(self) -> str:
        return f"{self.request.suite.source}: {self.model.json_path}.endpoint ({self.model.name!r}): {self.model.url}"

    def _tokenizer(self) -> tuple[Callable[[str], list[int]] | None, Callable[[list[int]], str] | None]:
        run = self.loop.run_until_complete
        try:
            run(self.client.tokenize("hello", False))
        except RequestError as exc:
            if exc.error_type in ("http_401", "http_403"):
                raise self._refused("/tokenize", int(exc.error_type[5:])) from None
            return None, None  # no /tokenize (404, not JSON, …): prompts cannot be fitted to token counts
        return (lambda text: run(self.client.tokenize(text, False))), (lambda ids: run(self.client.detokenize(ids)))

    def run_workload(
        self,
        workload: SuiteWorkload,
        session: SuiteSession,
        finished: Callable[[Measurement], None],
        device: dict[str, Any],
        stopping: Callable[[], bool],
        levels: list[Level] | None = None,
    ) -> Iterator[tuple[Level, LevelRun | None, dict[str, Any]]]:
        tokenize, detokenize = self._tokenizer() if workload.input_tokens else (None, None)
        prompts, prompt_note = workload_prompts(
            workload, PROMPTS_PER_WORKLOAD, tokenize, detokenize, source=self.request.suite.source
        )
        sent = [(p, [{"role": "user", "content": p.text}] if self.chat else p.text) for p in prompts]
        ignore_eos = self.model.api_type in ("vllm", "custom")
        extra = {"ignore_eos": True} if ignore_eos else None
        runs: list[LevelRun] = []
        results: list[tuple[Level, LevelRun, list[Measurement]]] = []
        # a client's requests overlap: each record's figures come from the monitor's stream over its own window
        monitor = monitor_from_config(self.request.config.values, needed_cores=1, uses_gpu=False)

        def noted(record: Measurement) -> None:
            if monitor is not None:
                end = time.perf_counter_ns()
                record.ext["interference"] = monitor.verdict(
                    monitor.window(end - int((record.e2e_ms or 0.0) * 1e6), end)
                )
            finished(record)

        if monitor is not None:
            monitor.start()
        try:
            self._levels(workload, session, noted, stopping, levels, sent, prompts, extra, runs, results)
        finally:
            if monitor is not None:
                monitor.stop()
        yield from self._documents(workload, session, device, runs, results, prompt_note, ignore_eos, monitor)

    def _levels(
        self,
        workload: SuiteWorkload,
        session: SuiteSession,
        finished: Callable[[Measurement], None],
        stopping: Callable[[], bool],
        levels: list[Level] | None,
        sent: list[Any],
        prompts: list[Prompt],
        extra: dict[str, Any] | None,
        runs: list[LevelRun],
        results: list[tuple[Level, LevelRun, list[Measurement]]],
    ) -> None:
        for level in levels if levels is not None else levels_of(workload):
            if stopping():
                session.stopped = True
                break
            self.status(f"{self.model.name} · {workload.name} · {level.label} …")

            def load(shape: Level, warmup: bool, _level: Level = level) -> LevelRun:
                return self.loop.run_until_complete(
                    run_level(
                        self.client,
                        shape,
                        sent,
                        max_tokens=workload.output_tokens,
                        new_record=functools.partial(self._record_at, prompts, warmup, workload, _level),
                        on_result=finished,
                        should_stop=stopping,
                        extra=extra,
                        rtt_ms=self.rtt_ms,
                    )
                )

            warmups: list[Measurement] = []
            if not self.warmed and workload.warmup:
                warm_level = Level(mode="closed", concurrency=1, requests=workload.warmup, seed=workload.seed)
                warmups = load(warm_level, True).measurements
            self.warmed = True
            run = load(level, False)
            runs.append(run)
            results.append((level, run, warmups))
            session.measured.extend(run.measurements)

    def _documents(
        self,
        workload: SuiteWorkload,
        session: SuiteSession,
        device: dict[str, Any],
        runs: list[LevelRun],
        results: list[tuple[Level, LevelRun, list[Measurement]]],
        prompt_note: str,
        ignore_eos: bool,
        monitor: InterferenceMonitor | None,
    ) -> Iterator[tuple[Level, LevelRun | None, dict[str, Any]]]:
        index, reason = saturation(runs) if runs else (None, "")
        for n, (level, run, warmups) in enumerate(results):
            model_run = ModelRun(
                engine=None,
                measurements=[*warmups, *run.measurements],
                measured_wall_s=run.wall_s,
                strategy="cloud",
            )
            options = BenchOptions(
                runs=len(run.measurements),
                warmup=len(warmups),
                max_tokens=workload.output_tokens,
                ignore_eos=ignore_eos,
                include_text=self.request.include_text,
            )
            document = results_document(
                model_run,
                run_id=session.run_id,
                device=device,
                options=options,
                prompt_source=prompt_note,
                cloud={
                    "url": self.model.url,
                    "model": self.served,
                    "api": "chat" if self.chat else "completions",
                    "api_type": self.model.api_type,
                    "auth": self.model.auth_type,
                    "rtt_ms": self.rtt_ms,
                },
                interference=monitor,
            )
            document["configuration"]["model"]["name"] = self.model.name
            document["configuration"]["model"]["served_model"] = self.served
            concurrency = level.concurrency if level.mode == "closed" else run.peak_in_flight
            _document_extras(
                document, self.request.suite, self.model, workload, level, run, concurrency or 1, None, prompt_note
            )
            document["results"]["load"]["saturation_level"] = results[index][0].label if index is not None else None
            document["results"]["load"]["saturation"] = reason
            document["results"]["load"]["this_level_saturates"] = index == n
            yield level, run, document


def _row_label(level: Level, run: LevelRun | None) -> str:
    """A table row's level: its label, with ``(ran 1)`` when a local model (no LevelRun) ran a level that asked for
    more than one request at a time or for a rate."""
    if run is None and (level.mode == "open" or (level.concurrency or 1) > 1):
        return f"{level.label} (ran 1)"
    return level.label


def workload_table(
    workload: SuiteWorkload, rows: list[tuple[SuiteModel, Level, LevelRun | None, dict[str, Any]]]
) -> str:
    """The workload's comparison: one row per model × level (ms unless noted). The level column is as wide as its
    longest label, never cut: two levels' rows always tell them apart."""
    labels = [_row_label(level, run) for _, level, run, _ in rows]
    width = max([22, *(len(label) + 2 for label in labels)])
    header = (
        f"{'model':<18}{'level':<{width}}{'n':>5}{'err':>5}{'TTFT p50':>10}{'TTFT p95':>10}{'TPOT p50':>10}"
        f"{'e2e p95':>10}{'offered':>9}{'sent':>9}{'achieved':>9}{'tok/s':>8}"
    )
    lines = [f"workload {workload.name} (ms unless noted; rates in req/s)", header]
    saturations: dict[str, str] = {}
    asked_only = False
    for (model, level, run, doc), label in zip(rows, labels, strict=True):
        res = doc["results"]
        lat = res["latency_metrics"]

        def p(metric: str, q: str, _lat: dict[str, Any] = lat) -> str:
            dist = _lat.get(metric)
            return _fmt(dist[q] if dist else None, 1)

        load = res.get("load") or {}
        offered = load.get("offered_rate_rps")
        achieved = load.get("achieved_rate_rps", res["throughput_metrics"]["requests_per_second"])
        offered_text = _fmt(offered, 1)
        if run is None and level.rate is not None:  # a local model: the asked rate, marked
            offered_text, asked_only = f"{_fmt(level.rate, 1)}*", True
        lines.append(
            f"{model.name[:17]:<18}{label:<{width}}{res['requests']['measured']:>5}"
            f"{res['error_metrics']['total_errors']:>5}{p('time_to_first_token', 'p50_ms'):>10}"
            f"{p('time_to_first_token', 'p95_ms'):>10}{p('time_per_output_token', 'p50_ms'):>10}"
            f"{p('end_to_end_latency', 'p95_ms'):>10}{offered_text:>9}{_fmt(load.get('sent_rate_rps'), 2):>9}"
            f"{_fmt(achieved, 2):>9}"
            f"{res['throughput_metrics']['tokens_per_second']:>8.1f}"
        )
        if load.get("saturation"):
            at = load.get("saturation_level")
            saturations[model.name] = f"saturates at {at}: {load['saturation']}" if at else load["saturation"]
    for name, reason in saturations.items():
        lines.append(f"{name}: {reason}")
    if asked_only:
        lines.append("* the rate the level asked for; (ran 1): a local model ran it one request at a time")
    return "\n".join(lines)
