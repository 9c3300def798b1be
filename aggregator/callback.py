"""A campaign's callback: the URL checked against server-side request forgery, the signed POST, its retry delays.

When a campaign ends and has a ``callback_url`` (docs/campaigns.md), the aggregator POSTs
``{"benchmark_id", "status", "counts", "finished_at"}`` to it with two headers:

- ``X-Lens-Timestamp``: Unix seconds when the request was signed;
- ``X-Lens-Signature``: ``sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`` (:func:`sign`), which the
  receiver recomputes over the raw body and compares in constant time (and refuses an old timestamp).

The URL is given by an operator, but it is still a request the aggregator makes from inside its network, so by
default it may only reach public addresses (:func:`check_callback_url`, :func:`address_problem`):

- http or https only; no user name or password in the URL; no fragment; no backslash, space or control character;
  one parser (yarl, the one aiohttp connects with) reads the URL for the check and for the connection;
- a literal address in any notation the system resolver accepts (``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
  ``127.1``, ``[::ffff:127.0.0.1]``) and every address a host name resolves to must be globally routable: loopback,
  link-local, private, shared (100.64/10), multicast, unspecified and reserved addresses are refused, as are IPv6
  addresses that embed one (IPv4-mapped, 6to4, Teredo, NAT64 64:ff9b::/96); ``localhost`` and names under it
  are refused without asking DNS;
- ``campaigns.allow_private_callbacks = true`` lifts the address rule (a receiver on the same host or LAN), never the
  others.

:func:`deliver` resolves the host once, checks every address, then connects to one of those checked addresses only:
its aiohttp session's resolver is pinned to them, so a DNS answer that changes between the check and the connection
(DNS rebinding) cannot move the request elsewhere. TLS still verifies the certificate against the URL's host name.
No redirect is followed (a 3xx is a failed delivery, saying where it pointed), the environment's proxies are not
used, the whole exchange is bounded by ``timeout`` and at most :data:`MAX_ANSWER_BYTES` of an error answer are read.
A failed delivery is retried after :func:`next_attempt_delay`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

MAX_URL_CHARS = 2048
MAX_ANSWER_BYTES = 1024  # of an error answer, for the reason shown
MAX_ADDRESSES = 32  # of one host's resolution
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 300.0
USER_AGENT = "lens-aggregator-callback/1"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LEGACY_IPV4 = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)
_BAD_CHARACTERS = re.compile(r"[\x00-\x20\x7f-\x9f\\]")


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 keyed with ``secret`` over ``b"<timestamp>." + body``."""
    return "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def next_attempt_delay(attempt: int, rng: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds before retrying after failed attempt number ``attempt`` (1, 2, …): 1 s doubling, at most 300 s,
    each within ±10 % so that many callbacks failing together do not retry together."""
    base = min(MAX_DELAY_S, FIRST_DELAY_S * 2.0 ** min(max(attempt, 1) - 1, 30))
    return min(MAX_DELAY_S, max(FIRST_DELAY_S * 0.9, base * rng(0.9, 1.1)))


# -- addresses -------------------------------------------------------------------------------------------------------
def address_problem(address: Address) -> str | None:
    """Why a callback may not go to ``address`` (``"loopback"``, ``"private"``, …), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = address.ipv4_mapped
        how = "IPv4-mapped"
        if embedded is None and address.sixtofour is not None:
            embedded, how = address.sixtofour, "6to4"
        if embedded is None and address.teredo is not None:
            embedded, how = address.teredo[1], "Teredo"
        if embedded is None and address in _NAT64:
            embedded, how = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
        if embedded is not None:
            problem = address_problem(embedded)
            if problem is not None:
                return f"{problem} ({how} {embedded})"
            if how == "IPv4-mapped":
                return None
    for problem, holds in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private and not address.is_reserved),
        ("reserved", address.is_reserved),
        ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
    ):
        if holds:
            return problem
    if not address.is_global:
        return "not globally routable"
    return None


def literal_address(host: str) -> Address | None:
    """The address ``host`` spells, in any notation the system resolver accepts for IPv4 (decimal ``2130706433``,
    hex ``0x7f.1``, octal ``0177.0.0.1``, short ``127.1``) or IPv6; None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class CallbackRefused(ValueError):
    """A callback URL or one of its addresses is not allowed; the message says why."""


def parse(url: str) -> URL:
    """The URL, checked for everything but its addresses; :class:`CallbackRefused` saying why not."""
    if type(url) is not str or not url:
        raise CallbackRefused("the callback URL must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise CallbackRefused(f"the callback URL is {len(url):,} characters long (at most {MAX_URL_CHARS:,})")
    if _BAD_CHARACTERS.search(url):
        raise CallbackRefused("the callback URL contains a space, a backslash or a control character")
    try:
        parsed = URL(url)
        port = parsed.port
    except (ValueError, TypeError) as exc:
        raise CallbackRefused(f"the callback URL does not parse: {exc}"[:300]) from None
    if parsed.scheme not in ("http", "https"):
        raise CallbackRefused(f"the callback URL's scheme is {parsed.scheme!r:.20}: only http and https are allowed")
    if parsed.user is not None or parsed.password is not None or "@" in (parsed.raw_authority or ""):
        raise CallbackRefused("the callback URL carries credentials (user:password@): put none in it")
    if parsed.fragment or "#" in url:
        raise CallbackRefused("the callback URL has a fragment (#…): remove it")
    host = parsed.host
    if not host:
        raise CallbackRefused("the callback URL has no host")
    if "%" in host:
        raise CallbackRefused("the callback URL's host has an IPv6 zone (%…): not allowed")
    if port is None or not 0 < port < 65536:
        raise CallbackRefused(f"the callback URL's port {port} is not 1 … 65535")
    return parsed


def _host_problem(host: str) -> str | None:
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return f"the callback URL's host {host!r:.80} is loopback (localhost)"
    return None


def check_addresses(host: str, addresses: Sequence[str], allow_private: bool) -> list[Address]:
    """``addresses`` (what ``host`` resolved to) parsed and each checked; :class:`CallbackRefused` naming the first
    address that is not allowed (every one must be)."""
    if not addresses:
        raise CallbackRefused(f"the callback URL's host {host!r:.80} resolved to no address")
    out: list[Address] = []
    for text in list(dict.fromkeys(addresses))[:MAX_ADDRESSES]:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise CallbackRefused(
                f"the callback URL's host {host!r:.80} resolved to {text!r:.60}, not an address"
            ) from None
        problem = None if allow_private else address_problem(address)
        if problem is not None:
            raise CallbackRefused(
                f"the callback URL's host {host!r:.80} resolves to {address}, a {problem} address; callbacks go to "
                "public addresses unless campaigns.allow_private_callbacks = true"
            )
        out.append(address)
    return out


def _system_resolve(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def check_callback_url(
    url: str, allow_private: bool, *, resolve: Callable[[str, int], list[str]] = _system_resolve
) -> str | None:
    """None when ``url`` may be called back, else why not (one line). Resolves the host (blocking: call it from an
    executor, not on the event loop); :func:`deliver` checks again when it sends."""
    try:
        parsed = parse(url)
        host, port = parsed.host or "", parsed.port or 0
        if not allow_private and (problem := _host_problem(host)):
            return problem
        literal = literal_address(host)
        if literal is not None:
            check_addresses(host, [str(literal)], allow_private)
            return None
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            return f"the callback URL's host {host!r:.80} does not resolve: {exc}"[:300]
        check_addresses(host, addresses, allow_private)
    except CallbackRefused as exc:
        return str(exc)
    return None


# -- delivery --------------------------------------------------------------------------------------------------------
class PinnedResolver(AbstractResolver):
    """An aiohttp resolver that answers ``host`` with the addresses already checked, and nothing else."""

    def __init__(self, host: str, addresses: Sequence[Address]) -> None:
        self.host = host
        self.addresses = list(addresses)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"callback: {host!r:.80} is not the checked host {self.host!r:.80}")
        return [
            ResolveResult(
                hostname=self.host,
                host=str(address),
                port=port,
                family=socket.AF_INET if address.version == 4 else socket.AF_INET6,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        return None


async def _loop_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def deliver(
    url: str,
    payload: dict[str, Any],
    secret: bytes,
    *,
    allow_private: bool,
    timeout: float,
    resolve: Callable[[str, int], Awaitable[list[str]]] = _loop_resolve,
    clock: Callable[[], float] = time.time,
) -> tuple[bool, str | None]:
    """POST ``payload`` to ``url``, signed: (True, None) on a 2xx answer, else (False, why). Never raises for
    anything the receiver or the network does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        parsed = parse(url)
        host, port = parsed.host or "", parsed.port or 0
        if not allow_private and (problem := _host_problem(host)):
            return False, problem
        literal = literal_address(host)
        if literal is not None:
            addresses = check_addresses(host, [str(literal)], allow_private)
        else:
            try:
                answer = await asyncio.wait_for(resolve(host, port), timeout)
            except (OSError, UnicodeError, asyncio.TimeoutError) as exc:
                return False, f"the callback URL's host {host!r:.80} does not resolve: {str(exc) or 'timed out'}"[:300]
            addresses = check_addresses(host, answer, allow_private)
    except CallbackRefused as exc:
        return False, str(exc)
    body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    timestamp = int(clock())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Lens-Timestamp": str(timestamp),
        "X-Lens-Signature": sign(secret, timestamp, body),
    }
    connector = aiohttp.TCPConnector(
        resolver=PinnedResolver(host, addresses), use_dns_cache=False, force_close=True, limit=1
    )
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=max(0.05, deadline - loop.time())),  # one bound for it all
                trust_env=False,  # no proxy from the environment
                auto_decompress=False,  # a compressed error answer is not inflated to read 1 KiB of it
            ) as session,
            session.post(parsed, data=body, headers=headers, allow_redirects=False) as response,
        ):
            if 200 <= response.status < 300:
                return True, None
            if 300 <= response.status < 400:
                where = response.headers.get("Location", "")[:200]
                return False, f"HTTP {response.status}: redirects are not followed (Location: {where!r})"
            text = await response.content.read(MAX_ANSWER_BYTES)
            shown = _BAD_CHARACTERS.sub(" ", text.decode("utf-8", "replace")).strip()[:200]
            return False, f"HTTP {response.status}: {shown}" if shown else f"HTTP {response.status}"
    except asyncio.TimeoutError:
        return False, f"no answer within {timeout:g} s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:300]
