"""Live-stream clients in a process of their own, so that their work does not share the timing process's CPU:

    python -m tests.stream_readers HOST PORT READING SILENT

opens ``READING`` streams of ``GET /api/v1/stream`` that read everything (like an open fleet page) and ``SILENT`` ones
that send the request, read the answer's status line and then never read again (a stalled client). Prints
``ready {"statuses": {...}}`` on stdout once every stream has answered, keeps reading until stdin closes, then prints
``done {...}``: per reading stream the bytes and events received and whether the server closed it, and how many
silent streams the server closed (a silent stream finds out only when it is read at the end).
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from typing import Any


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /api/v1/stream HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    status = int((await asyncio.wait_for(reader.readline(), 60)).split()[1])
    return reader, writer, status


async def _read(reader: asyncio.StreamReader, stats: dict[str, Any]) -> None:
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            stats["closed"] = True
            return
        stats["bytes"] += len(chunk)
        stats["events"] += chunk.count(b"event: batch")
        stats["refetch"] += chunk.count(b'"type":"refetch"')


async def main(host: str, port: int, reading: int, silent: int) -> None:
    statuses: collections.Counter[int] = collections.Counter()
    opened = await asyncio.gather(*(_open(host, port) for _ in range(reading + silent)), return_exceptions=True)
    streams = []
    for result in opened:
        if isinstance(result, BaseException):
            statuses[-1] += 1
            continue
        statuses[result[2]] += 1
        streams.append(result)
    readers = streams[:reading]
    silents = streams[reading:]
    stats = [{"bytes": 0, "events": 0, "refetch": 0, "closed": False} for _ in readers]
    tasks = [asyncio.create_task(_read(r, s)) for (r, _, _), s in zip(readers, stats, strict=True)]
    print("ready " + json.dumps({"statuses": {str(k): v for k, v in statuses.items()}}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()

    async def ended(reader: asyncio.StreamReader) -> bool:
        """Whether the server closed a silent stream (after whatever the kernel held for it)."""
        try:
            while await asyncio.wait_for(reader.read(1 << 20), 1.0):
                pass
            return True
        except ConnectionError:  # reset: the server aborted it
            return True
        except asyncio.TimeoutError:  # still open
            return False

    silent_closed = sum(await asyncio.gather(*(ended(reader) for reader, _, _ in silents)))
    for _, writer, _ in streams:
        writer.close()
    print("done " + json.dumps({"readers": stats, "silent_closed": silent_closed}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
