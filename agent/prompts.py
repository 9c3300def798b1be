"""Prompt sets: a built-in one, or a file (``.txt``: one prompt a line; ``.jsonl``: ``{"prompt": …, "id": …}``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PromptFileError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_prompts() -> list[Prompt]:
    # beside this module (package data), read without importlib.resources (which loads zipfile and its company)
    text = (Path(__file__).parent / "data" / "prompts.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text, "(built-in prompts)")


def load_prompts(path: Path | str | None) -> list[Prompt]:
    if path is None:
        return builtin_prompts()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(str(path), "no such file; expected a .txt (one prompt a line) or .jsonl file") from None
    except IsADirectoryError:
        raise PromptFileError(str(path), "is a directory; expected a .txt or .jsonl file") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(str(path), f"is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PromptFileError(str(path), f"cannot be read ({exc.strerror})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        prompts = _parse_jsonl(text, str(path))
    else:
        prompts = [
            Prompt(id=f"{path.stem}:{n}", text=line.strip())
            for n, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not prompts:
        raise PromptFileError(str(path), "contains no prompts")
    return prompts


def _parse_jsonl(text: str, source: str) -> list[Prompt]:
    prompts: list[Prompt] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(source, f"line {n}: not valid JSON ({exc.msg})") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise PromptFileError(source, f'line {n}: expected an object with a non-empty "prompt" string')
        prompts.append(Prompt(id=str(item.get("id", f"{n}")), text=item["prompt"]))
    return prompts
