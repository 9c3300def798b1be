"""A TCP proxy on 127.0.0.1 between a client and a server: adds latency, and (optionally) faults.

This machine has no ``netem`` qdisc, so link conditions are made here: each chunk is held for half the round-trip
time in each direction (order kept, throughput not capped), and with ``faulty`` set each chunk the client sends may
instead be delayed further, reset (before or after forwarding: the server may have acted on a request whose answer
is lost) or stalled past the client's timeout. Used by the store-and-forward tests and the collaboration benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers that must keep one port across restarts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LinkProxy:
    def __init__(self, target_port: int, *, rtt_ms: float = 0.0, seed: int = 0, stall_s: float = 5.0) -> None:
        self.target_port = target_port
        self.rtt_ms = rtt_ms
        self.faulty = False
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.port = 0
        self.seen: dict[str, int] = {}
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # for synchronous callers (benchmarks): the proxy runs on its own loop in a thread
    def start_in_thread(self) -> LinkProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), self._loop).result(10)
        return self

    async def _stop_all(self) -> None:
        await self.stop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop_thread(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)

    def _fault(self) -> str:
        fault = self.rng.choice(["pass", "pass", "delay", "reset", "reset-after", "stall"]) if self.faulty else "pass"
        self.seen[fault] = self.seen.get(fault, 0) + 1
        return fault

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return

        def reset() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        one_way = self.rtt_ms / 2000.0

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

            async def release() -> None:
                with contextlib.suppress(ConnectionError, OSError):
                    while True:
                        due, chunk = await queue.get()
                        wait = due - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        if chunk is None:
                            break
                        dst.write(chunk)
                        await dst.drain()
                with contextlib.suppress(Exception):
                    dst.close()

            sender = asyncio.create_task(release())
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await src.read(65536):
                    fault = self._fault() if upstream else "pass"
                    if fault == "reset":
                        reset()
                        break
                    if fault == "stall":
                        await asyncio.sleep(self.stall_s)
                    extra = self.rng.uniform(0.01, 0.3) if fault == "delay" else 0.0
                    queue.put_nowait((time.monotonic() + one_way + extra, chunk))
                    if fault == "reset-after":
                        await asyncio.sleep(one_way + 0.05)  # the server has the request; its answer is lost
                        reset()
                        break
            queue.put_nowait((time.monotonic() + one_way, None))
            await sender

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        except asyncio.CancelledError:  # the proxy is shutting down: drop both sides quietly
            reset()
