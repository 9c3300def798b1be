"""The ``http`` guardrail kind: a guardrail service reached over HTTP, timed with server and network time apart.

Two documented request/response shapes (``api``):

- ``nemo``: NeMo Guardrails' checks endpoint with an OpenAI-style body ``{"model"?, "messages": [{"role": "user",
  "content": …}] (+ {"role": "assistant", …} for output), "guardrails": {"config_id": …}?}``. Two flavours
  (``nemo_api``): ``microservice`` (the NeMo Guardrails microservice, ``POST {url}/v1/guardrail/checks``) answers
  ``{"status": "success"|"blocked", "rails_status": {"<rail>": {"status": "success"|"blocked"}}, …}``: a blocked
  answer is one violation per blocked rail (severity high, risk 1). ``server`` (the open-source ``nemoguardrails
  server``, ``POST {url}/v1/checks``, body also ``guardrails.rail_types`` and a required ``model``) answers
  ``{"status": "passed"|"modified"|"blocked", "content", "rail"?}``: blocked is one violation (high, risk 1),
  modified one of severity medium (risk 0.5: a rail rewrote the text, e.g. masked what it found).
- ``llm-guard``: LLM Guard's API, ``POST {url}/analyze/prompt`` ``{"prompt"}`` → ``{"sanitized_prompt", "is_valid",
  "scanners": {"<Scanner>": risk in [-1, 1]}}`` and ``POST {url}/analyze/output`` ``{"prompt", "output"}`` →
  ``{"sanitized_output", "is_valid", "scanners"}``. Risk per scanner ``max(0, score)``; when ``is_valid`` is false, a
  violation per scanner over 0 (severity from :func:`~agent.guardrails.base.risk_level`). A scanner over 0 is one
  over its threshold (LLM Guard's ``calculate_risk_score``), so ``is_valid`` true beside one contradicts itself: an
  error, as NeMo's ``success`` with a blocked rail is.

The engine's thread is synchronous, so each check owns an event loop on a private daemon thread with one kept-alive
``aiohttp`` session; a call hands its coroutine to that loop and waits for it. Every answer is hostile until checked:
anything but a well-formed 200 JSON answer of the documented shape (a redirect, a 4xx/5xx, non-JSON, NaN, a wrong
type, a missing field, an unknown status, a risk outside [-1, 1], a body over :data:`MAX_BODY_BYTES`, a slow or closed
connection, a ``Server-Timing`` that cannot be right) raises :class:`GuardrailError` naming the check and the fault. A
message never quotes the answer's body (a service may echo the prompt back, as FastAPI's 422 does): its status,
content type and size, and only values and names that cannot be the prompt (:func:`_describe`, :func:`_named`).

Timing: the round trip is timed on the loop (request sent → whole body read). ``server_ms`` comes from the answer's
``Server-Timing`` header (the metric named by ``server_timing``; by default one named ``total``, else the sum of every
``dur``); ``network_ms`` = round trip − ``server_ms``. Without the header both are ``None`` and the round trip is in
``details``. The bearer token (``token_env``) is read once at build and never appears in a message or a result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import re
import threading
import time
import unicodedata
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from lens_core.config import Invalid, KeySpec, choice, const, optional, parse_duration, text

from .base import BuildContext, CheckConfig, CheckResult, GuardrailError, Violation, risk_level

if TYPE_CHECKING:  # aiohttp is imported where a check is built: reading the config stays light
    import aiohttp

T = TypeVar("T")

API_PATHS = {
    "nemo": {"input": "/v1/guardrail/checks", "output": "/v1/guardrail/checks"},
    "nemo-server": {"input": "/v1/checks", "output": "/v1/checks"},
    "llm-guard": {"input": "/analyze/prompt", "output": "/analyze/output"},
}
MAX_BODY_BYTES = 1024 * 1024  # an answer is a verdict and a few scores: more is an error
MAX_ENTRIES = 256  # rails / scanners in one answer
DEFAULT_TIMEOUT_S = 10.0  # the pipeline's default time_limit; set `timeout` below the set's time_limit
SERVER_TIME_SLACK_MS = 1.0  # a server's own figure may be rounded up: this much over the round trip is still sound
MAX_DURATION_MS = 86_400_000.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_METRIC_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # an HTTP token (RFC 9110), as Server-Timing names are


def _service_url(value: object) -> str:
    allowed = "an http:// or https:// base URL with a host, e.g. http://guardrails.internal:7331"
    if not isinstance(value, str):
        raise Invalid(allowed)
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise Invalid(allowed) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise Invalid(allowed)
    return value.strip().rstrip("/")


def _env_name(value: object) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise Invalid("the name of an environment variable (letters, digits, _), e.g. GUARDRAILS_TOKEN")
    return value


def _metric_name(value: object) -> str:
    if not isinstance(value, str) or not _METRIC_NAME.fullmatch(value):
        raise Invalid("a Server-Timing metric name (letters, digits, - _ . …, 1–64 characters), e.g. total")
    return value


OPTIONS: dict[str, KeySpec] = {
    "url": KeySpec(optional(_service_url), const(None), "the service's base URL (required)"),
    "api": KeySpec(choice("nemo", "llm-guard"), const("nemo"), "nemo (NeMo Guardrails checks) or llm-guard"),
    "token_env": KeySpec(optional(_env_name), const(None), "environment variable holding a bearer token"),
    "config_id": KeySpec(optional(text), const(None), "nemo: the guardrails configuration (guardrails.config_id)"),
    "model": KeySpec(
        optional(text), const(None), "nemo: the body's model (omitted when unset; nemo_api server needs it)"
    ),
    "nemo_api": KeySpec(
        choice("microservice", "server"),
        const("microservice"),
        "nemo: microservice (POST /v1/guardrail/checks) or server (nemoguardrails server: POST /v1/checks)",
    ),
    "timeout": KeySpec(optional(parse_duration), const(None), f"one call (default {DEFAULT_TIMEOUT_S:g}s)"),
    "server_timing": KeySpec(
        optional(_metric_name),
        const(None),
        "the Server-Timing metric that is the server's time (default: total, else the sum)",
    ),
}
DEFAULT_STAGES: frozenset[str] = frozenset({"input", "output"})


def build(check: CheckConfig, context: BuildContext) -> HttpGuardrail:
    """The check of one ``[[guardrails.checks]]`` entry with ``kind = "http"``; :class:`GuardrailError` when its URL
    is missing, its token variable is unset, or an option does not fit its API."""
    del context  # nothing local to size
    where = f"{check.source}: {check.where}"
    options = check.options
    url = options.get("url")
    if not url:
        raise GuardrailError(f"{where}.url: required for kind 'http' (the guardrail service's base URL)")
    api = options.get("api") or "nemo"
    if api not in API_PATHS:
        raise GuardrailError(f"{where}.api: {api!r} is not one of 'nemo', 'llm-guard'")
    nemo_api = options.get("nemo_api") or "microservice"
    if api != "nemo":
        for key in ("config_id", "model"):
            if options.get(key) is not None:
                raise GuardrailError(f"{where}.{key}: only for api = 'nemo' (this check's api is {api!r})")
        if nemo_api != "microservice":
            raise GuardrailError(f"{where}.nemo_api: only for api = 'nemo' (this check's api is {api!r})")
    elif nemo_api == "server" and options.get("model") is None:
        raise GuardrailError(f"{where}.model: required with nemo_api = 'server' (its /v1/checks wants a model name)")
    token: str | None = None
    token_env = options.get("token_env")
    if token_env:
        token = os.environ.get(token_env)
        if not token or not token.strip():
            raise GuardrailError(f"{where}.token_env: the environment variable {token_env} is not set (or empty)")
        token = token.strip()
    timeout = options.get("timeout") or DEFAULT_TIMEOUT_S
    return HttpGuardrail(
        name=check.name,
        stages=check.stages,
        url=url,
        api="nemo-server" if api == "nemo" and nemo_api == "server" else api,
        token=token,
        config_id=options.get("config_id"),
        model=options.get("model"),
        timeout_s=float(timeout),
        server_timing=options.get("server_timing"),
    )


def _shown_url(url: str) -> str:
    """``url`` without any user:password part (a message must not carry a credential)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _clean(value: str, limit: int = 60) -> str:
    """A name the server sent, fit for a description: control and format characters dropped, at most ``limit``."""
    kept = "".join(c for c in value if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    return kept[:limit] if len(kept) <= limit else kept[: limit - 1] + "…"


_SAFE_TEXT = re.compile(r"[A-Za-z0-9 _.$=/:+-]{1,64}")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,48}/[A-Za-z0-9!#$&^_.+-]{1,48}")


def _safe_name(value: str, limit: int = 64) -> str | None:
    """A name the server sent, when it can be shown: a short identifier (letters, digits, ``_.$=/:+-`` and spaces)
    with at most four digits. Anything else may be the prompt echoed back (a card number, a token) and is not shown."""
    if len(value) <= limit and _SAFE_TEXT.fullmatch(value) and sum(c.isdigit() for c in value) <= 4:
        return value
    return None


def _named(value: str, index: int) -> str:
    """``'PromptInjection'``, or ``#3`` (its position in the answer) when the name cannot be shown."""
    shown = _safe_name(value)
    return repr(shown) if shown is not None else f"#{index}"


def _describe(value: Any) -> str:
    """A value of the answer for a message: a short safe literal as itself, anything else by its JSON type and size
    (never its content: a hostile or echoing service must not get the prompt into the record through an error)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value) if sum(c.isdigit() for c in repr(value)) <= 4 else "a number"
    if isinstance(value, str):
        return repr(value) if _safe_name(value, 24) is not None else f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a JSON list of {len(value)} items"
    if isinstance(value, dict):
        return f"a JSON object of {len(value)} keys"
    return type(value).__name__


def _content_type(value: str | None) -> str:
    """The answer's media type (parameters dropped), or what stands in for it."""
    if not value:
        return "no content type"
    media = value.split(";", 1)[0].strip()
    return media.lower() if _CONTENT_TYPE.fullmatch(media) else "an unreadable content type"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _LoopThread:
    """One event loop on a daemon thread: synchronous callers (any thread) run coroutines on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class HttpGuardrail:
    """A check answered by a guardrail service (see the module's docstring)."""

    kind = "http"

    def __init__(
        self,
        *,
        name: str,
        stages: frozenset[str],
        url: str,
        api: str,
        token: str | None,
        config_id: str | None,
        model: str | None,
        timeout_s: float,
        server_timing: str | None,
    ) -> None:
        self.name = name
        self.stages = stages
        self.url = url
        self.api = api
        self._token = token
        self.config_id = config_id
        self.model = model
        self.timeout_s = timeout_s
        self.server_timing = server_timing
        self._runner = _LoopThread(f"guardrail-http-{name}")
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._runner.submit(self._open()).result(10)

    def __repr__(self) -> str:  # never the token
        return f"HttpGuardrail(name={self.name!r}, api={self.api!r}, url={_shown_url(self.url)!r})"

    # -- the Guardrail protocol --------------------------------------------------------------------------------------
    def validate_input(self, text: str) -> CheckResult:
        return self._check("input", text)

    def detect_threats(self, text: str) -> CheckResult:
        return self._check("input", text)  # the service sees the prompt as for input validation

    def filter_output(self, text: str) -> CheckResult:
        return self._check("output", text)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self._runner.submit(self._close_session()).result(10)
        self._runner.stop()

    # -- the exchange ------------------------------------------------------------------------------------------------
    async def _open(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=16, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)

    async def _close_session(self) -> None:
        calls = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in calls:  # a call still waiting on the service (its caller gave up): it ends here
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _fail(self, what: str) -> GuardrailError:
        message = f"check {self.name!r} (http, {self.api} at {_shown_url(self.url)}): {what}"
        if self._token:
            message = message.replace(self._token, "***")
        return GuardrailError(message)

    def _endpoint(self, direction: str) -> str:
        return self.url + API_PATHS[self.api][direction]

    def _body(self, direction: str, content: str) -> dict[str, Any]:
        if self.api == "llm-guard":
            # the output stage is handed the output only: the prompt LLM Guard's output scanners may compare with is
            # not known here, so it goes empty
            return {"prompt": content} if direction == "input" else {"prompt": "", "output": content}
        messages = [{"role": "user", "content": content}]
        if direction == "output":
            messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": content}]
        body: dict[str, Any] = {"messages": messages}
        if self.model is not None:
            body["model"] = self.model
        guardrails: dict[str, Any] = {}
        if self.config_id is not None:
            guardrails["config_id"] = self.config_id
        if self.api == "nemo-server":  # only this stage's rails (by roles, user + assistant would run both)
            guardrails["rail_types"] = [direction]
        if guardrails:
            body["guardrails"] = guardrails
        return body

    def _check(self, direction: str, content: str) -> CheckResult:
        if self._closed:
            raise self._fail("the check is closed")
        endpoint = self._endpoint(direction)
        future = self._runner.submit(self._exchange(endpoint, self._body(direction, content)))
        try:
            status, content_type, headers, raw, round_trip_ms = future.result(self.timeout_s + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise self._fail(f"POST {_shown_url(endpoint)}: no answer within {self.timeout_s:g}s") from None
        except concurrent.futures.CancelledError:
            raise self._fail(f"POST {_shown_url(endpoint)}: the check was closed during the call") from None
        data = self._parse(endpoint, status, content_type, raw)
        server_ms = self._server_ms(headers, round_trip_ms)
        if self.api == "nemo":
            result = self._nemo(data)
        elif self.api == "nemo-server":
            result = self._nemo_server(data)
        else:
            result = self._llm_guard(data, direction)
        result.server_ms = server_ms
        result.network_ms = None if server_ms is None else max(0.0, round_trip_ms - server_ms)
        result.details = {**(result.details or {}), "api": self.api, "round_trip_ms": round(round_trip_ms, 3)}
        return result

    async def _exchange(self, endpoint: str, body: dict[str, Any]) -> tuple[int, str, list[str], bytes, float]:
        """POST ``body``; (status, content type, Server-Timing values, body bytes, round trip in ms) or
        :class:`GuardrailError`."""
        try:
            return await asyncio.wait_for(self._post(endpoint, body), self.timeout_s)
        except asyncio.TimeoutError:
            raise self._fail(f"POST {_shown_url(endpoint)}: no whole answer within {self.timeout_s:g}s") from None

    async def _post(self, endpoint: str, body: dict[str, Any]) -> tuple[int, str, list[str], bytes, float]:
        import aiohttp

        assert self._session is not None
        payload = json.dumps(body).encode()  # ASCII: a lone surrogate in the text cannot fail the encoding
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        shown = _shown_url(endpoint)
        start = time.perf_counter_ns()
        try:
            async with self._session.post(endpoint, data=payload, headers=headers, allow_redirects=False) as response:
                declared = response.content_length
                if declared is not None and declared > MAX_BODY_BYTES:
                    raise self._fail(f"POST {shown}: an answer of {declared} bytes (at most {MAX_BODY_BYTES})")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise self._fail(f"POST {shown}: an answer over {MAX_BODY_BYTES} bytes")
                    chunks.append(chunk)
                end = time.perf_counter_ns()
                timing = response.headers.getall("Server-Timing", [])
                status = response.status
                content_type = _content_type(response.headers.get("Content-Type"))
        except GuardrailError:
            raise
        except aiohttp.ClientConnectionError as exc:
            # raised here, about the connection (host, port, errno), not from what the service sent
            raise self._fail(f"POST {shown}: {type(exc).__name__}: {_clean(str(exc), 160)}") from None
        except aiohttp.ClientError as exc:
            # e.g. a bad status line or payload: its text may quote what the service sent, so only its kind
            raise self._fail(f"POST {shown}: {type(exc).__name__} (the answer could not be read)") from None
        except OSError as exc:
            raise self._fail(f"POST {shown}: {type(exc).__name__}: {_clean(str(exc), 160)}") from None
        return status, content_type, list(timing), b"".join(chunks), (end - start) / 1e6

    # -- reading the answer ------------------------------------------------------------------------------------------
    def _parse(self, endpoint: str, status: int, content_type: str, raw: bytes) -> dict[str, Any]:
        # A message says the status, the content type and the size of an answer, never its body: a service may echo
        # the request (a 422 quoting the prompt), and the message goes into the record.
        shown = _shown_url(endpoint)
        answer = f"{content_type}, {len(raw)} bytes"
        if status != 200:
            if 300 <= status < 400:
                raise self._fail(f"POST {shown}: HTTP {status} (a redirect; point url at the service itself)")
            if status in (401, 403):
                raise self._fail(f"POST {shown}: HTTP {status}: the service refused the credentials ({answer})")
            raise self._fail(f"POST {shown}: HTTP {status} ({answer})")
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise self._fail(f"POST {shown}: the answer is not JSON (not UTF-8; {answer})") from None
        except json.JSONDecodeError as exc:
            raise self._fail(
                f"POST {shown}: the answer is not JSON ({exc.msg} at character {exc.pos}; {answer})"
            ) from None
        except RecursionError:
            raise self._fail(f"POST {shown}: the answer is not JSON (nested too deep; {answer})") from None
        except ValueError as exc:  # _reject_constant: NaN, Infinity, -Infinity
            raise self._fail(f"POST {shown}: the answer is not JSON ({_clean(str(exc), 60)}; {answer})") from None
        if not isinstance(data, dict):
            raise self._fail(f"POST {shown}: the answer is a JSON {type(data).__name__}, not an object ({answer})")
        return data

    def _server_ms(self, values: list[str], round_trip_ms: float) -> float | None:
        """The server's time from its ``Server-Timing`` header(s); ``None`` when it names none."""
        durations: dict[str, float] = {}
        total = 0.0
        entries = [entry for value in values for entry in value.split(",") if entry.strip()]
        if len(entries) > MAX_ENTRIES:
            raise self._fail(f"Server-Timing: {len(entries)} metrics (at most {MAX_ENTRIES})")
        for index, entry in enumerate(entries):
            name, *params = (part.strip() for part in entry.split(";"))
            for param in params:
                key, _, raw = param.partition("=")
                if key.strip().lower() != "dur":
                    continue
                raw = raw.strip().strip('"')
                try:
                    number = float(raw)
                except ValueError:
                    raise self._fail(
                        f"Server-Timing: {_named(name, index)} has dur={_describe(raw)}, not a number"
                    ) from None
                if not (math.isfinite(number) and 0.0 <= number <= MAX_DURATION_MS):
                    raise self._fail(f"Server-Timing: {_named(name, index)} has dur={number:g}, not a duration in ms")
                durations[name] = durations.get(name, 0.0) + number
                total += number
        if not durations:
            return None
        wanted = self.server_timing or ("total" if "total" in durations else None)
        if wanted is not None:
            if wanted not in durations:
                return None
            server = durations[wanted]
        else:
            server = total
        if server > round_trip_ms + SERVER_TIME_SLACK_MS:
            raise self._fail(
                f"Server-Timing says the server spent {server:.1f} ms of a {round_trip_ms:.1f} ms round trip"
                + (
                    ""
                    if wanted or len(durations) < 2
                    else " (the sum of its metrics: name the server's own in server_timing)"
                )
            )
        return server

    def _nemo(self, data: dict[str, Any]) -> CheckResult:
        status = data.get("status")
        if status not in ("success", "blocked"):
            raise self._fail(f"the answer's status is {_describe(status)}, not 'success' or 'blocked'")
        rails = data.get("rails_status")
        if not isinstance(rails, dict):
            raise self._fail(f"the answer's rails_status is {type(rails).__name__}, not an object")
        if len(rails) > MAX_ENTRIES:
            raise self._fail(f"the answer names {len(rails)} rails (at most {MAX_ENTRIES})")
        blocked: list[tuple[int, str]] = []
        for index, (rail, state) in enumerate(rails.items()):
            if not isinstance(state, dict):
                raise self._fail(
                    f"rails_status[{_named(rail, index)}] is {_describe(state)}, not {{'status': 'success'|'blocked'}}"
                )
            rail_status = state.get("status")
            if rail_status not in ("success", "blocked"):
                raise self._fail(
                    f"rails_status[{_named(rail, index)}]'s status is {_describe(rail_status)}, "
                    "not 'success' or 'blocked'"
                )
            if rail_status == "blocked":
                blocked.append((index, rail))
        if status == "success":
            if blocked:
                raise self._fail(
                    f"the answer's status is 'success' but rail {_named(blocked[0][1], blocked[0][0])} is blocked"
                )
            return CheckResult(risk_score=0.0, details={"rails": len(rails)})
        violations = [
            Violation(_rail_type(rail), "high", f"NeMo Guardrails rail {_named(rail, index)} blocked")
            for index, rail in blocked
        ]
        if not violations:
            violations = [Violation("unsafe_content", "high", "NeMo Guardrails blocked (no rail named)")]
        return CheckResult(
            violations=violations, risk_score=1.0, details={"rails": len(rails), "blocked": len(blocked)}
        )

    def _nemo_server(self, data: dict[str, Any]) -> CheckResult:
        status = data.get("status")
        if status not in ("passed", "modified", "blocked"):
            raise self._fail(f"the answer's status is {_describe(status)}, not 'passed', 'modified' or 'blocked'")
        if not isinstance(data.get("content"), str):
            raise self._fail(f"the answer's content is {type(data.get('content')).__name__}, not a string")
        rail = data.get("rail")
        if rail is not None and not isinstance(rail, str):
            raise self._fail(f"the answer's rail is {type(rail).__name__}, not a string")
        if status == "passed":
            return CheckResult(risk_score=0.0, details={"status": status})
        shown = f"rail {_named(rail, 0)}" if rail else "a rail"
        if status == "blocked":
            violation = Violation(_rail_type(rail or ""), "high", f"NeMo Guardrails {shown} blocked")
            return CheckResult(violations=[violation], risk_score=1.0, details={"status": status})
        kind = _rail_type(rail) if rail else "other"
        violation = Violation(kind, "medium", f"NeMo Guardrails {shown} modified the text")
        return CheckResult(violations=[violation], risk_score=0.5, details={"status": status})

    def _llm_guard(self, data: dict[str, Any], direction: str) -> CheckResult:
        sanitized = "sanitized_prompt" if direction == "input" else "sanitized_output"
        if not isinstance(data.get(sanitized), str):
            raise self._fail(f"the answer's {sanitized} is {type(data.get(sanitized)).__name__}, not a string")
        is_valid = data.get("is_valid")
        if not isinstance(is_valid, bool):
            raise self._fail(f"the answer's is_valid is {_describe(is_valid)}, not true or false")
        scanners = data.get("scanners")
        if not isinstance(scanners, dict):
            raise self._fail(f"the answer's scanners is {type(scanners).__name__}, not an object")
        if len(scanners) > MAX_ENTRIES:
            raise self._fail(f"the answer names {len(scanners)} scanners (at most {MAX_ENTRIES})")
        risks: dict[str, float] = {}
        shown: dict[str, str] = {}  # scanner → how a message names it
        for index, (scanner, score) in enumerate(scanners.items()):
            shown[scanner] = _named(scanner, index)
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise self._fail(f"scanner {shown[scanner]} scored {_describe(score)}, not a number")
            if not -1.0 <= score <= 1.0:
                raise self._fail(f"scanner {shown[scanner]} scored {score:g}, outside [-1, 1]")
            risks[scanner] = max(0.0, float(score))
        risk = max(risks.values(), default=0.0)
        if is_valid and risk > 0.0:
            # LLM Guard scores a scanner (score - threshold) scaled into [-1, 1]: over 0 only when the scanner's score
            # passed its threshold, i.e. the scanner failed; is_valid is every scanner's verdict together. A valid
            # answer with a scanner over 0 contradicts itself (as NeMo's "success" with a blocked rail): an error of
            # the check, not a pass.
            worst = max(risks, key=lambda name: risks[name])
            raise self._fail(
                f"the answer's is_valid is true but scanner {shown[worst]} scored {risks[worst]:g} "
                "(over 0: over its threshold)"
            )
        violations: list[Violation] = []
        if not is_valid:
            for scanner, scanner_risk in risks.items():
                if scanner_risk > 0.0:
                    kind = _scanner_type(scanner)
                    violations.append(
                        Violation(
                            kind,
                            risk_level(scanner_risk),
                            f"LLM Guard scanner {shown[scanner].strip(chr(39))} (risk {scanner_risk:.2f})",
                        )
                    )
            if not violations:
                violations.append(
                    Violation("other", risk_level(risk), "LLM Guard answered is_valid false with no scanner over 0")
                )
        top = dict(sorted(risks.items(), key=lambda item: -item[1])[:8])
        return CheckResult(
            violations=violations,
            risk_score=risk,
            details={"is_valid": is_valid, "scanners": {shown[k].strip("'"): round(v, 4) for k, v in top.items()}},
        )


def _rail_type(rail: str) -> str:
    """A NeMo rail's name → a violation type, where the name says what it checks."""
    name = rail.lower()
    if "jailbreak" in name:
        return "jailbreak"
    if "injection" in name:
        return "prompt_injection"
    if "pii" in name or "sensitive" in name:
        return "pii_leakage"
    if "toxic" in name or "moderation" in name:
        return "toxic_content"
    return "unsafe_content"


_SCANNER_TYPES = {
    "promptinjection": "prompt_injection",
    "anonymize": "pii_leakage",
    "sensitive": "pii_leakage",
    "secrets": "secret_leakage",
    "toxicity": "toxic_content",
    "bantopics": "disallowed_topic",
}


def _scanner_type(scanner: str) -> str:
    """An LLM Guard scanner's name → a violation type (``other`` for the scanners without one)."""
    return _SCANNER_TYPES.get(scanner.replace("_", "").lower(), "other")
