"""agent.transport.HttpClient against real servers on 127.0.0.1: aiohttp web servers for well-behaved answers, raw
asyncio and socket servers for the hostile ones (trickling, closing, never answering, lying about lengths)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from agent import __version__
from agent.transport import HttpClient, TransportError, TransportTimeout, TransportTLSError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def web_server(
    routes: list[web.RouteDef], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, set[tuple[str, int]]]]:
    """An aiohttp app on a free loopback port; yields its base URL and the set of client (host, port) pairs seen —
    one per TCP connection the client opened."""
    peers: set[tuple[str, int]] = set()

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername")[:2])
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}", peers
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """An asyncio TCP server running ``handler`` per connection; yields its URL and a list counting connections."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], headers, body


def client(timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> HttpClient:
    return HttpClient(timeout=timeout, connect_timeout=min(5.0, timeout), ssl_context=ssl_context)


def http_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lens-http")]


async def wait_for_no_http_threads(limit: float = 5.0) -> bool:
    end = time.monotonic() + limit
    while http_threads():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True


def test_errors_are_what_callers_catch() -> None:
    assert issubclass(TransportTimeout, asyncio.TimeoutError) and issubclass(TransportTimeout, TimeoutError)
    assert issubclass(TransportTLSError, TransportError) and issubclass(TransportError, OSError)


async def test_keep_alive_reuses_one_connection_and_sends_our_headers() -> None:
    seen: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        body = await request.read()
        return web.json_response({"n": len(body)}, headers={"X-Trace": "abc"})

    async with web_server([web.get("/e", echo), web.post("/e", echo)]) as (url, peers), client() as http:
        for i in range(5):
            answer = await http.request("POST" if i % 2 else "GET", url + "/e?x=1", body=b"x" * i, max_body=1000)
            assert answer.status == 200 and answer.content_type == "application/json"
            assert answer.headers.get("x-trace") == "abc" and answer.headers.get("X-TRACE") == "abc"
            assert answer.body == f'{{"n": {i}}}'.encode() and not answer.truncated
        assert len(peers) == 1 and http.connections_opened == 1
    assert all(h["user-agent"] == f"lens-agent/{__version__}" for h in seen)
    assert "accept-encoding" not in seen[0]
    assert seen[1]["content-length"] == "1"


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    """Keep-alive promised, then closed (a load balancer's idle timeout): the next POST goes on a new connection,
    nothing of it was sent on the closed one (a POST is never sent twice, so it must be found closed before)."""
    closed = asyncio.Event()

    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    async with raw_server(one_answer_then_close) as (url, accepted), client() as http:
        for _ in range(3):
            answer = await http.request("POST", url, body=b"data", max_body=100)
            assert (answer.status, answer.body) == (200, b"ok")
            await asyncio.wait_for(closed.wait(), 5)
            closed.clear()
        assert len(accepted) == 3


async def test_a_reused_connection_closed_under_a_request_retries_get_but_not_post() -> None:
    """The server reads the second request on a connection and closes without answering: a GET (idempotent, no
    answer begun) is sent again on a new connection; a POST that left the device is not sent twice."""
    requests: list[str] = []

    async def drop_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        requests.append(line)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        line, _, _ = await read_request(reader)
        requests.append(line)  # read, then dropped

    async with raw_server(drop_second) as (url, accepted), client() as http:
        assert (await http.request("GET", url + "/a", max_body=10)).body == b"ok"
        assert (await http.request("GET", url + "/b", max_body=10)).body == b"ok"
        assert len(accepted) == 2 and requests == ["GET /a HTTP/1.1", "GET /b HTTP/1.1", "GET /b HTTP/1.1"]
        with pytest.raises(TransportError, match="closed the connection without answering"):
            await http.request("POST", url + "/c", body=b"1", max_body=10)  # on /b's retry connection: dropped
        assert requests[-1] == "POST /c HTTP/1.1" and requests.count("POST /c HTTP/1.1") == 1


async def test_chunked_and_content_length_answers() -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "Text/Plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(20):
            await response.write(b"%d," % i)
        await response.write_eof()
        return response

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"a" * 70_000, content_type="application/octet-stream")

    async with web_server([web.get("/c", chunked), web.get("/s", sized)]) as (url, peers), client() as http:
        answer = await http.request("GET", url + "/c", max_body=10_000)
        assert answer.body == b"".join(b"%d," % i for i in range(20)) and answer.content_type == "text/plain"
        assert answer.headers.get("transfer-encoding") == "chunked"
        answer = await http.request("GET", url + "/s", max_body=100_000)
        assert answer.body == b"a" * 70_000 and not answer.truncated
        answer = await http.request("GET", url + "/c", max_body=10_000)  # both read to the end: still one connection
        assert len(peers) == 1


async def test_a_gzip_answer_is_not_decoded() -> None:
    packed = gzip.compress(b'{"a": 1}')

    async def zipped(request: web.Request) -> web.Response:
        return web.Response(body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async with web_server([web.get("/z", zipped)]) as (url, _), client() as http:
        answer = await http.request("GET", url + "/z", max_body=1000)
    assert answer.body == packed


async def test_an_oversized_answer_is_cut_at_max_body_and_its_connection_dropped() -> None:
    sent = [0]

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        response.content_length = 64 * 1024**2
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, OSError):
            while sent[0] < 64 * 1024**2:
                await response.write(b"x" * 65536)
                sent[0] += 65536
        return response

    async def small(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    async with web_server([web.get("/huge", huge), web.get("/small", small)]) as (url, peers), client() as http:
        answer = await http.request("GET", url + "/huge", max_body=1000)
        assert answer.truncated and answer.body == b"x" * 1000 and answer.status == 200
        assert (await http.request("GET", url + "/small", max_body=1000)).body == b"fine"
        assert len(peers) == 2 and http.connections_opened == 2  # the cut connection was not reused
        await asyncio.sleep(0.3)
    assert sent[0] < 32 * 1024**2  # the rest was never read


async def test_an_answer_shorter_than_its_content_length_is_an_error() -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"y" * 20)
        await writer.drain()

    async with raw_server(short) as (url, _), client() as http:
        with pytest.raises(TransportError, match="after 20 bytes"):
            await http.request("GET", url, max_body=1000)


@pytest.mark.parametrize("where", ["headers", "body"])
async def test_a_trickling_server_is_stopped_at_the_deadline(where: str) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 500\r\n\r\n" + b"z" * 500
    if where == "body":
        head = answer.index(b"\r\n\r\n") + 4
        start, answer = answer[:head], answer[head:]
    else:
        start = b""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(start)
        for i in range(len(answer)):
            writer.write(answer[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.1)  # always under any per-read timeout

    async with raw_server(trickle) as (url, _), client(timeout=1.5) as http:
        began = time.monotonic()
        with pytest.raises(TransportTimeout):
            await http.request("GET", url, max_body=10_000)
        assert time.monotonic() - began < 1.5 + 5
    assert await wait_for_no_http_threads()


async def test_a_listening_socket_that_never_accepts_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        async with client(timeout=1.0) as http:
            began = time.monotonic()
            with pytest.raises(TransportTimeout):
                await http.request("POST", url, body=b"batch", max_body=100)
            assert time.monotonic() - began < 1.0 + 5
    assert await wait_for_no_http_threads()


async def test_a_refused_connection_is_a_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        async with client() as http:
            with pytest.raises(TransportError, match="refused") as caught:
                await http.request("GET", f"http://127.0.0.1:{port}/", max_body=100)
    assert not isinstance(caught.value, TimeoutError)


async def test_tls_with_a_ca_and_with_the_wrong_one(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secure")

    async with web_server([web.get("/", hello)], ssl_context=server_ctx) as (url, peers):
        async with client(ssl_context=trusting) as http:
            for _ in range(3):
                assert (await http.request("GET", url + "/", max_body=100)).body == b"secure"
            assert len(peers) == 1  # kept alive over TLS too (session tickets do not count as a closed connection)
        for context in (other, None):  # another CA; the system's CAs
            async with client(ssl_context=context) as http:
                with pytest.raises(TransportTLSError, match="certificate"):
                    await http.request("GET", url + "/", max_body=100)


async def test_a_redirect_is_returned_not_followed() -> None:
    followed: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append(request.path)
        return web.Response(text="followed")

    async with web_server([web.post("/", moved), web.get("/elsewhere", elsewhere)]) as (url, _), client() as http:
        answer = await http.request("POST", url + "/", body=b"batch", max_body=100)
    assert answer.status == 302 and answer.headers.get("location") == "/elsewhere" and followed == []


async def test_cancelling_the_request_ends_its_thread_promptly() -> None:
    closed = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client goes away
        closed.set()

    async with raw_server(never_answer) as (url, _), client(timeout=60) as http:
        task = asyncio.create_task(http.request("GET", url, max_body=100))
        await asyncio.sleep(0.3)
        assert http_threads(), "the exchange runs on its own thread"
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_for_no_http_threads(5.0), "the thread outlived the cancellation"
        await asyncio.wait_for(closed.wait(), 5)  # the server saw the connection closed
        assert time.monotonic() - began < 5


async def test_the_event_loop_keeps_running_during_a_slow_answer() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="late")

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    async with web_server([web.get("/", slow)]) as (url, _), client() as http:
        task = asyncio.create_task(ticker())
        try:
            assert (await http.request("GET", url + "/", max_body=100)).body == b"late"
        finally:
            task.cancel()
    assert ticks >= 5  # ~20 on an idle machine; a blocked loop gives 0


async def test_closing_the_client_closes_its_idle_connection() -> None:
    gone = asyncio.Event()

    async def answer_then_wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await reader.read()
        gone.set()

    async with raw_server(answer_then_wait) as (url, _):
        http = client()
        answer = await http.request("GET", url, max_body=100)
        assert answer.status == 204 and answer.body == b"" and answer.content_type == ""
        assert not gone.is_set()
        await http.close()
        await asyncio.wait_for(gone.wait(), 5)
        with pytest.raises(TransportError, match="closed"):
            await http.request("GET", url, max_body=100)


async def test_a_bad_url_is_refused_with_its_value() -> None:
    async with client() as http:
        with pytest.raises(TransportError, match="ftp://x"):
            await http.request("GET", "ftp://x/", max_body=1)


async def test_a_header_with_a_line_break_is_refused_without_repeating_it() -> None:
    async with web_server([]) as (url, _), client() as http:
        with pytest.raises(TransportError, match="line break") as caught:
            await http.request("GET", url + "/", headers={"Authorization": "Bearer s3cret\r\nX-Evil: 1"}, max_body=1)
    assert "s3cret" not in str(caught.value)


async def test_concurrent_requests_each_get_a_connection_and_one_stays_idle() -> None:
    async def slowish(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text=request.query["i"])

    async with web_server([web.get("/", slowish)]) as (url, peers), client() as http:
        answers = await asyncio.gather(*(http.request("GET", f"{url}/?i={i}", max_body=10) for i in range(3)))
        assert [a.body for a in answers] == [b"0", b"1", b"2"]
        assert len(peers) == 3  # no request waited for another's connection
        assert (await http.request("GET", f"{url}/?i=9", max_body=10)).body == b"9"
        assert len(peers) == 3 and http.connections_opened == 3  # the one connection kept idle was reused
