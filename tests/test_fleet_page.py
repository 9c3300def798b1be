"""The fleet view: /api/v1/fleet, the SSE stream of incoming batches, and the built-in pages in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore

from .test_aggregator import auth, make_batch

NOW = time.time_ns() // 1000
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"


async def fill(client: Any, store: SQLiteStore) -> list[dict[str, Any]]:
    everything = []
    for device, seed in (("orin-017", 1), ("laptop-3", 2)):
        token = store.add_token(device, "device", NOW)
        records = synthetic_records(40, seed=seed, device_id=device)
        if device == "orin-017":
            for r in records:
                r["ext"] = {"energy": {"j_per_output_token": 0.05}}
        body = make_batch(records, device=device, counters={"pending_records": 12, "dropped_total": 1})
        assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
        everything += records
    return everything


async def test_fleet_api(aiohttp_client, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    await fill(client, store)
    devices = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    orin = devices["orin-017"]
    assert orin["sync_health"] == "ok" and orin["backlog"] == 12 and orin["records"] == 40
    assert (
        orin["ttft_p95_ms"] > 0 and orin["tokens_per_second"] > 0 and orin["j_per_output_token"] == pytest.approx(0.05)
    )
    assert devices["laptop-3"]["j_per_output_token"] is None


async def test_stream_pushes_incoming_batches(aiohttp_client, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    response = await client.get("/api/v1/stream")
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    assert (await asyncio.wait_for(response.content.readline(), 5)).startswith(b": connected")
    records = synthetic_records(5, seed=3, device_id="dev-1")
    assert (
        await client.post("/api/v1/ingest", data=make_batch(records, device="dev-1"), headers=auth(token))
    ).status == 200
    lines = []
    while not any(line.startswith(b"data:") for line in lines):
        lines.append(await asyncio.wait_for(response.content.readline(), 5))
    event = json.loads(next(line for line in lines if line.startswith(b"data:"))[5:])
    assert b"event: batch\n" in lines and event["device_id"] == "dev-1" and event["records"] == 5
    # the device's new fleet row comes with the event: an open page replaces that row, it fetches nothing
    fleet = (await (await client.get("/api/v1/fleet")).json())["devices"][0]
    row = event["device"]
    assert row["device_id"] == "dev-1" and row["records"] == 5 and row["requests"] == fleet["requests"]
    assert row["series"] == fleet["series"] and row["ttft_p95_ms"] == fleet["ttft_p95_ms"] is not None
    assert row["regressions"] == []
    response.close()


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is missing: `make sysdeps` installs Debian's chromium"
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--timeout=4000",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


@contextlib.contextmanager
def running(app: web.Application) -> Iterator[tuple[int, asyncio.AbstractEventLoop]]:
    """``app`` on a free port of 127.0.0.1, its event loop in a thread of its own: (port, loop), for a browser or a
    client in another thread; the app is cleaned up and the loop stopped afterwards, whatever happened."""
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port, loop
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@contextlib.contextmanager
def serving(
    tmp_path: Path, settings: Settings, routes: tuple[web.RouteDef, ...] = ()
) -> Iterator[tuple[str, dict[str, str]]]:
    """A real aggregator on a real port, filled with two devices, in a thread of its own: (URL, device tokens).
    ``routes``: more of them (a test's own pages)."""
    store = SQLiteStore(tmp_path / "agg.db")
    app = create_app(settings, store)
    app.router.add_routes(routes)
    tokens: dict[str, str] = {}
    with running(app) as (port, loop):

        async def load() -> None:
            import aiohttp

            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
                for device, seed in (("orin-017", 1), ("laptop-3", 2)):
                    tokens[device] = token = store.add_token(device, "device", NOW)
                    records = synthetic_records(40, seed=seed, device_id=device)
                    body = make_batch(records, device=device, counters={"pending_records": 12})
                    async with session.post("/api/v1/ingest", data=body, headers=auth(token)) as response:
                        assert response.status == 200

        asyncio.run_coroutine_threadsafe(load(), loop).result(30)
        yield f"http://127.0.0.1:{port}", tokens


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    with serving(tmp_path, Settings()) as (url, _):
        yield url


def test_fleet_page_renders_with_data(served: str) -> None:
    dom = chromium("--dump-dom", served + "/")
    assert "orin-017" in dom.stdout and "laptop-3" in dom.stdout, dom.stderr[-2000:]
    assert "2 devices, 0 critical, 0 warning; 0 not seen" in dom.stdout
    assert 'class="ok">ok<' in dom.stdout and 'class="health ok">ok<' in dom.stdout
    assert console_errors(dom.stderr) == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = chromium("--window-size=1280,600", f"--screenshot={SCREENSHOTS / 'fleet.png'}", served + "/")
    assert (SCREENSHOTS / "fleet.png").stat().st_size > 5000, shot.stderr[-2000:]


def test_the_fleet_table_sorts_and_filters_from_the_address(served: str) -> None:
    """The view lives in the address (bookmarkable): ?sort=COLUMN[&desc=1] and ?filter=TEXT, applied on load."""

    def order(query: str) -> list[str]:
        dom = chromium("--dump-dom", served + "/" + query)
        assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
        rows = [line for line in dom.stdout.split("<tr ") if line.startswith('id="device-')]
        return [row.split('"', 2)[1].removeprefix("device-") for row in rows]

    assert order("?sort=device_id") == ["laptop-3", "orin-017"]
    assert order("?sort=device_id&desc=1") == ["orin-017", "laptop-3"]
    assert order("?filter=ORIN") == ["orin-017"]
    assert order("?filter=no-such-thing") == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width in (1400, 400):  # a desk and a phone: at 400 px each device is a card (tests/test_triage_page.py)
        shot = SCREENSHOTS / f"fleet-{width}.png"
        chromium(f"--window-size={width},700", f"--screenshot={shot}", served + "/?sort=error_rate&desc=1")
        assert shot.stat().st_size > 5000


def test_device_page_draws_its_charts(served: str) -> None:
    dom = chromium("--dump-dom", served + "/device/orin-017")
    assert "<canvas" in dom.stdout and "40 records received" in dom.stdout, dom.stderr[-2000:]
    assert console_errors(dom.stderr) == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    chromium("--window-size=1000,700", f"--screenshot={SCREENSHOTS / 'device.png'}", served + "/device/orin-017")
    assert (SCREENSHOTS / "device.png").stat().st_size > 5000


async def test_browsers_log_in_with_a_read_token_off_loopback(aiohttp_client, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(host="0.0.0.0"), store))
    reader = store.add_token("browser", "read", NOW)
    device = store.add_token("dev-1", "device", NOW)
    page = await client.get("/", headers={"Accept": "text/html"}, allow_redirects=False)
    assert page.status == 302 and page.headers["Location"] == "/login"
    assert (await client.get("/api/v1/fleet")).status == 401  # scripts get a 401, not a redirect
    refused = await client.post("/login", data={"token": device})
    assert refused.status == 401 and "not a valid read or operator token" in await refused.text()
    signed = await client.post("/login", data={"token": reader}, allow_redirects=False)
    assert signed.status == 302 and "HttpOnly" in signed.headers["Set-Cookie"]
    assert (await client.get("/", headers={"Accept": "text/html"})).status == 200  # the cookie is sent back
    assert (await client.get("/api/v1/fleet")).status == 200
    await client.get("/logout", allow_redirects=False)
    assert (await client.get("/api/v1/fleet")).status == 401


# The fleet page in a frame of a test page that holds its load event for a few seconds (a slow image), copying what
# the page shows meanwhile: chromium --dump-dom writes the test page after its load event, the live updates included.
WATCHER = """<!doctype html><html><body><iframe id="fleet" src="/?sort=device_id"></iframe><pre id="seen"></pre>
<script>
setInterval(() => {
  const page = document.getElementById("fleet").contentDocument, row = page && page.getElementById("device-orin-017");
  if (row) document.getElementById("seen").textContent =
    "fetches=" + (page.body.dataset.rowFetches || 0) + " row=" + [...row.cells].map(c => c.textContent).join("|");
}, 100);
</script><img src="/slow-image"></body></html>"""


async def _watcher(request: web.Request) -> web.Response:
    return web.Response(text=WATCHER, content_type="text/html")


async def _slow_image(request: web.Request) -> web.Response:
    await asyncio.sleep(6)
    return web.Response(body=b"", content_type="image/gif")


def test_the_page_fetches_a_row_too_large_for_the_stream(tmp_path: Path) -> None:
    """With server.max_event_bytes below a row's size, each live update of orin-017 is a refetch notice: the open page
    fetches that device's row over the API (/api/v1/fleet?device=orin-017) and shows its new record count."""
    import urllib.request

    routes = (web.get("/watch", _watcher), web.get("/slow-image", _slow_image))
    with serving(tmp_path, Settings(max_event_bytes=1024), routes) as (url, tokens):
        stop = threading.Event()

        def send() -> None:  # batches of orin-017 while the page is open
            seed = 10
            while not stop.wait(0.5):
                records = synthetic_records(5, seed=seed, device_id="orin-017")
                request = urllib.request.Request(
                    url + "/api/v1/ingest",
                    data=make_batch(records, device="orin-017"),
                    headers=auth(tokens["orin-017"]),
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    assert response.status == 200
                seed += 1

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            dom = chromium("--dump-dom", url + "/watch")
        finally:
            stop.set()
            sender.join()
    assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
    seen = re.search(r"fetches=(\d+) row=(.*)", dom.stdout)
    assert seen and int(seen.group(1)) >= 1, dom.stdout[-2000:]
    cells = seen.group(2).split("|")
    assert int(cells[14]) > 40, (
        cells
    )  # records (after the contended and guardrails columns): 40 when the page loaded, more since
