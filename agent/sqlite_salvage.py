"""Read rows straight out of a damaged SQLite file, page by page, when SQLite itself cannot.

A truncated or partly overwritten database often still holds most of its table leaf pages intact, but SQLite
reaches them through interior pages that may be gone, so ``SELECT`` fails. This reads the file format directly
(https://www.sqlite.org/fileformat2.html): every page that parses as a table leaf (type 0x0D) yields its live
cells — rowid and decoded record, following overflow chains where the pages exist.

* **No trust in page 1.** When the 100-byte header is gone (zeroed, overwritten), the page size is taken from the
  ``-wal`` header if there is one, else found by trying every possible size (512 … 65536) and keeping the one under
  which the most pages parse as b-tree pages. Only a real page size lines up with the pages' own headers.
* **Deleted rows stay deleted** where that can be known: pages on the freelist are skipped when the header names it.
* **The WAL as SQLite would read it**: only frames whose salts match the WAL header and whose cumulative checksums
  verify, up to the last commit frame; a newer copy of a page wins. Frames left from an earlier WAL generation or
  a torn last transaction are ignored, so stale pages do not come back.
* **Damage is counted**: a page that is neither a b-tree page, an overflow page of a row that was read, a freelist
  page nor an empty (all-zero) page is unreadable — so is page 1 without its header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SQLITE_MAGIC = b"SQLite format 3\x00"
LEAF_TABLE = 0x0D
BTREE_TYPES = (0x02, 0x05, 0x0A, 0x0D)  # interior index, interior table, leaf index, leaf table
PAGE_SIZES = tuple(1 << n for n in range(9, 17))  # 512 … 65536
WAL_MAGIC = (0x377F0682, 0x377F0683)  # little-endian / big-endian checksums


@dataclass
class ScanResult:
    rows: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)  # (rowid, values) of every table leaf
    page_size: int = 0
    page_size_from: str = "header"  # header, wal or detected (the header was unreadable)
    header_ok: bool = True
    pages: int = 0
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


def _looks_like_btree(page: bytes | memoryview, header: int, usable: int) -> bool:
    """Whether ``page`` has a self-consistent b-tree page header at ``header`` for pages of ``usable`` bytes."""
    if len(page) < header + 12 or page[header] not in BTREE_TYPES:
        return False
    first_free, ncells, content = struct.unpack(">HHH", page[header + 1 : header + 7])
    content = content or 65536
    array_end = header + (8 if page[header] in (0x0A, 0x0D) else 12) + 2 * ncells
    if page[header + 7] > 60 or not array_end <= content <= usable:
        return False
    if first_free and not array_end <= first_free < usable:
        return False
    pointers = struct.unpack(f">{ncells}H", page[array_end - 2 * ncells : array_end])
    return all(content <= pointer < usable for pointer in pointers)


def detect_page_size(data: bytes) -> int:
    """The page size under which the most pages of ``data`` parse as b-tree pages (the header is not read)."""
    best, best_count = 0, 0
    view = memoryview(data)  # slices without copies: a 256 MiB file is read 8 times over
    for size in PAGE_SIZES:
        count = 0
        for start in range(0, len(data) - size + 1, size):
            header = 100 if start == 0 else 0
            count += _looks_like_btree(view[start : start + size], header, size)
        if count > best_count:
            best, best_count = size, count
    if not best_count:
        raise ValueError("no page parses as a b-tree page under any page size")
    return best


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def read_wal(path: Path) -> tuple[int, dict[int, bytes], int]:
    """The committed pages of a ``-wal`` file: ``(page size, {page number: content}, database pages)``.

    Frames count only while their salts match the header and the checksum chain holds, and only up to the last
    commit frame; ``(0, {}, 0)`` when there is no usable WAL.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return 0, {}, 0
    if len(data) < 32:
        return 0, {}, 0
    magic, _version, page_size, _seq, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:32])
    if magic not in WAL_MAGIC or page_size not in PAGE_SIZES:
        return 0, {}, 0
    big_endian = magic == WAL_MAGIC[1]
    if _wal_checksum(data[:24], big_endian, 0, 0) != (c0, c1):
        return 0, {}, 0
    frame = 24 + page_size
    pending: dict[int, bytes] = {}
    committed: dict[int, bytes] = {}
    db_pages = 0
    s0, s1 = c0, c1
    for start in range(32, len(data) - frame + 1, frame):
        number, size_after, f_salt1, f_salt2, f0, f1 = struct.unpack(">6I", data[start : start + 24])
        if (f_salt1, f_salt2) != (salt1, salt2) or not number:
            break
        s0, s1 = _wal_checksum(data[start : start + 8], big_endian, s0, s1)
        s0, s1 = _wal_checksum(data[start + 24 : start + frame], big_endian, s0, s1)
        if (s0, s1) != (f0, f1):
            break
        pending[number] = data[start + 24 : start + frame]
        if size_after:  # a commit frame: everything up to here is committed
            committed.update(pending)
            pending.clear()
            db_pages = size_after
    return page_size, committed, db_pages


class _Pages:
    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        wal_page_size, self.overrides, self.wal_db_pages = read_wal(Path(str(path) + "-wal"))
        header_size = struct.unpack(">H", self.data[16:18])[0] if len(self.data) >= 100 else 0
        header_size = 65536 if header_size == 1 else header_size
        self.header_ok = self.data.startswith(SQLITE_MAGIC) and header_size in PAGE_SIZES
        if self.header_ok:
            self.page_size, self.page_size_from = header_size, "header"
            self.usable = self.page_size - self.data[20]
        else:
            if wal_page_size:
                self.page_size, self.page_size_from = wal_page_size, "wal"
            elif len(self.data) >= 512:
                self.page_size, self.page_size_from = detect_page_size(self.data), "detected"
            else:
                raise ValueError("not an SQLite database (too short and no WAL)")
            self.usable = self.page_size  # the reserved-bytes field was in the lost header; SQLite's default is 0
        if wal_page_size and wal_page_size != self.page_size:
            self.overrides, self.wal_db_pages = {}, 0  # a WAL of another database (or page size): not ours

    @property
    def count(self) -> int:
        """Pages the database says it has (header offset 28), or what the file and WAL hold."""
        declared = int(struct.unpack(">I", self.data[28:32])[0]) if self.header_ok else 0
        return max(declared, len(self.data) // self.page_size, self.wal_db_pages, max(self.overrides, default=0))

    def page(self, number: int) -> bytes | None:
        if number in self.overrides:
            return self.overrides[number]
        start = (number - 1) * self.page_size
        if number < 1 or start + self.page_size > len(self.data):
            return None
        return self.data[start : start + self.page_size]

    def freelist(self) -> set[int]:
        free: set[int] = set()
        if not self.header_ok:
            return free
        first = self.page(1)
        trunk = struct.unpack(">I", (first or self.data)[32:36])[0]
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

    def payload(self, page: bytes, offset: int, overflow_pages: set[int]) -> tuple[int, bytes]:
        size, pos = _varint(page, offset)
        rowid, pos = _varint(page, pos)
        x = self.usable - 35
        if size <= x:
            if pos + size > self.usable:
                raise ValueError("cell past the end of its page")
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
            overflow_pages.add(next_page)
            next_page = struct.unpack(">I", overflow[:4])[0]
            out += overflow[4 : 4 + min(self.usable - 4, size - len(out))]
            hops += 1
        if len(out) < size:
            raise ValueError("overflow chain broken")
        return rowid, bytes(out)


def scan_database(path: Path) -> ScanResult:
    """Every live row of every table leaf page that can be read, and how many pages could not be.

    Raises ``ValueError`` when nothing in the file looks like an SQLite database at all.
    """
    pages = _Pages(path)
    try:
        free = pages.freelist()
    except (ValueError, struct.error):
        free = set()
    result = ScanResult(page_size=pages.page_size, page_size_from=pages.page_size_from, header_ok=pages.header_ok)
    result.pages = pages.count
    overflow: set[int] = set()
    suspect: list[int] = []  # pages that are not b-tree pages: overflow pages of rows read, or damage
    for number in range(1, pages.count + 1):
        if number in free:
            continue
        page = pages.page(number)
        header = 100 if number == 1 else 0
        if page is None or (number == 1 and not pages.header_ok):
            result.pages_unreadable += 1
            continue
        if not _looks_like_btree(page, header, pages.usable):
            if any(page):
                suspect.append(number)
            continue
        if page[header] != LEAF_TABLE:
            continue
        rows, intact = _cells(pages, page, header, overflow)
        result.rows.extend(rows)
        result.pages_unreadable += not intact
    result.pages_unreadable += sum(1 for number in suspect if number not in overflow)
    return result


def scan_leaf_rows(path: Path) -> tuple[list[tuple[int, tuple[Any, ...]]], int]:
    """Every live row of every table leaf page that can be read: ``[(rowid, values)]``, unreadable page count."""
    result = scan_database(path)
    return result.rows, result.pages_unreadable


Row = tuple[int, tuple[Any, ...]]


def _cells(pages: _Pages, page: bytes, header: int, overflow: set[int]) -> tuple[list[Row], bool]:
    """The cells of one table leaf page that parse, and whether every cell did."""
    ncells = struct.unpack(">H", page[header + 3 : header + 5])[0]
    out = []
    intact = True
    for i in range(ncells):
        pointer = struct.unpack(">H", page[header + 8 + 2 * i : header + 10 + 2 * i])[0]
        chain: set[int] = set()
        try:
            if pointer >= len(page):
                raise ValueError("cell pointer past the page")
            rowid, payload = pages.payload(page, pointer, chain)
            out.append((rowid, _decode_record(payload)))
        except (ValueError, struct.error, UnicodeDecodeError, IndexError):
            intact = False
            continue
        overflow |= chain
    return out, intact
