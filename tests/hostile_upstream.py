"""An HTTP upstream on 127.0.0.1 that answers uploads the way captive portals, proxies, WAFs and load balancers do.

It stands between the agent and a real aggregator. In mode ``pass`` it forwards each request to the aggregator and
returns its answer unchanged; in every other mode it answers in the aggregator's place (see ``MODES``). ``chaos``
picks a mode per request with a seeded generator. It runs on its own event loop in a thread, so tests can drive the
agent's synchronous CLI while it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import aiohttp
from aiohttp import web

from lens_core import wire

from .loop_server import LoopServer

PORTAL = b"<html><head><title>Welcome to Hotel WiFi</title></head><body>Please accept the terms</body></html>"
WAF = b"<html><body><h1>Request Rejected</h1>The requested URL was rejected. Support ID: 1234</body></html>"

# mode -> what a user's network does
MODES = {
    "pass": "forward to the aggregator",
    "200-text": "200 text/plain 'OK' (a load balancer's default backend)",
    "200-html": "200 text/html (a captive portal)",
    "200-json": "200 application/json that is not an acknowledgement",
    "200-accepted-string": '200 {"accepted": "lots"}',
    "ack-other-batch": "a well-formed acknowledgement for another batch",
    "ack-short-count": "an acknowledgement whose counts do not add up",
    "ack-wrong-digest": "an acknowledgement naming other records",
    "301": "301 to the aggregator",
    "302": "302 to the aggregator",
    "307": "307 to the aggregator (a client following it would re-send the body)",
    "308": "308 to the aggregator",
    "400-html": "400 text/html (a WAF)",
    "400-json": '400 {"error": ..., "record_index": 0} without the protocol (a gateway)',
    "413-html": "413 text/html (a proxy's body limit)",
    "500-html": "500 text/html",
    "502-html": "502 text/html (a gateway with the aggregator down)",
    "huge": "200 text/html of 1.5 GB",
    "slow": "200 with a body trickling one byte every half second",
    "reset": "headers, half a body, then a TCP reset",
    "pass-lose-answer": "forward to the aggregator, then answer 200 text/html instead of its acknowledgement",
}
CHAOS = [m for m in MODES if m not in ("pass", "huge", "slow")]


class HostileUpstream(LoopServer):
    def __init__(self, aggregator_url: str, *, seed: int = 0) -> None:
        self.aggregator_url = aggregator_url.rstrip("/")
        self.mode = "pass"
        self.hostile_reads = False  # by default only uploads get the hostile answer; reads reach the aggregator
        self.rng = random.Random(seed)
        self.seen: dict[str, int] = {}
        self.huge_bytes_sent = 0
        self._session: aiohttp.ClientSession | None = None
        super().__init__()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _start(self) -> None:
        await super()._start()
        self._session = aiohttp.ClientSession()

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        await super()._stop()

    # -- answers ----------------------------------------------------------------------------------------------------
    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, str, bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with self._session.request(
            request.method, self.aggregator_url + request.path_qs, data=body or None, headers=headers
        ) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.read()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        mode = self.mode
        if mode == "chaos":  # half of the answers hostile; the slow and the 1.5 GB answers have their own tests
            mode = "pass" if self.rng.random() < 0.5 else self.rng.choice(CHAOS)
        self.seen[mode] = self.seen.get(mode, 0) + 1
        if mode == "pass" or (request.method != "POST" and not self.hostile_reads):
            status, content_type, answer = await self._forward(request, body)
            return web.Response(status=status, body=answer, headers={"Content-Type": content_type})
        if mode == "pass-lose-answer":
            await self._forward(request, body)  # the aggregator stored it; the device never learns
            return web.Response(status=200, body=PORTAL, content_type="text/html")
        if mode == "200-text":
            return web.Response(status=200, text="OK")
        if mode == "200-html":
            return web.Response(status=200, body=PORTAL, content_type="text/html")
        if mode == "200-json":
            return web.json_response({"status": "ok", "message": "received"})
        if mode == "200-accepted-string":
            return web.json_response({"accepted": "lots"})
        if mode in ("ack-other-batch", "ack-short-count", "ack-wrong-digest"):
            batch = wire.decode_batch(body, max_decompressed=256 * 1024**2)
            ids = [wire.loads(blob, batch.codec)["id"] for blob in batch.records]
            if mode == "ack-other-batch":
                return web.json_response(wire.ingest_ack("another-batch", ids, len(ids), 0))
            if mode == "ack-short-count":
                return web.json_response({**wire.ingest_ack(batch.batch_id, ids, len(ids) - 1, 0)})
            return web.json_response({**wire.ingest_ack(batch.batch_id, ids, len(ids), 0), "records_sha256": "0" * 64})
        if mode in ("301", "302", "307", "308"):
            return web.Response(status=int(mode), headers={"Location": self.aggregator_url + request.path_qs})
        if mode.endswith("-html"):
            return web.Response(status=int(mode[:3]), body=WAF, content_type="text/html")
        if mode == "400-json":
            return web.json_response({"error": "bad request", "record_index": 0}, status=400)
        if mode == "huge":
            return await self._huge(request)
        if mode == "slow":
            return await self._slow(request)
        if mode == "reset":
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.content_length = 4096
            await response.prepare(request)
            await response.write(json.dumps({"protocol": wire.INGEST_PROTOCOL}).encode()[:20])
            if request.transport is not None:
                request.transport.abort()
            return response
        raise AssertionError(f"unknown mode {mode}")

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        total = 1536 * 1024**2
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/html"})
        response.content_length = total
        await response.prepare(request)
        chunk = b"<p>" + b"x" * (1024**2 - 7) + b"</p>"
        with contextlib.suppress(ConnectionError, OSError):
            while self.huge_bytes_sent < total:
                await response.write(chunk)
                self.huge_bytes_sent += len(chunk)
        return response

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = 60
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, OSError):
            for _ in range(60):
                await response.write(b" ")
                await asyncio.sleep(0.5)
        return response
