"""Campaign callbacks (aggregator/callback.py): the SSRF guard, the signature, delivery to real servers on
127.0.0.1/127.0.0.2, redirects, DNS rebinding, slow and huge answers, retry delays."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from aggregator import callback

SECRET = b"s3cret-callback-key"
PAYLOAD = {"benchmark_id": "6f1c0e7e-6a55-4a53-9a2b-0f4ad3a1d2b1", "status": "completed", "counts": {"succeeded": 3}}


def public(*addresses: str) -> Any:
    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


REFUSED = [
    ("ftp://example.com/hook", "scheme"),
    ("javascript:alert(1)", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("http://user:pw@example.com/hook", "credentials"),
    ("http://user@example.com/hook", "credentials"),
    ("http://example.com/hook#frag", "fragment"),
    ("http://example.com\\@127.0.0.1/", "backslash"),
    ("http://exa mple.com/", "space"),
    ("http://example.com/\x00", "control"),
    ("", "non-empty"),
    ("http://" + "a" * 3000 + ".com/", "at most"),
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[2002:7f00:1::]/", "6to4"),
    ("http://[64:ff9b::7f00:1]/", "NAT64"),
    ("http://localhost/", "localhost"),
    ("http://LOCALHOST./", "localhost"),
    ("http://api.localhost/", "localhost"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "zone"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://100.64.0.1/", "not globally routable"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.2.10/", "private"),  # documentation range (TEST-NET-1)
    ("http://example.com:0/", "port"),
]


@pytest.mark.parametrize(("url", "why"), REFUSED)
def test_refused_urls_say_why(url: str, why: str) -> None:
    problem = callback.check_callback_url(url, allow_private=False, resolve=public("93.184.215.14"))
    assert problem is not None and why.lower() in problem.lower(), problem


def test_a_name_is_refused_when_any_of_its_addresses_is_not_public() -> None:
    for answer in (["127.0.0.1"], ["93.184.215.14", "10.0.0.7"], ["2606:4700::1111", "::1"], ["::ffff:169.254.1.1"]):
        problem = callback.check_callback_url("https://hooks.example.com/x", False, resolve=public(*answer))
        assert problem is not None and "hooks.example.com" in problem, answer
    assert callback.check_callback_url("https://hooks.example.com/x", False, resolve=public()) is not None

    def fails(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    assert "does not resolve" in (callback.check_callback_url("https://nx.example.com/", False, resolve=fails) or "")


def test_public_addresses_pass_and_allow_private_lifts_only_the_address_rule() -> None:
    assert (
        callback.check_callback_url("https://hooks.example.com/x?y=1", False, resolve=public("93.184.215.14")) is None
    )
    assert callback.check_callback_url("http://1.1.1.1/hook", False) is None  # a literal: no resolution
    assert callback.check_callback_url("http://[2606:4700::1111]:8443/", False) is None
    assert callback.check_callback_url("http://[::ffff:1.1.1.1]/", False) is None
    for url in ("http://127.0.0.1:9/", "http://localhost/", "http://10.0.0.1/", "http://[::1]/"):
        assert callback.check_callback_url(url, True, resolve=public("127.0.0.1")) is None, url
    for url in ("ftp://127.0.0.1/", "http://u:p@127.0.0.1/", "http://127.0.0.1/#x"):
        assert callback.check_callback_url(url, True) is not None, url


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = json.dumps(PAYLOAD).encode()
    expected = hmac.new(SECRET, b"1765000000." + body, hashlib.sha256).hexdigest()
    assert callback.sign(SECRET, 1765000000, body) == "sha256=" + expected
    assert callback.sign(SECRET, 1765000001, body) != callback.sign(SECRET, 1765000000, body)
    assert callback.sign(b"other", 1765000000, body) != callback.sign(SECRET, 1765000000, body)


def test_retry_delays_double_from_one_second_to_five_minutes_with_jitter() -> None:
    delays = [[callback.next_attempt_delay(n) for n in range(1, 14)] for _ in range(20)]
    for run in delays:
        for n, delay in enumerate(run, start=1):
            nominal = min(300.0, 2.0 ** (n - 1))
            assert 0.9 * nominal <= delay <= min(300.0, 1.1 * nominal), (n, delay)
    assert len({run[3] for run in delays}) > 1  # jittered
    assert callback.next_attempt_delay(10**9) <= 300.0 and callback.next_attempt_delay(0) >= 0.9


# -- real servers ----------------------------------------------------------------------------------------------------
@dataclass
class Receiver:
    """An HTTP receiver on one address: records what arrives and verifies the signature as a receiving service would."""

    host: str
    port: int = 0
    mode: str = "ok"
    seen: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        timestamp = request.headers.get("X-Lens-Timestamp", "")
        signature = request.headers.get("X-Lens-Signature", "")
        expected = "sha256=" + hmac.new(SECRET, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        verified = hmac.compare_digest(signature, expected) and abs(time.time() - int(timestamp or 0)) < 300
        self.seen.append({"verified": verified, "body": body, "headers": dict(request.headers)})
        if self.mode == "slow":  # answers after 30 s, or when the test ends
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.release.wait(), 30)
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect(self.location)
        if self.mode == "huge_error":
            response = web.StreamResponse(status=500)
            await response.prepare(request)
            chunk = b"E" * 65536
            for _ in range(800):  # 50 MiB, if anyone read it
                await response.write(chunk)
            return response
        if self.mode == "huge_ok":
            response = web.StreamResponse(status=200)
            await response.prepare(request)
            while True:
                await response.write(b"x" * 65536)
        if self.mode == "huge_header":
            return web.Response(status=200, headers={"X-Big": "y" * 200_000})
        if not verified:
            return web.Response(status=401, text="bad signature\x1b[31m")
        return web.Response(status=204)

    location: str = ""
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver("127.0.0.1")
    await r.start()
    yield r
    await r.stop()


async def test_delivery_is_signed_and_verifies_at_the_receiver(receiver: Receiver) -> None:
    url = f"http://127.0.0.1:{receiver.port}/hook"
    ok, why = await callback.deliver(url, PAYLOAD, SECRET, allow_private=True, timeout=10)
    assert (ok, why) == (True, None)
    (got,) = receiver.seen
    assert got["verified"] and json.loads(got["body"]) == PAYLOAD
    assert got["headers"]["Content-Type"] == "application/json"
    ok, why = await callback.deliver(url, PAYLOAD, b"wrong key", allow_private=True, timeout=10)
    assert not ok and why is not None and why.startswith("HTTP 401: bad signature") and "\x1b" not in why


async def test_a_legacy_ipv4_notation_goes_to_the_address_it_spells(receiver: Receiver) -> None:
    """``0x7f.1`` is 127.0.0.1: allowed with allow_private, delivered there through the pinned resolver."""
    url = f"http://0x7f.1:{receiver.port}/hook"
    ok, why = await callback.deliver(url, PAYLOAD, SECRET, allow_private=True, timeout=10)
    assert (ok, why) == (True, None) and len(receiver.seen) == 1 and receiver.seen[0]["verified"]


async def test_refused_at_delivery_without_allow_private(receiver: Receiver) -> None:
    for url in (f"http://127.0.0.1:{receiver.port}/hook", f"http://2130706433:{receiver.port}/hook"):
        ok, why = await callback.deliver(url, PAYLOAD, SECRET, allow_private=False, timeout=5)
        assert not ok and why is not None and "loopback" in why
    assert receiver.seen == []


async def test_a_name_resolves_once_and_the_connection_goes_to_the_checked_address() -> None:
    """DNS rebinding: the first answer is 127.0.0.1, every later one 127.0.0.2 (a second receiver on the same
    port). The request reaches 127.0.0.1, and the resolver is asked once."""
    first = Receiver("127.0.0.1")
    await first.start()
    second = Receiver("127.0.0.2", port=first.port)
    await second.start()
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["127.0.0.2"]

    try:
        url = f"http://hooks.rebind.test:{first.port}/hook"
        ok, why = await callback.deliver(url, PAYLOAD, SECRET, allow_private=True, timeout=10, resolve=rebinding)
        assert (ok, why) == (True, None)
        assert calls == ["hooks.rebind.test"]
        assert len(first.seen) == 1 and second.seen == []
        assert first.seen[0]["headers"]["Host"] == f"hooks.rebind.test:{first.port}"  # the URL's host, not the address
    finally:
        await first.stop()
        await second.stop()


async def test_a_name_public_when_started_and_loopback_when_delivered_is_refused(receiver: Receiver) -> None:
    """A resolver that answers a public address (the check at start), then loopback (at delivery): the delivery
    checks its own resolution and never reaches loopback; an answer mixing public and loopback is refused too."""
    answers = iter([["93.184.215.14"], ["127.0.0.1"], ["93.184.215.14", "127.0.0.1"]])
    url = f"http://hooks.rebind.test:{receiver.port}/hook"
    assert callback.check_callback_url(url, False, resolve=lambda h, p: next(answers)) is None

    async def resolve(host: str, port: int) -> list[str]:
        return next(answers)

    for _ in range(2):
        ok, why = await callback.deliver(url, PAYLOAD, SECRET, allow_private=False, timeout=5, resolve=resolve)
        assert not ok and why is not None and "127.0.0.1, a loopback address" in why
    assert receiver.seen == []


async def test_a_redirect_to_another_host_is_not_followed() -> None:
    first, other = Receiver("127.0.0.1", mode="redirect"), Receiver("127.0.0.2")
    await first.start()
    await other.start()
    first.location = f"http://127.0.0.2:{other.port}/hook"
    try:
        url = f"http://127.0.0.1:{first.port}/hook"
        ok, why = await callback.deliver(url, PAYLOAD, SECRET, allow_private=True, timeout=10)
        assert not ok and why is not None and "HTTP 307" in why and "not followed" in why and "127.0.0.2" in why
        assert len(first.seen) == 1 and other.seen == []
    finally:
        await first.stop()
        await other.stop()


async def test_a_slow_answer_is_cut_at_the_timeout(receiver: Receiver) -> None:
    receiver.mode = "slow"
    started = time.monotonic()
    ok, why = await callback.deliver(
        f"http://127.0.0.1:{receiver.port}/hook", PAYLOAD, SECRET, allow_private=True, timeout=1.0
    )
    assert not ok and why == "no answer within 1 s"
    assert time.monotonic() - started < 10  # loose: a busy machine


async def test_a_slow_resolver_is_cut_at_the_timeout() -> None:
    async def stuck(host: str, port: int) -> list[str]:
        await asyncio.sleep(60)
        return ["127.0.0.1"]

    started = time.monotonic()
    ok, why = await callback.deliver(
        "http://slow.test:9/hook", PAYLOAD, SECRET, allow_private=True, timeout=0.5, resolve=stuck
    )
    assert not ok and why is not None and why.endswith("does not resolve: timed out")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("mode", ["huge_error", "huge_ok", "huge_header"])
async def test_a_huge_answer_is_not_read(receiver: Receiver, mode: str) -> None:
    receiver.mode = mode
    started = time.monotonic()
    ok, why = await callback.deliver(
        f"http://127.0.0.1:{receiver.port}/hook", PAYLOAD, SECRET, allow_private=True, timeout=20
    )
    assert time.monotonic() - started < 15  # it did not wait for 50 MiB, or for an endless body
    if mode == "huge_ok":
        assert (ok, why) == (True, None)  # the status line is the answer
    elif mode == "huge_error":
        assert not ok and why is not None and why.startswith("HTTP 500: EEEE") and len(why) <= 220
    else:
        assert not ok and why is not None and len(why) <= 300
