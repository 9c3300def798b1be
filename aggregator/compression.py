"""Negotiated gzip for what the aggregator serves to readers: pages, JSON and CSV answers, ``/metrics``, static files.

A response is gzipped when the client asked for it (``Accept-Encoding`` names ``gzip`` with a non-zero q), it
answers a ``GET`` (or ``HEAD``), its whole body is in hand and at least :data:`MIN_BYTES` long, and it is not
compressed already (a ``Content-Encoding`` set, or a type that is compressed inside: Parquet, images). Never
compressed: the live stream ``/api/v1/stream`` (a ``StreamResponse`` written event by event: a gzip stream would
hold events back in the compressor), the ingest answer (a ``POST``: devices read it on the hot path, and a zstd
batch's answer is compressed as the device asked), file downloads streamed from disk. aiohttp compresses a body over
4 KiB on its executor, off the event loop. ``Vary: Accept-Encoding`` goes on every response that could be
compressed, so a cache never serves gzip to a client that did not ask for it. Sizes measured:
``bench/fleet_bytes.py`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.web_response import ContentCoding

MIN_BYTES = 1024  # smaller bodies gain little and a gzip header and trailer take 18 bytes
# bodies compressed inside already: a second pass costs CPU for nothing
COMPRESSED_TYPES = frozenset(
    {
        "application/vnd.apache.parquet",
        "application/zstd",
        "application/gzip",
        "application/zip",
        "image/png",
        "image/jpeg",
        "image/webp",
        "font/woff2",
    }
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def accepts_gzip(header: str) -> bool:
    """Whether an ``Accept-Encoding`` value asks for gzip: ``gzip`` (or ``x-gzip``) listed with q above 0. A ``*``
    alone is not taken as a request for gzip (the answer stays readable to whoever sent it)."""
    for part in header.split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        return q > 0
    return False


def compressible(request: web.Request, response: web.StreamResponse) -> bool:
    """Whether ``response`` is one this module gzips (whatever the client asked)."""
    if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD) or type(response) is not web.Response:
        return False  # a StreamResponse (the live stream), a FileResponse, anything prepared already
    body = response.body
    if not isinstance(body, (bytes, bytearray)) or len(body) < MIN_BYTES:
        return False
    return hdrs.CONTENT_ENCODING not in response.headers and response.content_type not in COMPRESSED_TYPES


@web.middleware
async def gzip_responses(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gzips a finished response when the client asked for it (see the module's description)."""
    response = await handler(request)
    if not compressible(request, response):
        return response
    response.headers.add(hdrs.VARY, hdrs.ACCEPT_ENCODING)
    if accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING, "")):
        response.enable_compression(ContentCoding.gzip)
    return response
