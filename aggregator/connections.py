"""Connection limits of the aggregator's HTTP server: what aiohttp's server does not bound by itself.

aiohttp waits for a request's headers and body as long as the client likes (a new connection that sends nothing, or
sends its headers a byte at a time, stays open for good), and accepts connections until the process runs out of
file descriptors. Here, around each connection (:class:`ConnectionGuard`, its protocol wrapper and its middleware):

* **header timeout** (``server.header_timeout``): a request's headers must arrive whole within this long of the
  connection opening, or of the first byte after the previous response; otherwise ``408`` and the connection closes;
* **body timeout** (``server.body_timeout``): a request's body must arrive whole within this long of its headers;
  otherwise the connection is closed (the handler's read fails);
* **idle / slow reader**: after a response, a connection that neither sends its next request nor takes the
  response within ``KEEPALIVE_S`` (aiohttp's keep-alive time) is closed;
* **connection cap** (``server.max_connections``, by default sized from the open-file limit): a connection beyond
  the cap closes the one that has waited longest for its request (headers or body still arriving, or idle after a
  response); when every open connection is busy with a request, the new one gets ``503`` and is closed at once.

:func:`raise_open_files` lifts the soft RLIMIT_NOFILE to the hard limit at start; :class:`RepeatFilter` lets a
repeated warning or error through once per interval, with the count of those it held back (a flood of identical
lines — "Too many open files" — must not fill the disk). docs/connections.md describes them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .metrics import PREFIX

log = logging.getLogger("aggregator.connections")

KEEPALIVE_S = 75.0  # aiohttp's own keep-alive time, passed to it explicitly so both agree
BUDGET_CHECK_S = 0.5  # after a response, how soon the bytes not yet taken are checked against max_unsent_bytes
BUDGET_MIN_ANSWER = 64 * 1024  # smaller answers are not counted (they fit in the socket's own buffers)
FD_RESERVE_MIN = 96  # descriptors kept for the database, the log, outgoing connections, connections being accepted
AUTO_MAX_CONNECTIONS = 4096  # the cap when sized from a large open-file limit


@dataclass(frozen=True)
class OpenFiles:
    """The process's RLIMIT_NOFILE after :func:`raise_open_files`: ``soft`` (in force), ``hard``, ``before`` (the soft
    limit found at start) and, when raising failed, why."""

    soft: int
    hard: int
    before: int
    error: str | None = None


def raise_open_files() -> OpenFiles:
    """Raises the soft open-file limit to the hard limit (a unit's ``LimitNOFILE`` sets both; a shell's ``ulimit -n``
    often leaves the soft one at 1024). An unlimited hard limit is taken as 1,048,576. Never fails: a refusal
    (a seccomp filter, a platform without ``resource``) is returned in ``error`` and the limit stays as it was."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return OpenFiles(1024, 1024, 1024, "the resource module is unavailable")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        value = target if soft == resource.RLIM_INFINITY else soft
        return OpenFiles(value, target, value)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        return OpenFiles(soft, target, soft, f"{type(exc).__name__}: {exc}")
    return OpenFiles(target, target, soft)


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE in force (1024 where it cannot be read)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return 1024
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def accept_batch(open_files: int) -> int:
    """How many connections asyncio may accept at one wake-up: they hold descriptors for two or three turns of the
    loop before the guard sees them, and as many again are closing, so a few batches must fit in the reserve: a
    sixteenth of it, between 4 and 128."""
    return max(4, min(128, max(FD_RESERVE_MIN, open_files // 8) // 16))


def connection_cap(configured: int | None, open_files: int) -> tuple[int, str]:
    """The connection cap and how it was chosen: at most the open-file limit less a reserve (``FD_RESERVE_MIN`` or an
    eighth of the limit, whichever is larger), so the database, the log, outgoing connections and the connections
    being accepted or closed always find a descriptor; ``configured`` None (``auto``): that, at most
    ``AUTO_MAX_CONNECTIONS``."""
    room = max(8, open_files - max(FD_RESERVE_MIN, open_files // 8))
    if configured is None:
        cap = min(AUTO_MAX_CONNECTIONS, room)
        return cap, f"auto: open-file limit {open_files} less a reserve of {open_files - room}"
    if configured > room:
        return room, (
            f"server.max_connections = {configured} lowered to {room}: the open-file limit is {open_files} "
            f"and {open_files - room} descriptors stay reserved (raise LimitNOFILE to allow more)"
        )
    return configured, "server.max_connections"


# connection states
HEADERS = "headers"  # waiting for a request's headers (new, or the first byte after a response came)
REQUEST = "request"  # a handler is running
AFTER = "after"  # the handler returned: its response is being written, then the keep-alive wait


class _Connection:
    """One accepted connection: its state and its single deadline."""

    __slots__ = ("answer_bytes", "peer", "request", "resumed", "seen", "since", "state", "timer", "transport")

    def __init__(self, transport: asyncio.BaseTransport, now: float) -> None:
        self.transport = transport
        self.state = HEADERS
        self.since = now
        self.timer: asyncio.TimerHandle | None = None
        self.request: web.BaseRequest | None = None  # while its body is still arriving
        self.resumed = 0  # times the client took enough of what was written for writing to resume
        self.seen: tuple[int, int] | None = None  # (resumed, bytes unsent) at the last check after a response
        self.answer_bytes = 0  # the size of the last answer's body (held in memory until the client takes it)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"

    def body_pending(self) -> bool:
        return self.request is not None and not self.request.content.is_eof()


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to ``transport`` that its client has not taken: the transport's buffer and, on Linux, the
    kernel's send queue (which can hold megabytes: a slow reader drains it long before the buffer moves)."""
    unsent = int(transport.get_write_buffer_size())  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(ImportError, OSError, ValueError, AttributeError):
            import fcntl
            import termios

            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return unsent


_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 55\r\n\r\ntoo many connections (server.max_connections); retry\r\n\r\n"
)


class ConnectionGuard:
    """Bounds the server's connections (see the module's text). ``wrap(make_handler)`` is the protocol factory to
    listen with; :meth:`middleware` (installed by ``create_app``) tells the guard when a request's headers have
    arrived and when its handler is done."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 60.0,
        keepalive_s: float = KEEPALIVE_S,
        accept_batch: int = 16,
        max_unsent_bytes: int = 256 * 1024**2,
    ) -> None:
        self.max_connections = max_connections
        self.max_unsent_bytes = max_unsent_bytes
        self._budget_check: asyncio.TimerHandle | None = None
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.keepalive_s = keepalive_s
        self.open: dict[asyncio.BaseTransport, _Connection] = {}
        # connections that may be closed for a new one, oldest first: waiting for headers, or after a response
        self._waiting: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self._bodies: collections.OrderedDict[_Connection, None] = collections.OrderedDict()  # bodies arriving
        self.closed: collections.Counter[str] = collections.Counter()  # why connections were closed by the guard
        self.accepted = 0
        self.peak = 0
        self.how = "server.max_connections"  # how the cap was chosen (connection_cap), for the start-up line
        self.accept_batch = accept_batch

    # -- the protocol side ------------------------------------------------------------------------------------

    def wrap(self, make_handler: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory to listen with: each connection's aiohttp handler, made only once admitted."""
        return lambda: _GuardedProtocol(self, make_handler)

    def _admit(self, transport: asyncio.BaseTransport) -> _Connection | None:
        if len(self.open) >= self.max_connections and not self._evict():
            self.closed["refused"] += 1
            log.warning(
                "connection refused: %d connections are open (server.max_connections) and every one is busy",
                len(self.open),
            )
            with contextlib.suppress(Exception):
                transport.write(_TOO_MANY)  # type: ignore[attr-defined]
            transport.close()
            return None
        conn = _Connection(transport, time.monotonic())
        self.open[transport] = conn
        self.accepted += 1
        self.peak = max(self.peak, len(self.open))
        self._enter(conn, HEADERS, self.header_timeout_s, self._headers_late)
        return conn

    def _evict(self) -> bool:
        """Closes the connection that has waited longest for its request (headers, then bodies); False if none."""
        victim = next(iter(self._waiting), None)
        if victim is None:
            victim = next((c for c in self._bodies if c.body_pending()), None)
        if victim is None:
            return False
        self.closed["evicted"] += 1
        log.warning(
            "connection closed for a new one: %d connections are open (server.max_connections); "
            "the longest waiting for its request goes",
            len(self.open),
        )
        self._cut(victim, _REQUEST_TIMEOUT if victim.state == HEADERS else None)
        return True

    def _lost(self, transport: asyncio.BaseTransport) -> None:
        conn = self.open.pop(transport, None)
        if conn is not None:
            self._leave(conn)

    def _data(self, transport: asyncio.BaseTransport) -> None:
        conn = self.open.get(transport)
        if conn is not None and conn.state == AFTER:  # the next request begins: its headers are now timed
            self._enter(conn, HEADERS, self.header_timeout_s, self._headers_late)

    # -- states and deadlines -------------------------------------------------------------------------------

    def _leave(self, conn: _Connection) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._waiting.pop(conn, None)
        self._bodies.pop(conn, None)
        conn.request = None

    def _enter(
        self, conn: _Connection, state: str, timeout_s: float | None, late: Callable[[_Connection], None] | None
    ) -> None:
        self._leave(conn)
        conn.state, conn.since = state, time.monotonic()
        if state in (HEADERS, AFTER):
            self._waiting[conn] = None
        if timeout_s is not None and late is not None:
            conn.timer = asyncio.get_running_loop().call_later(timeout_s, late, conn)

    def _cut(self, conn: _Connection, answer: bytes | None) -> None:
        self._leave(conn)
        self.open.pop(conn.transport, None)
        if answer is not None:
            with contextlib.suppress(Exception):
                conn.transport.write(answer)  # type: ignore[attr-defined]
            conn.transport.close()
        else:
            conn.transport.abort()  # type: ignore[attr-defined]

    def _headers_late(self, conn: _Connection) -> None:
        self.closed["header_timeout"] += 1
        log.warning(
            "connection closed: no complete request headers within server.header_timeout (%g s)",
            self.header_timeout_s,
        )
        self._cut(conn, _REQUEST_TIMEOUT)

    def _body_late(self, conn: _Connection) -> None:
        if not conn.body_pending():
            return
        self.closed["body_timeout"] += 1
        log.warning(
            "connection closed: request body not received within server.body_timeout (%g s)", self.body_timeout_s
        )
        self._cut(conn, None)

    def _idle(self, conn: _Connection) -> None:
        """An idle keep-alive (aiohttp closes it now too), or a response still being written: one the client keeps
        taking (fewer bytes unsent than at the last check, or writing resumed meanwhile) gets another period, one it
        stopped taking is cut."""
        if not conn.transport.get_write_buffer_size():  # type: ignore[attr-defined]
            self.closed["idle"] += 1  # closed gracefully: what the kernel still holds reaches the client, then EOF
            self._leave(conn)
            self.open.pop(conn.transport, None)
            conn.transport.close()
            return
        unsent = _unsent(conn.transport)
        seen, conn.seen = conn.seen, (conn.resumed, unsent)
        if seen is None or conn.resumed != seen[0] or unsent < seen[1]:  # it took some since the last check
            conn.timer = asyncio.get_running_loop().call_later(self.keepalive_s, self._idle, conn)
            return
        self.closed["stalled"] += 1
        self._cut(conn, None)

    # -- the request side (middleware) ------------------------------------------------------------------------

    def started(self, request: web.BaseRequest) -> _Connection | None:
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is None:
            return None
        if request.body_exists and not request.content.is_eof():
            self._enter(conn, REQUEST, self.body_timeout_s, self._body_late)
            conn.request = request
            self._bodies[conn] = None
        else:
            self._enter(conn, REQUEST, None, None)
        return conn

    def finished(self, conn: _Connection) -> None:
        if self.open.get(conn.transport) is conn:
            self._enter(conn, AFTER, self.keepalive_s, self._idle)
            conn.seen = None
            if self._budget_check is None:  # once the answer is written (right after the handler returns)
                self._budget_check = asyncio.get_running_loop().call_later(BUDGET_CHECK_S, self._check_budget)

    def _check_budget(self) -> None:
        """Answers written and not yet taken stay in this process's memory until their clients take them: all
        together they are bounded by ``max_unsent_bytes``. Past it, the connections holding the most are closed
        (a client reading a large answer a byte a minute would otherwise hold it for hours, and many of them would
        hold gigabytes)."""
        self._budget_check = None
        # an answer is held whole (the response keeps its body) while any of it is still to be taken
        after = [c for c in self.open.values() if c.state == AFTER and c.answer_bytes >= BUDGET_MIN_ANSWER]
        held = {c: c.answer_bytes if _unsent(c.transport) else 0 for c in after}
        total = sum(held.values())
        if total <= self.max_unsent_bytes:
            return
        for conn in sorted(after, key=lambda c: held[c], reverse=True):
            if total <= self.max_unsent_bytes or not held[conn]:
                break
            total -= held[conn]
            self.closed["unsent_budget"] += 1
            log.warning(
                "connection closed: answers not yet taken by their clients exceed server.max_unsent_bytes (%d bytes); "
                "this one held %d",
                self.max_unsent_bytes,
                held[conn],
            )
            self._cut(conn, None)
        if total > self.max_unsent_bytes // 2:  # still close to it: look again soon
            self._budget_check = asyncio.get_running_loop().call_later(BUDGET_CHECK_S, self._check_budget)

    def _resumed(self, transport: asyncio.BaseTransport) -> None:
        conn = self.open.get(transport)
        if conn is not None:
            conn.resumed += 1

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        conn = self.started(request)
        try:
            response = await handler(request)
            if conn is not None:
                body = getattr(response, "body", None)
                conn.answer_bytes = len(body) if isinstance(body, (bytes, bytearray)) else 0
            return response
        finally:
            if conn is not None:
                self.finished(conn)

    def snapshot(self) -> dict[str, Any]:
        """Open connections by state, the cap, and the guard's closes by reason since start."""
        states = collections.Counter(c.state for c in self.open.values())
        return {
            "open": len(self.open),
            "max_connections": self.max_connections,
            "peak": self.peak,
            "accepted": self.accepted,
            "by_state": dict(states),
            "closed": dict(self.closed),
        }


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's handler for one connection, behind the guard: admitted or refused at ``connection_made``; every
    call passed on."""

    def __init__(self, guard: ConnectionGuard, make_handler: Callable[[], asyncio.Protocol]) -> None:
        self.guard, self.make_handler = guard, make_handler
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.guard._admit(transport) is None:
            return
        self.inner = self.make_handler()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None and self.transport is not None:
            self.guard._data(self.transport)
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard._lost(self.transport)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.guard._resumed(self.transport)
        if self.inner is not None:
            self.inner.resume_writing()


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through ``guard``, and whose TLS handshakes are bounded by the header
    timeout (asyncio's default would be 60 s).

    asyncio accepts up to its ``backlog`` connections at each wake-up before any of them is seen by the guard, so that
    number must fit in the descriptors kept in reserve: it is ``guard.accept_batch``. The kernel's queue of connections
    not yet accepted is set apart, to ``listen_backlog`` (capped by net.core.somaxconn): aiohttp's 128 fills within
    milliseconds of a flood, and a device's connection then waits for the kernel's SYN retries (1, 3, 7 s)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        listen_backlog: int = 1024,
        **kw: Any,
    ) -> None:
        super().__init__(runner, host, port, backlog=guard.accept_batch, **kw)
        self.guard, self.listen_backlog = guard, listen_backlog

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner (what TCPSite.start does first)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        extra: dict[str, Any] = {}
        if self._ssl_context is not None:
            extra["ssl_handshake_timeout"] = self.guard.header_timeout_s
        self._server = await loop.create_server(
            self.guard.wrap(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            **extra,
        )
        for listening in self._server.sockets:  # the kernel's queue, apart from asyncio's accepts per wake-up
            with socket.fromfd(listening.fileno(), listening.family, listening.type) as same:
                same.listen(self.listen_backlog)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port  # TCPSite.port (aiohttp ≥ 3.12)


_NUMBERS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Lets a warning or error through once per ``interval_s`` for each distinct line (its logger, level and text with
    numbers ignored, and its exception's type); the next one let through says how many were held back meanwhile.
    Keeps at most ``max_lines`` distinct lines (the least recent forgotten). Records below WARNING pass untouched."""

    def __init__(self, interval_s: float = 10.0, max_lines: int = 1024, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s, self.max_lines, self.clock = interval_s, max_lines, clock
        self._lines: collections.OrderedDict[tuple[Any, ...], list[float]] = collections.OrderedDict()  # [last, held]
        self.held_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            text = record.getMessage()
        except Exception:  # a bad format string is the logging module's to report
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        key = (record.name, record.levelno, _NUMBERS.sub("#", text[:500]), exc)
        now = self.clock()
        seen = self._lines.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            seen[1] += 1
            self.held_total += 1
            self._lines.move_to_end(key)
            return False
        held = int(seen[1]) if seen is not None else 0
        self._lines[key] = [now, 0]
        self._lines.move_to_end(key)
        while len(self._lines) > self.max_lines:
            self._lines.popitem(last=False)
        if held:
            assert seen is not None
            record.msg = f"{text} [{held} more like this in the last {now - seen[0]:.0f} s not logged]"
            record.args = None
        return True


def install_repeat_filter(interval_s: float, logger: logging.Logger | None = None) -> RepeatFilter:
    """Puts one :class:`RepeatFilter` on every handler of ``logger`` (the root logger): records propagated from any
    logger pass through it."""
    target = logger or logging.getLogger()
    repeat = RepeatFilter(interval_s)
    for handler in target.handlers:
        handler.addFilter(repeat)
    return repeat


class ConnectionsCollector:
    """The guard's and the live stream's counts on ``/metrics``: open connections by state and the cap, connections
    the guard closed by reason, and the stream's subscribers, refusals, drops, events and refetch notices."""

    def __init__(self, guard: Callable[[], dict[str, Any]], stream: Callable[[], dict[str, int]]) -> None:
        self.guard, self.stream = guard, stream

    def collect(self) -> Iterable[Any]:
        guard, stream = self.guard(), self.stream()
        open_ = GaugeMetricFamily(
            f"{PREFIX}_connections_open",
            "Open connections by state (headers: awaiting a request; request: being served; after: after a response)",
            labels=["state"],
        )
        for state in (HEADERS, REQUEST, AFTER):
            open_.add_metric([state], guard["by_state"].get(state, 0))
        yield open_
        yield GaugeMetricFamily(
            f"{PREFIX}_connections_max", "The connection cap (server.max_connections)", value=guard["max_connections"]
        )
        closed = CounterMetricFamily(
            f"{PREFIX}_connections_closed",
            "Connections the server closed or refused, by reason (docs/connections.md)",
            labels=["reason"],
        )
        for reason in ("header_timeout", "body_timeout", "idle", "stalled", "evicted", "refused"):
            closed.add_metric([reason], guard["closed"].get(reason, 0))
        yield closed
        yield GaugeMetricFamily(f"{PREFIX}_stream_subscribers", "Open live streams", value=stream["subscribers"])
        yield GaugeMetricFamily(
            f"{PREFIX}_stream_max_subscribers", "server.max_subscribers", value=stream["max_subscribers"]
        )
        for name, key, text in (
            ("stream_refused", "refused", "Live streams refused at server.max_subscribers (503)"),
            ("stream_dropped", "dropped", "Live streams closed because their client fell too far behind"),
            ("stream_events", "events", "Live updates sent (each serialized once for every subscriber)"),
            ("stream_refetch_notices", "refetch_notices", "Live updates sent as refetch notices (row too large)"),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=stream[key])
