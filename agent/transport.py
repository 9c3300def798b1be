"""A small HTTP/1.1 client on the standard library, for the sync client and the campaign job client.

The long-running service uploads a batch a minute; holding aiohttp (and its ~8.5 MB) for that is a cost the model
pays on a 4 GB device. This client does what those callers need and nothing else:

* each exchange runs on its own short-lived thread with blocking ``http.client`` I/O, so the event loop never waits
  on the network, and the awaiting coroutine gets the answer through a future;
* one keep-alive connection per (scheme, host, port) is kept and reused; before it is reused it is checked, and a
  connection the server closed is replaced without sending anything on it (see :meth:`HttpClient.request` for when an
  exchange that failed on a reused connection is retried);
* redirects are never followed (a ``3xx`` is the answer), no proxy and no environment variable is read;
* ``timeout`` is a hard deadline on the whole exchange: a timer on the event loop shuts the socket when it passes,
  so a server that trickles one byte at a time cannot hold a request longer; ``connect_timeout`` bounds TCP + TLS;
* the body is read up to ``max_body`` bytes, one more to know there was more; an answer cut there closes its
  connection (never reused with unread bytes). No ``Accept-Encoding`` is sent and nothing is decoded;
* cancelling the awaiting task shuts the socket, so the thread ends at once.

Errors::

    OSError
     ├── TransportError            the network failed: refused, reset, closed early, not HTTP, cannot resolve
     │    └── TransportTLSError    the TLS handshake failed (an unknown CA, a wrong host name, not TLS)
     └── TimeoutError (= asyncio.TimeoutError)
          └── TransportTimeout     the deadline passed (connect or the whole exchange)
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import __version__

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_READ_STEP = 64 * 1024


class TransportError(OSError):
    """The exchange failed on the network; the message says how, in a few words."""


class TransportTLSError(TransportError):
    """The TLS handshake failed (certificate not trusted, wrong host name, the server does not speak TLS)."""


class TransportTimeout(TimeoutError):
    """The deadline passed before the exchange completed."""


@dataclass(frozen=True)
class HttpAnswer:
    """A response: its status, headers (``headers.get("location")`` is case-insensitive), the body read up to the
    request's ``max_body`` (``truncated`` when there was more), and the mime type lowercased without parameters
    (``""`` when the answer carries no ``Content-Type``)."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    truncated: bool
    content_type: str


def mime_type(value: str | None) -> str:
    if not value:
        return ""
    return value.split(";", 1)[0].strip().lower()


class _Connection(http.client.HTTPConnection):
    """An ``HTTPConnection`` on a socket this module opened; never reconnects by itself, counts the bytes the kernel
    accepted so a failed send knows whether anything of the request left."""

    auto_open = 0

    def __init__(self, key: tuple[str, str, int], sock: socket.socket) -> None:
        super().__init__(key[1], key[2])
        self.key = key
        self.sock = sock
        self.bytes_sent = 0
        self.exchanges = 0

    def send(self, data: Any) -> None:
        if self.sock is None:
            raise http.client.NotConnected()
        view = memoryview(data if isinstance(data, (bytes, bytearray)) else bytes(data))
        while view:
            n = self.sock.send(view)
            self.bytes_sent += n
            view = view[n:]

    def alive(self) -> bool:
        """Whether the idle connection is still open with nothing unread on it (checked before it is reused)."""
        sock = self.sock
        if sock is None:
            return False
        try:
            sock.setblocking(False)
            try:
                sock.recv(1)
            finally:
                sock.setblocking(True)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True  # nothing to read: open (a TLS 1.3 session ticket read here is consumed, not data)
        except OSError:
            return False
        return False  # b"": the server closed it; any byte: something unasked-for, not to be taken as an answer


class _Exchange:
    """One request's state shared between its thread and the event loop; the lock orders the thread's hand-over of
    its connection against the loop's deadline and cancellation."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.done = False  # the thread finished: its connection is no longer this exchange's
        self.expired = False
        self.aborted = False

    @property
    def stopped(self) -> bool:
        return self.expired or self.aborted

    def attach(self, sock: socket.socket | None) -> bool:
        """Make ``sock`` the one to shut at the deadline; False when the exchange already stopped."""
        with self.lock:
            if self.stopped:
                return False
            self.sock = sock
            return True

    def stop(self, *, expired: bool) -> bool:
        """Called on the event loop: shut the socket so the thread's blocking call returns now. False when the thread
        had already finished."""
        with self.lock:
            if self.done:
                return False
            if expired:
                self.expired = True
            else:
                self.aborted = True
            if self.sock is not None:
                # the plain socket's shutdown (an SSLSocket's own would drop its TLS state under the reading thread)
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            return True

    def finish(self) -> bool:
        """Called by the thread when the exchange ended; False when the loop stopped it first."""
        with self.lock:
            self.done = True
            self.sock = None
            return not self.stopped


class HttpClient:
    """HTTP/1.1 requests with a hard deadline, bounded answers and one keep-alive connection per origin.

    ``ssl_context`` verifies ``https://`` origins (``None``: the system's default context); it is unused for
    ``http://``. Use ``async with`` or call :meth:`close`.
    """

    def __init__(
        self,
        timeout: float,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None,
        user_agent: str = f"lens-agent/{__version__}",
    ) -> None:
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError(
                f"timeout and connect_timeout must be positive seconds, not {timeout!r}, {connect_timeout!r}"
            )
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.ssl_context = ssl_context
        self.user_agent = user_agent
        self._idle: dict[tuple[str, str, int], _Connection] = {}
        self._active: set[_Exchange] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.connections_opened = 0  # for tests and figures: TCP connections this client opened

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the idle connections and stop the exchanges in flight."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle.values()), {}
            active = list(self._active)
        for conn in idle:
            conn.close()
        for exchange in active:
            exchange.stop(expired=False)

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        max_body: int,
    ) -> HttpAnswer:
        """Send one request and read its answer (up to ``max_body`` bytes of body).

        A connection found closed before anything is sent on it is replaced silently. When an exchange fails on a
        *reused* connection (the server closed it while the request was under way), it is retried once on a new
        connection if the method is idempotent and no answer had begun, or — for any method, POST included — if not a
        byte of the request had been accepted by the kernel: a request that may have reached the server is never sent
        twice by this client. Redirects are returned, not followed.

        Raises :class:`TransportTimeout` at the deadline, :class:`TransportTLSError` when TLS fails and
        :class:`TransportError` for every other network failure.
        """
        method = method.upper()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(f"not an http:// or https:// URL: {url[:200]!r}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise TransportError(f"not a valid port in {url[:200]!r}") from None
        key = (scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if max_body < 0:
            raise ValueError(f"max_body must be ≥ 0, not {max_body}")
        if self._closed:
            raise TransportError("the HTTP client is closed")

        loop = asyncio.get_running_loop()
        future: asyncio.Future[HttpAnswer] = loop.create_future()
        exchange = _Exchange()
        deadline = time.monotonic() + self.timeout

        def deliver(result: HttpAnswer | BaseException) -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        def run() -> None:
            try:
                result: HttpAnswer | BaseException = self._exchange(
                    exchange, key, method, target, body, headers or {}, max_body, deadline
                )
            except BaseException as exc:  # handed to the awaiting coroutine, never lost in the thread
                result = exc
            exchange.finish()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(deliver, result)

        def expire() -> None:
            if exchange.stop(expired=True):
                deliver(TransportTimeout(f"no complete answer from {parts.hostname}:{port} within {self.timeout:g} s"))

        with self._lock:
            self._active.add(exchange)
        timer = loop.call_later(self.timeout, expire)
        thread = threading.Thread(target=run, name=f"lens-http {method} {parts.hostname}:{port}", daemon=True)
        try:
            thread.start()
            return await future
        except asyncio.CancelledError:
            exchange.stop(expired=False)
            raise
        finally:
            timer.cancel()
            with self._lock:
                self._active.discard(exchange)

    # -- on the exchange's thread ---------------------------------------------------------------------------------
    def _exchange(
        self,
        exchange: _Exchange,
        key: tuple[str, str, int],
        method: str,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str],
        max_body: int,
        deadline: float,
    ) -> HttpAnswer:
        conn = self._take_idle(key)
        reused = conn is not None
        retried = False
        while True:
            if conn is None:
                conn = self._connect(exchange, key, deadline)
            elif not exchange.attach(conn.sock):
                conn.close()
                raise self._stopped(exchange)
            sent_before = conn.bytes_sent
            answer_begun = False
            try:
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                self._send(conn, method, target, body, headers)
                response = conn.getresponse()
                answer_begun = True
                answer = self._read(response, max_body)
            except BaseException as exc:
                conn.close()
                if exchange.stopped:
                    exchange.finish()
                    raise self._stopped(exchange) from None
                nothing_sent = conn.bytes_sent == sent_before
                may_retry = (method in IDEMPOTENT and not answer_begun) or nothing_sent
                if (
                    reused
                    and not retried
                    and may_retry
                    and isinstance(exc, (ConnectionError, http.client.HTTPException))
                ):
                    retried, reused, conn = True, False, None
                    continue
                exchange.finish()
                raise self._translate(exc, key, deadline) from None
            conn.exchanges += 1
            if not exchange.finish():
                conn.close()
                raise self._stopped(exchange)
            if answer.truncated or conn.sock is None or not response.isclosed():
                conn.close()
                response.close()
            else:
                self._keep(conn)
            return answer

    def _stopped(self, exchange: _Exchange) -> BaseException:
        if exchange.expired:
            return TransportTimeout(f"no complete answer within {self.timeout:g} s")
        return TransportError("the request was stopped (cancelled, or the client closed)")

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        with self._lock:
            conn = self._idle.pop(key, None)
        if conn is not None and not conn.alive():
            conn.close()  # closed by the server while idle: nothing was sent on it, a new one is opened
            return None
        return conn

    def _keep(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and conn.key not in self._idle:
                self._idle[conn.key] = conn
                return
        conn.close()  # one idle connection per origin; a concurrent request's spare is closed

    def _connect(self, exchange: _Exchange, key: tuple[str, str, int], deadline: float) -> _Connection:
        scheme, host, port = key
        connect_deadline = min(deadline, time.monotonic() + self.connect_timeout)

        def left() -> float:
            remaining = connect_deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(f"connecting to {host}:{port} took over {self.connect_timeout:g} s")
            return remaining

        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        if exchange.stopped:
            raise self._stopped(exchange)
        last: BaseException | None = None
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            if not exchange.attach(sock):
                sock.close()
                raise self._stopped(exchange)
            try:
                sock.settimeout(left())
                sock.connect(address)
                with self._lock:
                    self.connections_opened += 1
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if scheme == "https":
                    context = self.ssl_context or ssl.create_default_context()
                    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
                    sock = tls
                    if not exchange.attach(tls):
                        raise self._stopped(exchange)
                    tls.settimeout(left())
                    tls.do_handshake()
                return _Connection(key, sock)
            except BaseException as exc:
                sock.close()
                if exchange.stopped:
                    exchange.finish()
                    raise self._stopped(exchange) from None
                if isinstance(exc, (ssl.SSLError, ssl.CertificateError, TransportTimeout, socket.timeout)):
                    raise self._translate(exc, key, deadline) from None
                if not isinstance(exc, OSError):
                    raise
                last = exc
        raise self._translate(last or TransportError("no address"), key, deadline) from None

    def _send(
        self, conn: _Connection, method: str, target: str, body: bytes | None, headers: Mapping[str, str]
    ) -> None:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.putheader("User-Agent", self.user_agent)
        names = {name.lower() for name in headers}
        if (body is not None or method in ("POST", "PUT", "PATCH")) and "content-length" not in names:
            conn.putheader("Content-Length", str(len(body or b"")))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)  # bytes: sent with the headers in one write

    @staticmethod
    def _read(response: http.client.HTTPResponse, max_body: int) -> HttpAnswer:
        body = bytearray()
        while len(body) <= max_body:
            chunk = response.read(min(_READ_STEP, max_body + 1 - len(body)))
            if not chunk:
                break
            body += chunk
        truncated = len(body) > max_body
        if not truncated and response.length:  # http.client returns short reads at EOF without a word
            raise http.client.IncompleteRead(bytes(body), response.length)
        return HttpAnswer(
            status=response.status,
            headers=response.msg,
            body=bytes(body[:max_body]),
            truncated=truncated,
            content_type=mime_type(response.getheader("Content-Type")),
        )

    def _translate(self, exc: BaseException, key: tuple[str, str, int], deadline: float) -> BaseException:
        where = f"{key[1]}:{key[2]}"
        if isinstance(exc, (TransportError, TransportTimeout)):
            return exc
        if isinstance(exc, (socket.timeout, TimeoutError)) or time.monotonic() >= deadline:
            return TransportTimeout(f"no complete answer from {where} within {self.timeout:g} s")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TransportTLSError(f"certificate of {where} not accepted: {exc.verify_message or exc.reason}")
        if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
            return TransportTLSError(f"TLS with {where} failed: {getattr(exc, 'reason', None) or exc}")
        if isinstance(exc, http.client.IncompleteRead):
            return TransportError(f"{where} closed the connection after {len(exc.partial)} bytes of the answer")
        if isinstance(exc, http.client.RemoteDisconnected):
            return TransportError(f"{where} closed the connection without answering")
        if isinstance(exc, http.client.HTTPException):
            return TransportError(f"{where} did not answer HTTP: {type(exc).__name__} {str(exc)[:80]}")
        if isinstance(exc, ConnectionRefusedError):
            return TransportError(f"connection refused by {where}")
        if isinstance(exc, ConnectionResetError):
            return TransportError(f"connection reset by {where}")
        if isinstance(exc, OSError):
            return TransportError(f"{where}: {exc.strerror or type(exc).__name__}")
        if isinstance(exc, ValueError):  # http.client's refusal quotes the header, and the token with it: not repeated
            return TransportError("a request header holds a line break or a control character HTTP does not allow")
        return exc
