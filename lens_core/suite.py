"""Suite documents (seed §2.3 plus documented extensions): the structural checks both roles share.

A suite document is hostile input until checked. The checks here need nothing but the document and a set of
numeric limits (:class:`SuiteLimits`): types, required and unknown keys, names, endpoint schemes and URLs (no
credentials in a URL), the auth object's shape, enumerations, bounds, levels, duplicate names and nesting depth.
Every refusal is a :class:`SuiteError` naming the source, the JSON path (``$.workloads[0].concurrency``), the value
and what is allowed; a secret (anything under ``auth``, a URL carrying credentials) is never echoed.

The aggregator checks a campaign's configuration with :func:`check_document` and stores it as :func:`canonical_json`
under :func:`document_sha256`; the device (agent/suite.py) runs the same checks through a :class:`SuiteChecker`
subclass whose hooks add what only the device can judge — a dataset, credentials or model file inside its own
directories, a GGUF file — so both sides refuse a document at the same JSON path with the same message. Nothing here
reads a file, imports the agent or PyYAML. docs/suites.md describes the format.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import UsageError
from .settings import BOUNDS

MAX_DEPTH = 32  # nesting of objects and arrays in a document; the schema needs 4
MAX_NAME_CHARS = 128  # suite, model and workload names
MAX_TEXT_CHARS = 4096  # description
MAX_URL_CHARS = 2048
MAX_PATH_CHARS = 4096
MAX_INPUT_TOKENS = BOUNDS["n_ctx"][1]  # input_token_range.max: no model takes a longer prompt
MAX_WARMUP = 1000
MAX_SEED = (1 << 63) - 1
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
DATASET_EXTENSIONS = (".txt", ".jsonl", ".ndjson")  # a dataset is a prompt file, nothing else
API_TYPES = ("openai", "vllm", "tgi", "custom")
AUTH_TYPES = ("bearer", "api_key", "none")
APIS = ("auto", "chat", "completions")
ARRIVALS = ("constant", "poisson")
SETTING_KEYS = ("n_ctx", "n_threads", "n_batch", "n_gpu_layers", "flash_attn")
HIDDEN = "(hidden)"  # shown instead of a value that is, or may hold, a secret
# a query parameter named like one of these carries a credential: refused, and the URL is never echoed
_SECRET_PARAM = re.compile(r"key|token|secret|passw|pwd|auth|signature|sig$|credential|session", re.IGNORECASE)
_GGUF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
# a character outside RFC 3986 (or a % not starting an escape): the schema's "format": "uri" refuses it too
_URL_CHARS = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]|%(?![0-9A-Fa-f]{2})")


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


MISSING: Any = _Missing()  # the value shown for a required key that is absent
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
            value = HIDDEN
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
    # a credentials_path is a path, not a secret: shown (the file's content never is)
    return re.search(r"\.auth(\.|\[|$)", path) is not None and not path.endswith(".auth.credentials_path")


def _holds_secret(value: object, depth: int = 0) -> bool:
    """Whether a value about to be shown is, or holds, an ``auth`` object or a URL carrying credentials."""
    if isinstance(value, str):
        return any(ch in value for ch in "@?#=") and url_has_credentials(value)
    if depth > 3:
        return False
    if isinstance(value, dict):
        return "auth" in value or any(_holds_secret(v, depth + 1) for v in list(value.values())[:64])
    if isinstance(value, (list, tuple)):
        return any(_holds_secret(v, depth + 1) for v in value[:64])
    return False


def url_has_credentials(text: str) -> bool:
    """Whether a URL carries credentials: a user or password (``user:pw@host``) or a query parameter named like a
    key, token, secret, password, auth or signature."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return "@" in text
    if "@" in parts.netloc:
        return True
    for segment in re.split(r"[/;]", unquote(parts.path)):  # a path segment or ;parameter like key=… or token=…
        name, eq, _ = segment.partition("=")
        if eq and _SECRET_PARAM.search(name):
            return True
    for part in (parts.query, parts.fragment):  # a fragment can carry a token too (#access_token=…)
        if any(_SECRET_PARAM.search(name) for name, _ in parse_qsl(part, keep_blank_values=True)):
            return True
        if _SECRET_PARAM.search(unquote(part)):  # names parse_qsl does not split out (a=1;token=…)
            return True
    return False


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` of an http(s) URL, lower-cased, the default port (80, 443) left out; ValueError
    when the URL has no http(s) scheme or host, or a bad port."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host or "@" in parts.netloc:
        raise ValueError("not an http(s)://host[:port] origin")
    port = parts.port
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    if port is None or port == {"http": 80, "https": 443}[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def redact_at(text: str) -> str:
    """A string as it may be shown: everything up to its last ``@`` (a user or password, maybe) cut off."""
    return "…@" + text.rsplit("@", 1)[1] if "@" in text else text


@dataclass(frozen=True, kw_only=True)
class SuiteLimits:
    """How much a suite may ask for: the numeric half of the agent's ``[suite]`` policy (agent.suite.SuitePolicy)."""

    max_concurrency: int = 64
    max_rate: float = 500.0  # requests per second
    max_duration_s: int = 6 * 3600
    max_requests: int = 100_000
    max_output_tokens: int = 4096
    max_levels: int = 16  # concurrency levels + rates per workload
    max_models: int = 16
    max_workloads: int = 32
    max_document_bytes: int = 1 << 20


@dataclass(frozen=True)
class SuiteModel:
    name: str
    endpoint: str  # as written
    kind: str  # "endpoint" (http/https OpenAI-compatible base URL) | "local" (a GGUF file)
    url: str | None  # endpoint: base URL ending in /v1
    path: Path | None  # local: the GGUF file (None when checked without the device: check_document)
    api_type: str  # openai | vllm | tgi | custom
    auth_type: str  # bearer | api_key | none
    credentials_path: Path | None  # None for auth none, or when checked without the device
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
    dataset: Path | None  # None: the built-in prompts (or checked without the device)
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
    sha256: str  # of the document's bytes (parse_suite: document_sha256, of its canonical JSON)
    models: tuple[SuiteModel, ...]
    workloads: tuple[SuiteWorkload, ...]


# -- the public entry points ------------------------------------------------------------------------------------
def check_document(document: object, *, source: str, limits: SuiteLimits) -> None:
    """Check a parsed suite document's structure; SuiteError at the first problem.

    Everything that needs no file system: a dataset, credentials or model file is checked for its shape only (the
    device checks it against its own directories when it parses the document).
    """
    check_suite(document, SuiteChecker(source, limits), sha256="", default_name="suite")


def rate_text(rate: float | None) -> str:
    """A rate as the shortest text that reads back as the same float (``2``, ``0.5``, ``100.00001``): two levels'
    labels differ whenever their rates do."""
    if rate is None:
        return "n/a"
    text = repr(float(rate))
    return text[:-2] if text.endswith(".0") else text


def closed_label(concurrency: int) -> str:
    return f"concurrency {concurrency}"


def open_label(rate: float, arrival: str) -> str:
    return f"{rate_text(rate)} req/s {arrival}"


def workload_labels(workload: SuiteWorkload) -> list[str]:
    """The labels of a workload's levels, in run order: closed loop at each concurrency, then open loop at each rate
    (concurrency 1 when it names neither) — what a device's records and results documents carry as the level."""
    labels = [closed_label(c) for c in workload.concurrency]
    labels += [open_label(r, workload.arrival) for r in workload.rates]
    return labels or [closed_label(1)]


def level_keys(document: object, *, limits: SuiteLimits | None = None) -> set[tuple[str, str, str]]:
    """Every (model, workload, level label) a checked suite document runs: what an aggregator counts in a campaign's
    results (a device's record for anything else is its say only). SuiteError for a document that fails the checks."""
    suite = check_suite(
        document, SuiteChecker("configuration", limits or SuiteLimits()), sha256="", default_name="suite"
    )
    return {(m.name, w.name, label) for m in suite.models for w in suite.workloads for label in workload_labels(w)}


def document_text(data: bytes, *, source: str, limits: SuiteLimits) -> str:
    """A document's bytes as text: at most ``limits.max_document_bytes`` bytes of UTF-8 (a BOM is allowed)."""
    if len(data) > limits.max_document_bytes:
        raise SuiteError(
            source, "$", f"more than {limits.max_document_bytes} bytes", f"at most {limits.max_document_bytes} bytes"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SuiteError(source, "$", f"byte {exc.start}", "UTF-8 text") from None


def parse_json_document(data: bytes, *, source: str, limits: SuiteLimits) -> object:
    """A JSON document from its bytes, size- and depth-capped, a key given twice and over-long numbers refused.

    The result is plain data still to be checked (:func:`check_document`); SuiteError at ``$`` when it is not JSON.
    """
    text = document_text(data, source=source, limits=limits)
    try:
        document = json.loads(text, object_pairs_hook=_json_pairs)
    except json.JSONDecodeError as exc:
        raise SuiteError(source, "$", f"line {exc.lineno} column {exc.colno}: {exc.msg}", "valid JSON") from None
    except RecursionError:
        raise SuiteError(source, "$", "deeper nesting", f"at most {MAX_DEPTH} nested levels") from None
    except _KeyTwice as exc:
        where = _duplicate_key_path(text) or "$"
        raise SuiteError(source, where, f"key {exc.key!r} twice", "each key once per object") from None
    except ValueError as exc:  # an integer literal past Python's digit limit
        raise SuiteError(source, "$", str(exc)[:60], "valid JSON with numbers of at most 4300 digits") from None
    check_depth(document, source)
    return document


def canonical_json(document: object) -> bytes:
    """A checked document as canonical JSON: keys sorted, compact separators, UTF-8 (not ASCII-escaped).

    ValueError for NaN or infinity, TypeError for a value JSON cannot hold; a checked document has neither.
    """
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def document_sha256(document: object) -> str:
    """The hex sha256 of :func:`canonical_json`: the digest a campaign's configuration is stored and checked under."""
    return hashlib.sha256(canonical_json(document)).hexdigest()


class _KeyTwice(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object's (key, value) pairs as read, duplicates kept."""


def _duplicate_key_path(text: str) -> str | None:
    """The JSON path of the first key given twice in ``text`` (a document already read once: parses)."""
    try:
        document = json.loads(text, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[object, str]] = [(document, "$")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Pairs):
            seen: set[str] = set()
            for key, _ in item:
                if key in seen:
                    return _key_path(path, key)
                seen.add(key)
            stack.extend((value, _key_path(path, key)) for key, value in reversed(item))
        elif isinstance(item, list):
            stack.extend((value, f"{path}[{i}]") for i, value in reversed(list(enumerate(item))))
    return None


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _KeyTwice(key)
        out[key] = value
    return out


def check_depth(document: object, source: str) -> None:
    """SuiteError when objects and arrays nest deeper than :data:`MAX_DEPTH` (iteratively: no recursion limit)."""
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise SuiteError(source, "$", "deeper nesting", f"at most {MAX_DEPTH} nested levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


# -- checking ---------------------------------------------------------------------------------------------------
def key_path(parent: str, key: object) -> str:
    """The JSON path of ``key`` in the object at ``parent``: ``$.a.b`` or ``$.a["odd key"]``."""
    return _key_path(parent, key)


def _key_path(parent: str, key: object) -> str:
    if isinstance(key, str) and _PLAIN_KEY.match(key) and len(key) <= 64:
        return f"{parent}.{key}"
    text = json.dumps(str(key)[:64], ensure_ascii=True)
    return f"{parent}[{text}]"


class SuiteChecker:
    """The checks of one document's values, each raising SuiteError with the source and JSON path.

    The four hooks are called where a document names a file, once its shape is checked; here they resolve nothing
    (None). The device's checker (agent/suite.py) overrides them to check the file against its own directories.
    """

    def __init__(self, source: str, limits: SuiteLimits) -> None:
        self.source = source
        self.limits = limits

    # hooks: a file named by the document, its shape checked ------------------------------------------------------
    def local_model(self, path: str, text: str, file_path: str) -> Path | None:
        """A ``file:`` endpoint (``text`` as written) naming ``file_path`` (unquoted, not empty)."""
        return None

    def named_model(self, path: str, text: str, ref: str) -> Path | None:
        """A ``gguf:`` endpoint: ``default``, ``bundled`` or a plain file name."""
        return None

    def endpoint(self, path: str, url: str) -> None:
        """An http(s) endpoint, its shape checked (``url``: the base URL ending in /v1, no credentials)."""
        return None

    def credentials(self, path: str, raw: str) -> Path | None:
        """An ``auth.credentials_path`` (a non-blank string of at most MAX_PATH_CHARS, no NUL)."""
        return None

    def dataset(self, path: str, ref: str) -> Path | None:
        """An ``input_dataset`` other than ``builtin`` (a string without control characters, not a URL)."""
        return None

    # value checks -------------------------------------------------------------------------------------------------
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
                import difflib  # for this message only

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


def check_suite(document: object, c: SuiteChecker, *, sha256: str, default_name: str) -> Suite:
    """The document checked by ``c`` (its hooks resolve the files it names) as a Suite; SuiteError at the first
    problem, in document order."""
    check_depth(document, c.source)
    limits = c.limits
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

    models_raw = c.array(top["models"], "$.models", limits.max_models, "models")
    models = tuple(_model(c, item, i) for i, item in enumerate(models_raw))
    _distinct(c, [m.name for m in models], "$.models", "model")
    workloads_raw = c.array(top["workloads"], "$.workloads", limits.max_workloads, "workloads")
    workloads = tuple(_workload(c, item, i) for i, item in enumerate(workloads_raw))
    _distinct(c, [w.name for w in workloads], "$.workloads", "workload")
    return Suite(
        name=name,
        description=description,
        version=version,
        source=c.source,
        sha256=sha256,
        models=models,
        workloads=workloads,
    )


def _distinct(c: SuiteChecker, names: list[str], path: str, what: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        folded = name.casefold()
        if folded in seen:
            raise c.fail(
                f"{path}[{i}].name", name, f"a {what} name used once (the same as {path}[{seen[folded]}].name)"
            )
        seen[folded] = i


def _model(c: SuiteChecker, value: object, i: int) -> SuiteModel:
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


def _endpoint(c: SuiteChecker, value: object, path: str) -> tuple[str, str | None, Path | None]:
    if not isinstance(value, str):
        raise c.fail(path, value, "a URL string: http(s)://host[:port]/v1, file:///path.gguf or gguf:NAME")
    if url_has_credentials(value):
        raise c.fail(
            path,
            HIDDEN,
            "a URL without credentials (no user:password@, no ?api_key=/token=…): "
            "name a file holding the key in auth.credentials_path",
        )
    try:
        text = c.string(value, path, limit=MAX_URL_CHARS, what="a URL")
    except SuiteError as exc:  # a malformed URL holding an @ (user:password@, maybe) is never echoed in full
        if "@" not in value:
            raise
        raise c.fail(path, redact_at(value)[:80], exc.allowed) from None
    if "@" in text:
        return _endpoint_checked(_AtHidingChecker(c), text, path)
    return _endpoint_checked(c, text, path)


class _AtHidingChecker:
    """A checker's ``fail`` showing a URL holding an ``@`` only from its last ``@`` on."""

    def __init__(self, checker: SuiteChecker) -> None:
        self.checker = checker

    def fail(self, path: str, value: object, allowed: str) -> SuiteError:
        shown = redact_at(value) if isinstance(value, str) else value
        return self.checker.fail(path, shown, allowed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.checker, name)


def _endpoint_checked(c: Any, text: str, path: str) -> tuple[str, str | None, Path | None]:
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
        url = f"{scheme}://{parts.netloc}{base}"
        c.endpoint(path, url)
        return "endpoint", url, None
    if scheme == "file":
        if parts.query:
            raise c.fail(path, text, "a file: URL without a query")
        if parts.netloc not in ("", "localhost"):
            raise c.fail(path, text, "a local file: file:///absolute/path.gguf or file:relative/path.gguf")
        file_path = unquote(parts.path)
        if not file_path or "\x00" in file_path:
            raise c.fail(path, text, "a file: URL naming a GGUF file")
        return "local", None, c.local_model(path, text, file_path)
    if scheme == "gguf":
        ref = text[len("gguf:") :]
        if ref not in ("bundled", "default") and (not _GGUF_NAME.match(ref) or ".." in ref):
            raise c.fail(
                path, text, "gguf:default, gguf:bundled or gguf:NAME with NAME a file name (letters, digits, . _ + -)"
            )
        return "local", None, c.named_model(path, text, ref)
    raise c.fail(path, text, "an http://, https://, file: or gguf: endpoint")


def _auth(c: SuiteChecker, value: object, path: str) -> tuple[str, Path | None]:
    if value is MISSING:
        return "none", None
    auth = c.obj(value, path, AUTH_KEYS)
    kind = c.choice(auth["type"], f"{path}.type", AUTH_TYPES) if "type" in auth else "none"
    if kind == "none":
        if "credentials_path" in auth:
            raise c.fail(
                f"{path}.credentials_path",
                auth["credentials_path"],
                "no credentials_path with auth type none (or absent)",
            )
        return kind, None
    if "credentials_path" not in auth:
        raise c.fail(f"{path}.credentials_path", MISSING, f"a credentials_path for auth type {kind!r}")
    where = f"{path}.credentials_path"
    raw = auth["credentials_path"]
    if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_PATH_CHARS or "\x00" in raw:
        raise c.fail(where, raw, "a file path (string) inside [suite] credentials_dirs")
    return kind, c.credentials(where, raw)


def _workload(c: SuiteChecker, value: object, i: int) -> SuiteWorkload:
    path = f"$.workloads[{i}]"
    limits = c.limits
    item = c.obj(value, path, WORKLOAD_KEYS, WORKLOAD_EXTENSIONS)
    name = c.name(item["name"], f"{path}.name") if "name" in item else f"workload-{i + 1}"

    dataset: Path | None = None
    ref = "builtin"
    if "input_dataset" in item:
        where = f"{path}.input_dataset"
        ref = c.string(item["input_dataset"], where, limit=MAX_PATH_CHARS, what="a dataset path")
        if ref != "builtin":
            if "\x00" in ref or "://" in ref:
                raise c.fail(where, ref, "'builtin' or a prompt file path (.txt / .jsonl) inside [suite] dataset_dirs")
            if not ref.lower().endswith(DATASET_EXTENSIONS):
                raise c.fail(
                    where, ref, "'builtin' or a prompt file: a path ending in " + ", ".join(DATASET_EXTENSIONS)
                )
            dataset = c.dataset(where, ref)

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
        c.integer(item["output_token_target"], f"{path}.output_token_target", 1, limits.max_output_tokens)
        if "output_token_target" in item
        else DEFAULT_OUTPUT_TOKENS
    )

    if "concurrency" in item and "concurrency_levels" in item:
        raise c.fail(
            f"{path}.concurrency_levels", item["concurrency_levels"], "either concurrency or concurrency_levels"
        )
    levels: list[int] = []
    if "concurrency" in item:
        levels = [c.integer(item["concurrency"], f"{path}.concurrency", 1, limits.max_concurrency)]
    elif "concurrency_levels" in item:
        where = f"{path}.concurrency_levels"
        raw = c.array(item["concurrency_levels"], where, limits.max_levels, "concurrency levels")
        for j, level in enumerate(raw):
            number = c.integer(level, f"{where}[{j}]", 1, limits.max_concurrency)
            if number in levels:
                raise c.fail(f"{where}[{j}]", number, "each concurrency level once")
            levels.append(number)
    rates: list[float] = []
    if "request_rates" in item:
        where = f"{path}.request_rates"
        raw = c.array(item["request_rates"], where, limits.max_levels, "request rates")
        for j, rate in enumerate(raw):
            per_s = c.number(rate, f"{where}[{j}]", limits.max_rate, "requests per second")
            if per_s in rates:
                raise c.fail(f"{where}[{j}]", rate, "each request rate once")
            rates.append(per_s)
    if not levels and not rates:
        levels = [1]
    if len(levels) + len(rates) > limits.max_levels:
        raise c.fail(
            f"{path}.request_rates",
            f"{len(levels)} + {len(rates)} levels",
            f"at most {limits.max_levels} concurrency levels and request rates together",
        )
    for key in ("arrival", "max_concurrency"):
        if key in item and not rates:
            raise c.fail(f"{path}.{key}", item[key], f"{key} only with request_rates (open-loop levels)")
    arrival = c.choice(item["arrival"], f"{path}.arrival", ARRIVALS) if "arrival" in item else "poisson"
    cap = (
        c.integer(item["max_concurrency"], f"{path}.max_concurrency", 1, limits.max_concurrency)
        if "max_concurrency" in item
        else None
    )
    duration = (
        c.integer(item["duration_seconds"], f"{path}.duration_seconds", 1, limits.max_duration_s)
        if "duration_seconds" in item
        else None
    )
    requests = c.integer(item["requests"], f"{path}.requests", 1, limits.max_requests) if "requests" in item else None
    if requests is None and duration is None:
        requests = DEFAULT_REQUESTS
    if duration is None and requests is not None and "request_rates" in item:
        # every level is held to [suite] max_duration: an open-loop schedule that cannot fit is refused here, not
        # cut short at run time
        for j, rate in enumerate(item["request_rates"]):
            span = requests / float(rate)
            if span > limits.max_duration_s:
                raise c.fail(
                    f"{path}.request_rates[{j}]",
                    rate,
                    f"a rate whose schedule fits in [suite] max_duration ({limits.max_duration_s} s): {requests} "
                    f"requests at {rate:g} req/s take {span:.3g} s (raise the rate, lower requests or give "
                    "duration_seconds)",
                )
    warmup = (
        c.integer(item["warmup_requests"], f"{path}.warmup_requests", 0, min(MAX_WARMUP, limits.max_requests))
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
