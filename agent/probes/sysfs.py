"""Reading sysfs-like trees under a configurable root, with an injectable file reader."""

from __future__ import annotations

import glob as _glob
from collections.abc import Callable
from pathlib import Path


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


class Root:
    """``Root("/")`` reads the real system; ``Root(DIR)`` reads ``DIR/sys/...``, ``DIR/proc/...``, ``DIR/etc/...``.

    ``reader`` is how files are read: tests inject one that raises ``PermissionError`` for chosen paths, since
    everything runs as root here and chmod does not deny root.
    """

    def __init__(self, root: Path | str = "/", reader: Callable[[Path], str] = _read_text) -> None:
        self.root = Path(root)
        self._reader = reader

    @property
    def is_real(self) -> bool:
        return self.root.resolve() == Path("/")

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str) -> str:
        """The file's text, stripped (and cut at a NUL, as device-tree strings are). Raises OSError."""
        return self._reader(self.path(rel)).split("\x00", 1)[0].strip()

    def read_int(self, rel: str) -> int:
        text = self.read(rel)
        try:
            return int(text)
        except ValueError:
            raise OSError(f"{self.path(rel)}: expected an integer, found {text[:40]!r}") from None

    def try_read(self, rel: str) -> str | None:
        try:
            return self.read(rel)
        except OSError:
            return None

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def glob(self, pattern: str) -> list[str]:
        """Matches of ``pattern`` (written as an absolute path), returned as absolute paths under the root."""
        base = str(self.root).rstrip("/")
        matches = sorted(_glob.glob(base + "/" + pattern.lstrip("/")))
        return ["/" + m[len(base) :].lstrip("/") for m in matches]
