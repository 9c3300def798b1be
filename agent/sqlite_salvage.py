"""Read rows straight out of a damaged SQLite file, page by page, when SQLite itself cannot.

A truncated or partly overwritten database often still holds most of its table leaf pages intact, but SQLite
reaches them through interior pages that may be gone, so ``SELECT`` fails. This reads the file format directly
(https://www.sqlite.org/fileformat2.html): every page that parses as a table leaf (type 0x0D) yields its live
cells — rowid and decoded record, following overflow chains where the pages exist. Pages on the freelist are
skipped when the freelist can be read, so deleted rows do not come back. Frames in a ``-wal`` file are read
too, newest last, so a newer copy of a page wins.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SQLITE_MAGIC = b"SQLite format 3\x00"
LEAF_TABLE = 0x0D


@dataclass
class ScanResult:
    rows: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # rowid → column values, across all tables
    tables_rows: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    pages_read: int = 0
    pages_unreadable: int = 0


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if pos + i >= len(data):
            raise ValueError("varint past the end")
        byte = data[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos + i + 1
    if pos + 8 >= len(data):
        raise ValueError("varint past the end")
    return (value << 8) | data[pos + 8], pos + 9


def _decode_record(payload: bytes) -> tuple[Any, ...]:
    header_size, pos = _varint(payload, 0)
    if header_size > len(payload) or header_size < 1:
        raise ValueError("bad record header")
    types = []
    while pos < header_size:
        serial, pos = _varint(payload, pos)
        types.append(serial)
    body = header_size
    values: list[Any] = []
    for serial in types:
        if serial == 0:
            values.append(None)
        elif 1 <= serial <= 6:
            width = (1, 2, 3, 4, 6, 8)[serial - 1]
            values.append(int.from_bytes(payload[body : body + width], "big", signed=True))
            body += width
        elif serial == 7:
            values.append(struct.unpack(">d", payload[body : body + 8])[0])
            body += 8
        elif serial in (8, 9):
            values.append(serial - 8)
        elif serial >= 12:
            size = (serial - 12) // 2
            chunk = payload[body : body + size]
            if len(chunk) != size:
                raise ValueError("record past the end of its payload")
            values.append(bytes(chunk) if serial % 2 == 0 else chunk.decode("utf-8"))
            body += size
        else:
            raise ValueError(f"reserved serial type {serial}")
    if body > len(payload):
        raise ValueError("record past the end of its payload")
    return tuple(values)


class _Pages:
    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        if not self.data.startswith(SQLITE_MAGIC) or len(self.data) < 100:
            raise ValueError("not an SQLite database")
        size = struct.unpack(">H", self.data[16:18])[0]
        self.page_size = 65536 if size == 1 else size
        if self.page_size < 512 or self.page_size & (self.page_size - 1):
            raise ValueError("bad page size")
        self.usable = self.page_size - self.data[20]
        self.overrides: dict[int, bytes] = {}

    def load_wal(self, wal: Path) -> None:
        if not wal.exists():
            return
        data = wal.read_bytes()
        if len(data) < 32:
            return
        page_size = struct.unpack(">I", data[8:12])[0]
        if page_size != self.page_size:
            return
        frame = 24 + page_size
        for start in range(32, len(data) - frame + 1, frame):
            number = struct.unpack(">I", data[start : start + 4])[0]
            if number:
                self.overrides[number] = data[start + 24 : start + frame]

    @property
    def count(self) -> int:
        """Pages the database says it has (header offset 28), or what the file and WAL hold."""
        declared = int(struct.unpack(">I", self.data[28:32])[0])
        return max(declared, len(self.data) // self.page_size, max(self.overrides, default=0))

    def page(self, number: int) -> bytes | None:
        if number in self.overrides:
            return self.overrides[number]
        start = (number - 1) * self.page_size
        if number < 1 or start + self.page_size > len(self.data):
            return None
        return self.data[start : start + self.page_size]

    def freelist(self) -> set[int]:
        free: set[int] = set()
        trunk = struct.unpack(">I", self.data[32:36])[0]
        seen = 0
        while trunk and seen < 100_000:
            page = self.page(trunk)
            if page is None:
                break
            free.add(trunk)
            next_trunk, leaves = struct.unpack(">II", page[:8])
            for i in range(min(leaves, (self.usable - 8) // 4)):
                free.add(struct.unpack(">I", page[8 + 4 * i : 12 + 4 * i])[0])
            trunk = next_trunk
            seen += 1
        return free

    def payload(self, page: bytes, offset: int) -> tuple[int, bytes]:
        size, pos = _varint(page, offset)
        rowid, pos = _varint(page, pos)
        x = self.usable - 35
        if size <= x:
            return rowid, page[pos : pos + size]
        m = ((self.usable - 12) * 32 // 255) - 23
        k = m + ((size - m) % (self.usable - 4))
        local = k if k <= x else m
        out = bytearray(page[pos : pos + local])
        next_page = struct.unpack(">I", page[pos + local : pos + local + 4])[0]
        hops = 0
        while len(out) < size and next_page and hops < 1_000_000:
            overflow = self.page(next_page)
            if overflow is None:
                raise ValueError("overflow page missing")
            next_page = struct.unpack(">I", overflow[:4])[0]
            out += overflow[4 : 4 + min(self.usable - 4, size - len(out))]
            hops += 1
        if len(out) < size:
            raise ValueError("overflow chain broken")
        return rowid, bytes(out)


def scan_leaf_rows(path: Path) -> tuple[list[tuple[int, tuple[Any, ...]]], int]:
    """Every live row of every table leaf page that can be read: ``[(rowid, values)]``, unreadable page count."""
    pages = _Pages(path)
    pages.load_wal(Path(str(path) + "-wal"))
    try:
        free = pages.freelist()
    except (ValueError, struct.error):
        free = set()
    rows: list[tuple[int, tuple[Any, ...]]] = []
    unreadable = 0
    for number in range(1, pages.count + 1):
        if number in free:
            continue
        page = pages.page(number)
        if page is None:
            unreadable += 1
            continue
        header = 100 if number == 1 else 0
        if page[header] != LEAF_TABLE:
            continue
        try:
            rows.extend(_cells(pages, page, header))
        except (ValueError, struct.error, UnicodeDecodeError, IndexError):
            unreadable += 1
    return rows, unreadable


def _cells(pages: _Pages, page: bytes, header: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
    ncells = struct.unpack(">H", page[header + 3 : header + 5])[0]
    out = []
    for i in range(ncells):
        pointer = struct.unpack(">H", page[header + 8 + 2 * i : header + 10 + 2 * i])[0]
        if pointer >= len(page):
            raise ValueError("cell pointer past the page")
        rowid, payload = pages.payload(page, pointer)
        out.append((rowid, _decode_record(payload)))
    return iter(out)
