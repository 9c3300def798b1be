"""Timing an OpenAI-compatible endpoint over HTTP: streaming completions, RTT, bytes, errors by type.

TTFT is taken at the first SSE chunk that carries non-empty text (a role-only chunk does not count); every gap
between text-bearing chunks is kept; e2e ends at the last text-bearing chunk (a trailing usage-only chunk does not
extend it). Output tokens come from the server's ``usage`` when it sends one (``stream_options.include_usage``),
else from the number of text-bearing chunks — the record says which. Nothing raises out of a request: timeouts,
refused connections, HTTP errors, malformed and cut streams become error measurements with a type.

A server that reports its own per-request ``timings`` (llama.cpp's ``llama-server``: in the body, or in the last
chunk of a stream) has them kept in ``server_timings`` — known keys only, finite non-negative numbers only; a value
of any other kind is dropped as not reported, and nothing reported at all is ``None``.

The endpoint is hostile until checked. A redirect is never followed (every request is sent with
``allow_redirects=False``): a 3xx answer is an error ``redirect`` naming the origin it points to — neither the key
nor the measurement ever goes to a host the configuration does not name. What one answer may make the client read
is bounded: a streamed or non-streamed answer at most :func:`answer_byte_limit` bytes (max(1 MiB, max_tokens ×
16 KiB): error ``response_too_large``), an SSE line at most 256 KiB (``malformed_stream``), an error answer's first
64 KiB; text the server chooses (an error body, a served model's name) is kept without control characters and
at most 300 (a name: 256) characters.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import statistics
import time
import unicodedata
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp

from ..errors import ConfigError, RequestError

T = TypeVar("T")

MAX_ANSWER_MIN_BYTES = 1 << 20  # an answer may always be this long …
MAX_ANSWER_BYTES_PER_TOKEN = 16 << 10  # … or this much per max_tokens (far more than any real token's event)
MAX_SSE_LINE_BYTES = 256 << 10  # one line of a stream (below the smallest answer bound: a line too long is malformed)
MAX_ERROR_BODY_BYTES = 64 << 10  # read of an error answer (its first 300 characters are kept)
MAX_ERROR_CHARS = 300
MAX_SERVED_MODEL_CHARS = 256


def answer_byte_limit(max_tokens: int) -> int:
    """The most bytes one completion answer (streamed or not) may make the client read."""
    return max(MAX_ANSWER_MIN_BYTES, max(1, max_tokens) * MAX_ANSWER_BYTES_PER_TOKEN)


def clean_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Server-supplied text as it may be kept: control and invisible characters removed (a newline or tab becomes
    a space), at most ``limit`` characters."""
    out = []
    for ch in text[: limit * 4]:
        if ch in "\n\r\t":
            out.append(" ")
        elif unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            out.append(ch)
    return "".join(out)[:limit]


def check_served_model(value: object) -> str:
    """A served model's name as the server lists it (GET /models), checked: a string of 1–256 characters without
    control or invisible characters; :class:`RequestError` ``malformed_response`` saying why else (refused, not
    cleaned: the name goes into every request and every record)."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError("malformed_response", "GET /models: the first model's id is not a non-empty string")
    if len(value) > MAX_SERVED_MODEL_CHARS:
        raise RequestError(
            "malformed_response",
            f"GET /models: the first model's id has {len(value)} characters; allowed: at most "
            f'{MAX_SERVED_MODEL_CHARS} (name the model with the suite\'s "model" field or cloud.model)',
        )
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            raise RequestError(
                "malformed_response",
                f"GET /models: the first model's id {clean_text(value, 80)!r} holds the control or invisible "
                f"character U+{ord(ch):04X}; allowed: printable characters only",
            )
    return value


def redirect_message(response: aiohttp.ClientResponse, what: str) -> str:
    """The error of a 3xx answer (never followed): where it pointed, as an origin only."""
    location = response.headers.get("Location", "")
    try:
        origin = _origin(urljoin(str(response.url), location)) if location else "nowhere (no Location)"
    except ValueError:
        origin = "an unusable Location"
    return (
        f"{what} answered HTTP {response.status} redirecting to {origin}; redirects are not followed "
        "(name the endpoint's final URL)"
    )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        raise ValueError(url)
    port = parts.port
    return clean_text(f"{scheme}://{host}" + (f":{port}" if port is not None else ""), 200)


class AnswerTooLarge(Exception):
    pass


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, at most ``limit`` bytes; :class:`AnswerTooLarge` (reading stops) past it."""
    raw = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        raw += chunk
        if len(raw) > limit:
            raise AnswerTooLarge()
    return bytes(raw)


async def read_head(response: aiohttp.ClientResponse, limit: int = MAX_ERROR_BODY_BYTES) -> bytes:
    """The first ``limit`` bytes of an answer's body (the rest is not read)."""
    raw = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        raw += chunk
        if len(raw) >= limit:
            break
    return bytes(raw[:limit])


@dataclass(frozen=True)
class CloudSettings:
    url: str  # base URL ending in /v1
    model: str | None = None
    api_key: str | None = None
    api_key_header: str | None = None  # the key in this header as it is; None: ``Authorization: Bearer <key>``
    timeout: float = 60.0
    chat: bool = False
    extra: dict[str, Any] = field(default_factory=lambda: {"repeat_penalty": 1.0})
    api: str = "completions"  # auto | chat | completions: what was asked for (``chat`` is what is used)
    api_reason: str = "cloud.api = completions"


def cloud_settings(config: Any, environ: dict[str, str] | None = None) -> CloudSettings:
    environ = dict(os.environ) if environ is None else environ
    c = config.values["cloud"]
    if not c["url"]:
        raise ConfigError(
            config.source("cloud", "url"), "cloud.url", None, "the endpoint's base URL, e.g. http://host:8000/v1"
        )
    key = environ.get("LENS_CLOUD_API_KEY", "").strip() or None
    if key is None and c["api_key_file"] is not None:
        try:
            key = Path(c["api_key_file"]).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                config.source("cloud", "api_key_file"),
                "cloud.api_key_file",
                str(c["api_key_file"]),
                f"a readable file holding the API key ({exc.strerror})",
            ) from None
    api = c["api"]
    if api == "auto" and config.source("cloud", "chat") != "default":  # the older key, set on purpose
        api = "chat" if c["chat"] else "completions"
    return CloudSettings(
        url=str(c["url"]).rstrip("/"),
        model=c["model"],
        api_key=key,
        timeout=c["timeout"],
        chat=api == "chat",
        api=api,
        api_reason=f"cloud.api = {api} ({config.source('cloud', 'api')})",
    )


_CHAT_NAME = re.compile(r"instruct|chat|(^|[-_.])it($|[-_.])", re.I)


def chat_by_name(model: str) -> bool:
    """A model whose name says it is tuned for chat (``…-Instruct``, ``…-chat``, ``gemma-2-9b-it``)."""
    return bool(_CHAT_NAME.search(Path(model).name))


@dataclass
class CloudResult:
    """One streamed request. Times are ``perf_counter_ns`` stamps."""

    start_ns: int
    chunk_ns: list[int] = field(default_factory=list)  # text-bearing chunks only
    texts: list[str] = field(default_factory=list)
    end_ns: int | None = None
    usage: dict[str, int] | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    logprobs: dict[str, Any] | None = None
    path: str = "/completions"  # the endpoint asked: /completions or /chat/completions
    server_timings: dict[str, float] | None = None  # the server's own ``timings`` (llama-server), when it sends them
    stale_retries: int = 0  # sent again after a pooled connection was found closed (CloudClient.retry_stale)

    @property
    def ok(self) -> bool:
        return self.error_type is None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def output_tokens(self) -> tuple[int, str]:
        if self.usage and "completion_tokens" in self.usage:
            return int(self.usage["completion_tokens"]), "server usage"
        return len(self.chunk_ns), "text-bearing chunks"


# llama-server's ``timings`` keys: counts (whole numbers) and times/rates. Anything else the server sends is ignored.
SERVER_TIMING_COUNTS = ("cache_n", "prompt_n", "predicted_n", "draft_n", "draft_n_accepted")
SERVER_TIMING_FIGURES = (
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
)
_MAX_SERVER_FIGURE = 2.0**53  # larger is not a timing of one request (and would not stay exact in JSON)


def parse_server_timings(value: Any) -> dict[str, float] | None:
    """A server's ``timings`` object → its known figures that are finite non-negative numbers (counts: whole
    numbers, as ``int``); ``None`` when ``value`` is not an object or holds none of them. Never raises."""
    if not isinstance(value, dict):
        return None
    found: dict[str, float] = {}
    for key in (*SERVER_TIMING_COUNTS, *SERVER_TIMING_FIGURES):
        item = value.get(key)
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        number = float(item)
        if not (math.isfinite(number) and 0.0 <= number <= _MAX_SERVER_FIGURE):
            continue
        if key in SERVER_TIMING_COUNTS:
            if not number.is_integer():
                continue
            found[key] = int(number)
        else:
            found[key] = number
    return found or None


TEXT_PROBE = "Hello world, the"  # the text protocols' probe request


def logprob_tokens(logprobs: Any) -> list[str]:
    """The generated pieces of an answer's ``logprobs``: the completions shape (``{"tokens": [str, …]}``: vLLM,
    llama-cpp-python's server, OpenAI) or the chat shape (``{"content": [{"token": str, …}, …]}``: llama.cpp's
    ``llama-server`` answers /v1/completions with it). Anything else → ``[]``: the caller says the answer lacks them."""
    if not isinstance(logprobs, dict):
        return []
    tokens = logprobs.get("tokens")
    if tokens is None and isinstance(logprobs.get("content"), list):
        tokens = [entry.get("token") if isinstance(entry, dict) else None for entry in logprobs["content"]]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return []
    return list(tokens)


async def _mark_reused(session: aiohttp.ClientSession, context: Any, params: Any) -> None:
    """aiohttp trace hook: the request whose ``trace_request_ctx`` is a dict went out on a pooled connection."""
    if isinstance(context.trace_request_ctx, dict):
        context.trace_request_ctx["reused"] = True


class CloudClient:
    """An aiohttp client for /v1/completions and /v1/chat/completions."""

    def __init__(self, settings: CloudSettings, *, connection_limit: int = 100, retry_stale: bool = False) -> None:
        # llama.cpp's llama-server closes a connection after a streamed answer although it says keep-alive: a
        # request sent at once on that pooled connection fails ("Can not write request body", or "Server
        # disconnected" before any answer). With retry_stale such a request (never seen by the server) is sent
        # again, its time counted from the first try. The load generator turns it on: its closed-loop workers send
        # the moment an answer ends, before the server's close has reached the client.
        self.retry_stale = retry_stale
        # how many connections the session may hold open at once (aiohttp's pool: requests beyond it wait for a
        # free connection); 0 means no limit. The default is aiohttp's own; the load generator raises it to its
        # level (reserve_connections) so that the pool never caps the concurrency it is asked for.
        self.connection_limit = connection_limit
        # which token-id API the endpoint speaks: "llama-server" (/tokenize, /completion) or "vllm" (/tokenize,
        # /v1/completions with id prompts and prompt_logprobs); set by probe_token_api
        self.token_api = "llama-server"
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            reuse = aiohttp.TraceConfig()  # tells _post which request went out on a pooled connection
            reuse.on_connection_reuseconn.append(_mark_reused)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connection_limit),
                trace_configs=[reuse],
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.timeout, sock_connect=min(10.0, self.settings.timeout)
                ),
            )
        return self._session

    async def reserve_connections(self, count: int) -> None:
        """Make the connection pool hold at least ``count`` connections at once (0: no limit). A session opened with
        a smaller limit is closed (a new one opens on the next request): call this between requests, not during."""
        if self.connection_limit == 0 or (count != 0 and count <= self.connection_limit):
            return
        self.connection_limit = count
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key and self.settings.api_key_header:
            headers[self.settings.api_key_header] = self.settings.api_key
        elif self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    async def model_name(self) -> str:
        """The configured model, else the first one the endpoint lists."""
        if self.settings.model:
            return self.settings.model
        session = await self.session()
        async with session.get(
            self.settings.url + "/models", headers=self._headers(), allow_redirects=False
        ) as response:
            if 300 <= response.status < 400:
                raise RequestError("redirect", redirect_message(response, "GET /models"))
            try:
                raw = await read_bounded(response, MAX_ANSWER_MIN_BYTES)
            except AnswerTooLarge:
                raise RequestError(
                    "response_too_large", f"GET /models: more than {MAX_ANSWER_MIN_BYTES} bytes"
                ) from None
        data = json.loads(raw)
        return check_served_model(data["data"][0]["id"])

    async def choose_api(self, model: str) -> tuple[bool, str]:
        """For ``api = auto``: chat or completions, and why. llama.cpp's server says whether the model has a chat
        template (``GET /props``); other servers say nothing, so the model's name decides."""
        root = self.settings.url.removesuffix("/v1")
        try:
            session = await self.session()
            async with session.get(root + "/props", headers=self._headers(), allow_redirects=False) as response:
                raw = await read_bounded(response, MAX_ANSWER_MIN_BYTES) if response.status == 200 else b""
            props = json.loads(raw) if raw else None  # a redirect is not followed: no props
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AnswerTooLarge):
            props = None
        if isinstance(props, dict) and isinstance(props.get("chat_template"), str):
            chat = bool(props["chat_template"].strip())
            return (
                chat,
                f"auto: the server {'reports' if chat else 'has no'} a chat template for the model (GET /props)",
            )
        if chat_by_name(model):
            return True, f"auto: {Path(model).name!s} is named as a chat model (instruct/chat/-it)"
        return False, f"auto: {Path(model).name!s} is not named as a chat model and the server reports no chat template"

    async def rtt_ms(self, samples: int = 3) -> float | None:
        """Median TCP connect time to the endpoint: one round trip (SYN → SYN-ACK)."""
        parts = urlsplit(self.settings.url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        times = []
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=5)
            except (OSError, asyncio.TimeoutError):
                return None
            times.append((time.perf_counter_ns() - t0) / 1e6)
            writer.close()
        return statistics.median(times)

    async def complete(
        self,
        prompt: str | list[dict[str, str]],
        *,
        max_tokens: int,
        stream: bool = True,
        temperature: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> CloudResult:
        """One request; never raises for what the network or the server does."""
        chat = isinstance(prompt, list)
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "stream": stream}
        if chat:
            body["messages"] = prompt
        else:
            body["prompt"] = prompt
        body.update(self._model_field())
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(self.settings.extra)
        body.update(extra or {})
        payload = json.dumps(body).encode()
        path = "/chat/completions" if chat else "/completions"
        result = CloudResult(start_ns=time.perf_counter_ns(), bytes_up=len(payload), path=path)
        try:
            session = await self.session()
            async with await self._post(session, path, payload, result) as response:
                result.http_status = response.status
                if 300 <= response.status < 400:
                    result.error_type = "redirect"
                    result.error_message = redirect_message(response, f"POST {path}")
                    return result
                if response.status != 200:
                    head = await read_head(response)
                    result.bytes_down += len(head)
                    result.error_type = f"http_{response.status}"
                    result.error_message = clean_text(head.decode("utf-8", "replace"))
                    return result
                limit = answer_byte_limit(max_tokens)
                if stream:
                    await self._read_stream(response, result, limit)
                else:
                    try:
                        raw = await read_bounded(response, limit)
                    except AnswerTooLarge:
                        result.bytes_down += limit
                        result.error_type = "response_too_large"
                        result.error_message = f"an answer of more than {limit} bytes (max_tokens {max_tokens})"
                        return result
                    result.bytes_down += len(raw)
                    self._read_body(raw, result)
        except asyncio.TimeoutError:
            result.error_type = "timeout"
            result.error_message = f"no complete answer within {self.settings.timeout:g} s"
        except aiohttp.ClientConnectorError as exc:
            result.error_type = "connection_refused" if "refused" in str(exc).lower() else "connection_error"
            result.error_message = str(exc)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            result.error_type = "stream_cut"
            result.error_message = f"the connection closed mid-answer: {exc}"
        except aiohttp.ClientError as exc:
            result.error_type = "connection_error"
            result.error_message = clean_text(str(exc))
        return result

    async def _post(
        self, session: aiohttp.ClientSession, path: str, payload: bytes, result: CloudResult
    ) -> aiohttp.ClientResponse:
        """POST ``payload``. With ``retry_stale``, a request that went out on a pooled connection and failed before
        any answer (the server had closed that connection: the write fails, or the connection closes unanswered)
        is sent again — each time counted in ``result.stale_retries``. A failed connection leaves the pool and a
        request on a new connection is never sent again, so this ends (at most once per pooled connection)."""
        url = self.settings.url + path
        while True:
            attempt: dict[str, bool] = {}
            try:
                return await session.post(
                    url, data=payload, headers=self._headers(), trace_request_ctx=attempt, allow_redirects=False
                )
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                if not (self.retry_stale and attempt.get("reused")) or isinstance(exc, aiohttp.ClientConnectorError):
                    raise
                result.stale_retries += 1

    @staticmethod
    def _choice_text(choice: dict[str, Any]) -> str:
        if "text" in choice:
            return str(choice.get("text") or "")
        delta = choice.get("delta") or choice.get("message") or {}
        return str(delta.get("content") or "")

    def _read_body(self, raw: bytes, result: CloudResult) -> None:
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            result.error_type = "malformed_response"
            result.error_message = clean_text(raw[:1200].decode("utf-8", "replace"), 200)
            return
        now = time.perf_counter_ns()
        text = self._choice_text(choice)
        if text:
            result.texts.append(text)
            result.chunk_ns.append(now)
        result.end_ns = now
        result.finish_reason = choice.get("finish_reason")
        result.usage = data.get("usage")
        result.logprobs = choice.get("logprobs")
        if isinstance(data, dict):
            result.server_timings = parse_server_timings(data.get("timings"))

    async def _read_stream(self, response: aiohttp.ClientResponse, result: CloudResult, limit: int) -> None:
        """Read an SSE stream into ``result``: at most ``limit`` bytes (``response_too_large``: reading stops),
        lines of at most MAX_SSE_LINE_BYTES (``malformed_stream``)."""
        done = False
        buffer = bytearray()
        async for raw in response.content.iter_any():
            result.bytes_down += len(raw)
            if result.bytes_down > limit:
                result.error_type = "response_too_large"
                result.error_message = f"a stream of more than {limit} bytes; reading stopped"
                return
            buffer += raw
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end]).strip()
                del buffer[: end + 1]
                outcome = self._stream_line(line, result)
                if outcome is False:
                    return
                if outcome:
                    done = True
                    break
            if done:
                break
            if len(buffer) > MAX_SSE_LINE_BYTES:
                result.error_type = "malformed_stream"
                result.error_message = f"a stream line of more than {MAX_SSE_LINE_BYTES} bytes"
                return
        if not done and buffer.strip():  # a last line without its newline
            outcome = self._stream_line(bytes(buffer).strip(), result)
            if outcome is False:
                return
            done = bool(outcome)
        if not done:
            result.error_type = "stream_cut"
            result.error_message = "the stream ended without [DONE]"

    def _stream_line(self, line: bytes, result: CloudResult) -> bool | None:
        """One SSE line: None to read on, True at [DONE], False when the stream is malformed (``result`` says)."""
        if not line or line.startswith(b":") or not line.startswith(b"data:"):
            return None
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            event = json.loads(data)
        except ValueError:
            result.error_type = "malformed_stream"
            result.error_message = clean_text(f"not JSON in the stream: {data[:120]!r}")
            return False
        if not isinstance(event, dict):
            result.error_type = "malformed_stream"
            result.error_message = "an event that is not an object"
            return False
        if event.get("usage"):
            result.usage = event["usage"]
        if "timings" in event:  # llama-server: the last chunk(s); a later report replaces an earlier one
            result.server_timings = parse_server_timings(event["timings"]) or result.server_timings
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            result.error_type = "malformed_stream"
            result.error_message = "an event whose choices is not a list"
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            text = self._choice_text(choice)
            if text:
                now = time.perf_counter_ns()
                result.texts.append(text)
                result.chunk_ns.append(now)
                result.end_ns = now
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        return None

    # -- llama.cpp's llama-server: its native token-id API at the server root ----------------------------------
    @property
    def root_url(self) -> str:
        """The server root: the configured URL without a trailing ``/v1`` (llama-server's native endpoints)."""
        return self.settings.url.rstrip("/").removesuffix("/v1")

    async def _native(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[Any, int, int]:
        """One request to ``root_url + path``: the decoded JSON answer, bytes up, bytes down. Raises
        :class:`RequestError` (timeout, connection_*, http_NNN, response_too_large, malformed_response)."""
        payload = json.dumps(body).encode() if body is not None else b""
        url = self.root_url + path
        try:
            session = await self.session()
            async with session.request(
                method,
                url,
                data=payload if body is not None else None,
                headers=self._headers(),
                allow_redirects=False,
            ) as response:
                if 300 <= response.status < 400:
                    raise RequestError("redirect", redirect_message(response, f"{method} {path}"))
                raw = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    raw += chunk
                    if len(raw) > _MAX_NATIVE_ANSWER:
                        raise RequestError(
                            "response_too_large", f"{method} {path}: more than {_MAX_NATIVE_ANSWER} bytes"
                        )
                if response.status != 200:
                    text = clean_text(bytes(raw[:1200]).decode("utf-8", "replace"))
                    raise RequestError(f"http_{response.status}", f"{method} {path}: {text}")
        except asyncio.TimeoutError:
            raise RequestError(
                "timeout", f"{method} {path}: no complete answer within {self.settings.timeout:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            kind = "connection_refused" if "refused" in str(exc).lower() else "connection_error"
            raise RequestError(kind, f"{method} {path}: {exc}") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise RequestError("stream_cut", f"{method} {path}: the connection closed mid-answer: {exc}") from None
        except aiohttp.ClientError as exc:
            raise RequestError("connection_error", f"{method} {path}: {exc}") from None
        try:
            data = json.loads(bytes(raw))
        except ValueError:
            raise RequestError("malformed_response", f"{method} {path}: not JSON: {bytes(raw[:120])!r}") from None
        return data, len(payload), len(raw)

    def _model_field(self) -> dict[str, str]:
        """``{"model": …}`` when one is configured (the OpenAI-style bodies and vLLM's native ones carry it)."""
        return {"model": self.settings.model} if self.settings.model else {}

    async def tokenize(self, text: str, add_special: bool, *, api: str | None = None) -> list[int]:
        """The server's tokenization of ``text`` (``POST /tokenize``): llama-server takes ``content`` and
        ``add_special``, vLLM ``prompt`` and ``add_special_tokens``; both answer ``tokens``. ``api``: which of the
        two to speak (default: ``token_api``)."""
        if (api or self.token_api) == "vllm":
            body: dict[str, Any] = {"prompt": text, "add_special_tokens": add_special, **self._model_field()}
        else:
            body = {"content": text, "add_special": add_special}
        data, _, _ = await self._native("POST", "/tokenize", body)
        return _ids(data, "tokens", "POST /tokenize")

    async def detokenize(self, ids: list[int]) -> str:
        """The server's text of ``ids`` (``POST /detokenize``: llama-server answers ``content``, vLLM ``prompt``)."""
        vllm = self.token_api == "vllm"
        key = "prompt" if vllm else "content"
        body: dict[str, Any] = {"tokens": ids, **(self._model_field() if vllm else {})}
        data, _, _ = await self._native("POST", "/detokenize", body)
        content = data.get(key) if isinstance(data, dict) else None
        if not isinstance(content, str):
            raise RequestError("malformed_response", f"POST /detokenize: no string {key!r} in the answer")
        return content

    async def n_vocab(self) -> int | None:
        """The served model's vocabulary size (llama-server's ``GET /v1/models``: ``data[0].meta.n_vocab``), or
        None when the server does not say."""
        try:
            data, _, _ = await self._native("GET", "/v1/models")
            value = data["data"][0]["meta"]["n_vocab"]
        except (RequestError, KeyError, IndexError, TypeError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    async def complete_tokens(
        self, prompt_ids: list[int], n_predict: int, *, extra: dict[str, Any] | None = None
    ) -> TokenCompletion:
        """llama-server's ``POST /completion`` with a prompt of token ids, greedy: the ids it generates.

        ``temperature`` 0 with ``top_k`` 1, ``cache_prompt`` (the slot keeps the longest common prefix), and
        ``return_tokens``, and ``response_fields`` (the answer holds only the ids, ``stop_type`` and ``timings``);
        of ``cloud.extra`` only the sampling penalties that change greedy choices are passed on.
        Raises :class:`RequestError` on what the network or the server does.

        vLLM: ``POST /v1/completions`` with the ids as ``prompt``, greedy, ``return_token_ids``; its
        ``finish_reason`` "stop" is reported as ``stop_type`` "eos"."""
        if self.token_api == "vllm":
            ignore = bool((extra or {}).get("ignore_eos"))
            completion, _ = await self._vllm_completion(prompt_ids, n_predict, prompt_logprobs=None, ignore_eos=ignore)
            return completion
        body: dict[str, Any] = {
            "prompt": prompt_ids,
            "n_predict": n_predict,
            "temperature": 0,
            "top_k": 1,
            "cache_prompt": True,
            "return_tokens": True,
            "stream": False,
            # only what is read: the full answer (generation settings, prompt text, …) is ~6× larger
            "response_fields": ["tokens", "stop_type", "timings"],
        }
        body.update({k: v for k, v in self.settings.extra.items() if k in _TOKEN_EXTRA})
        body.update(extra or {})
        start = time.perf_counter_ns()
        data, up, down = await self._native("POST", "/completion", body)
        ids = _ids(data, "tokens", "POST /completion")
        stop_type = data.get("stop_type")
        timings = data.get("timings")
        return TokenCompletion(
            ids=ids,
            stop_type=stop_type if isinstance(stop_type, str) else None,
            timings=timings if isinstance(timings, dict) else None,
            bytes_up=up,
            bytes_down=down,
            start_ns=start,
            end_ns=time.perf_counter_ns(),
        )

    async def _vllm_completion(
        self, prompt_ids: list[int], max_tokens: int, *, prompt_logprobs: int | None, ignore_eos: bool
    ) -> tuple[TokenCompletion, list[Any] | None]:
        """vLLM's ``POST /v1/completions`` with an id prompt, greedy: the generated ids (``return_token_ids``) and,
        with ``prompt_logprobs`` = n, one entry per prompt position (None for the first, else ``{id: {"logprob",
        "rank", …}}`` holding the prompt's own id and the n most likely ids)."""
        body: dict[str, Any] = {
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
            **self._model_field(),
        }
        if prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs
        if ignore_eos:
            body["ignore_eos"] = True
        body.update({k: v for k, v in self.settings.extra.items() if k in _TOKEN_EXTRA})
        start = time.perf_counter_ns()
        data, up, down = await self._native("POST", "/v1/completions", body)
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise RequestError("malformed_response", "POST /v1/completions: no choices[0] in the answer") from None
        ids = _ids(choice, "token_ids", "POST /v1/completions")
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        rows = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if prompt_logprobs is not None and (not isinstance(rows, list) or len(rows) != len(prompt_ids)):
            raise RequestError(
                "malformed_response",
                f"POST /v1/completions: prompt_logprobs is not a list of {len(prompt_ids)} rows (one per prompt id)",
            )
        completion = TokenCompletion(
            ids=ids,
            stop_type="eos" if finish == "stop" else ("limit" if finish == "length" else None),
            timings=None,
            bytes_up=up,
            bytes_down=down,
            start_ns=start,
            end_ns=time.perf_counter_ns(),
        )
        return completion, rows

    async def verify_draft(
        self, context_ids: list[int], draft_ids: list[int], exclude: frozenset[int]
    ) -> TokenCompletion:
        """vLLM, one forward pass: the target's greedy id at each draft position (from ``prompt_logprobs`` of
        ``context + draft``), then its next id after the whole draft (generated, greedy). Ids in ``exclude``
        (end-of-generation ids under ``ignore_eos``) are never chosen. The answer's ``ids`` has ``len(draft) + 1``
        entries; only the first ``accepted + 1`` mean anything — each assumes the draft before it."""
        top = 1 + len(exclude)
        answer, rows = await self._vllm_completion(
            context_ids + draft_ids, 1, prompt_logprobs=top, ignore_eos=bool(exclude)
        )
        assert rows is not None
        greedy = [_top_id(rows[len(context_ids) + j], exclude) for j in range(len(draft_ids))]
        answer.ids = greedy + answer.ids[:1]
        return answer

    async def _probe_vllm(self) -> tuple[bool, str]:
        root = self.root_url
        try:
            ids = await self.tokenize("Hello world", add_special=False, api="vllm")
            if not ids:
                raise RequestError("malformed_response", "no ids for a non-empty text")
            answer, rows = await self._vllm_completion(ids, 1, prompt_logprobs=1, ignore_eos=False)
            _top_id(rows[-1] if rows else None, frozenset())
        except RequestError as exc:
            return False, f"vLLM: {exc.error_type}: {exc.message[:120]}"
        if len(answer.ids) != 1 and answer.stop_type != "eos":
            return False, f"vLLM: POST {root}/v1/completions answered {len(answer.ids)} ids for max_tokens 1"
        return True, (
            f"{root} answers vLLM's /tokenize and /v1/completions with token-id prompts, prompt_logprobs and "
            "return_token_ids"
        )

    async def probe_token_api(self) -> tuple[bool, str]:
        """Whether the endpoint speaks a token-id protocol — llama-server's, else vLLM's (``token_api`` is set to
        the one found) — and why (or why not). Never raises."""
        supported, why = await self._probe_llama_server()
        if supported:
            self.token_api = "llama-server"
            return supported, why
        vllm, vllm_why = await self._probe_vllm()
        if vllm:
            self.token_api = "vllm"
            return vllm, vllm_why
        return False, f"{why}; {vllm_why}"

    async def _probe_llama_server(self) -> tuple[bool, str]:
        root = self.root_url
        try:
            ids = await self.tokenize("Hello", add_special=False)
        except RequestError as exc:
            return False, f"POST {root}/tokenize did not answer token ids ({exc.error_type}: {exc.message[:120]})"
        if not ids:
            return False, f"POST {root}/tokenize answered no ids for a non-empty text"
        try:
            answer = await self.complete_tokens(ids, 1)
        except RequestError as exc:
            return False, (
                f"POST {root}/completion with a token-id prompt failed ({exc.error_type}: {exc.message[:120]})"
            )
        if len(answer.ids) != 1 and answer.stop_type != "eos":
            return False, f"POST {root}/completion with return_tokens answered {len(answer.ids)} ids for n_predict 1"
        return True, f"{root} answers /tokenize and /completion with token-id prompts and return_tokens"

    async def probe_text_protocol(self, protocol: str) -> tuple[bool, str]:
        """Whether the endpoint answers what the text protocol ``protocol`` reads, and why (or why not); one small
        request before any timed one. Never raises.

        ``generate`` reads the generated tokens' pieces (``logprobs=1``); ``logprobs`` reads the prompt's rows as well
        (``echo`` + ``logprobs=1``), which llama.cpp's ``llama-server`` does not send (it ignores ``echo``)."""
        url = self.settings.url.rstrip("/") + "/completions"
        echo = protocol == "logprobs"
        asked = "echo + logprobs=1" if echo else "logprobs=1"
        extra: dict[str, Any] = {"logprobs": 1, "echo": True} if echo else {"logprobs": 1}
        result = await self.complete(TEXT_PROBE, max_tokens=1 if echo else 2, stream=False, extra=extra)
        if not result.ok:
            return False, f"POST {url} with {asked} failed ({result.error_type}: {(result.error_message or '')[:120]})"
        generated = logprob_tokens(result.logprobs)
        if not echo:
            if generated or not result.text:
                return True, f"POST {url} answers the generated tokens' pieces ({asked})"
            return False, f"POST {url} answered text but no per-token logprobs ({asked})"
        lp = result.logprobs if isinstance(result.logprobs, dict) else {}
        tokens, tops = lp.get("tokens"), lp.get("top_logprobs")
        if isinstance(tokens, list) and isinstance(tops, list) and len(tokens) == len(tops) and len(tokens) > 1:
            return True, f"POST {url} echoes the prompt's logprobs ({asked}: {len(tokens)} rows)"
        if generated:
            return False, (
                f"POST {url} answered logprobs for the generated token only: it ignores echo, so the prompt's "
                "logprobs that this protocol reads never come (llama.cpp's llama-server does this)"
            )
        return False, f"POST {url} answered no logprobs ({asked})"


class LoopRunner:
    """Runs coroutines on one event loop from synchronous code (the benchmark's request loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


_MAX_NATIVE_ANSWER = 8 * 1024 * 1024  # bytes: far more than any answer of the token protocol
# ``cloud.extra`` keys that make sense for greedy verification in token space: penalties change the greedy choice
_TOKEN_EXTRA = frozenset(
    {"repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty", "penalize_nl", "logit_bias", "seed"}
)


@dataclass
class TokenCompletion:
    """One greedy ``/completion`` in token space (llama-server). Times are ``perf_counter_ns`` stamps."""

    ids: list[int]
    stop_type: str | None  # "limit" (n_predict ran out), "eos", "word", …
    timings: dict[str, Any] | None  # the server's own ``timings``
    bytes_up: int
    bytes_down: int
    start_ns: int
    end_ns: int


def _top_id(row: Any, exclude: frozenset[int]) -> int:
    """The most likely id of one vLLM ``prompt_logprobs`` row (``{"id": {"rank": int, …}, …}``), skipping
    ``exclude``; lowest rank first, then lowest id (argmax order). :class:`RequestError` when the row has none."""
    best: tuple[int, int] | None = None
    if isinstance(row, dict):
        for key, entry in row.items():
            rank = entry.get("rank") if isinstance(entry, dict) else None
            if not isinstance(key, str) or not key.isdigit() or isinstance(rank, bool) or not isinstance(rank, int):
                raise RequestError(
                    "malformed_response", "POST /v1/completions: a prompt_logprobs row is not {id: rank}"
                )
            token = int(key)
            if token not in exclude and (best is None or (rank, token) < best):
                best = (rank, token)
    if best is None:
        raise RequestError("malformed_response", "POST /v1/completions: a prompt_logprobs row without a usable id")
    return best[1]


def _ids(data: Any, key: str, what: str) -> list[int]:
    """``data[key]`` as a list of ints, else :class:`RequestError` ``malformed_response``."""
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise RequestError("malformed_response", f"{what}: no list of integer token ids in {key!r}")
    return value
