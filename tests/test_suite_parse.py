"""Benchmark suite documents (agent/suite.py): what a suite may ask of a device, and every refusal's JSON path.

Documents are the seed's benchmark configuration (§2.3) plus documented extensions; every document the parser
accepts is valid against the seed's own schema (a property test), and hostile ones are refused naming the exact
JSON path, without echoing a secret. Prompts to a token range use real tokenizers: the tiny llama.cpp model's
(character-level) and the bundled SmolLM2's (BPE with real merges).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.engines.llama import EngineSettings, LlamaEngine
from agent.errors import UsageError
from agent.suite import (
    Suite,
    SuiteError,
    SuitePolicy,
    load_suite,
    parse_suite,
    read_credentials,
    url_has_credentials,
    workload_prompts,
)

DATA = Path(__file__).parent / "data"
SCHEMA = json.loads((DATA / "benchmark_config.schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
SECRET = "sk-live-0123456789abcdef"


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """Allowed dataset, credentials and model directories, a file outside them and a suite directory."""
    out = {name: tmp_path / name for name in ("data", "creds", "models", "outside", "suites")}
    for path in out.values():
        path.mkdir()
    (out["data"] / "prompts.txt").write_text("Tell me about rivers.\nName three colours.\n")
    (out["outside"] / "secret.txt").write_text("not yours\n")
    (out["data"] / "folder.txt").mkdir()  # a directory named like a prompt file
    (out["data"] / "link.txt").symlink_to(out["creds"] / "key")  # a prompt-file name linking to a key
    key = out["creds"] / "key"
    key.write_text(SECRET + "\n")
    key.chmod(0o600)
    return out


@pytest.fixture
def policy(dirs: dict[str, Path]) -> SuitePolicy:
    return SuitePolicy(dataset_dirs=(dirs["data"],), credentials_dirs=(dirs["creds"],), model_dirs=(dirs["models"],))


def base_document() -> dict[str, Any]:
    return {
        "test_suite": {"name": "edge-vs-cloud", "description": "one of each", "version": "1"},
        "models": [
            {"name": "cloud", "endpoint": "http://127.0.0.1:8080/v1", "api_type": "openai"},
            {"name": "smol", "endpoint": "gguf:bundled"},
        ],
        "workloads": [
            {"name": "short", "output_token_target": 32, "concurrency": 2, "duration_seconds": 30},
            {"name": "sweep", "concurrency_levels": [4, 1, 2], "requests": 8},
        ],
    }


def parse(document: object, policy: SuitePolicy, base_dir: Path | None = None) -> Suite:
    return parse_suite(document, source="suite.json", base_dir=base_dir, policy=policy)


def refused(document: object, policy: SuitePolicy, base_dir: Path | None = None) -> SuiteError:
    with pytest.raises(SuiteError) as info:
        parse(document, policy, base_dir)
    return info.value


# -- accepted documents -------------------------------------------------------------------------------------------
def test_seed_document_with_defaults(policy: SuitePolicy, smollm2: Path) -> None:
    document = base_document()
    VALIDATOR.validate(document)
    suite = parse(document, policy)
    assert (suite.name, suite.description, suite.version) == ("edge-vs-cloud", "one of each", "1")
    cloud, smol = suite.models
    assert (cloud.kind, cloud.url, cloud.path, cloud.auth_type, cloud.api) == (
        "endpoint",
        "http://127.0.0.1:8080/v1",
        None,
        "none",
        "auto",
    )
    assert (smol.kind, smol.path, smol.url) == ("local", smollm2, None)
    short, sweep = suite.workloads
    assert short.concurrency == (2,) and short.rates == () and short.duration_s == 30 and short.requests is None
    assert short.output_tokens == 32 and short.warmup == 1 and short.seed == 0 and short.dataset is None
    assert short.dataset_ref == "builtin" and short.arrival == "poisson"
    assert sweep.concurrency == (1, 2, 4) and sweep.requests == 8 and sweep.output_tokens == 128
    # the same document parses to the same digest; a change moves it
    assert parse(copy.deepcopy(document), policy).sha256 == suite.sha256
    document["workloads"][0]["concurrency"] = 3
    assert parse(document, policy).sha256 != suite.sha256


def test_extensions_and_normalised_urls(policy: SuitePolicy, dirs: dict[str, Path], tiny_model: Path) -> None:
    (dirs["models"] / "tiny.gguf").write_bytes(tiny_model.read_bytes())
    document = {
        "$schema": "https://example.org/benchmark_config.schema.json",
        "test_suite": {},
        "models": [
            {"name": "a", "endpoint": "https://api.example.org/v1/", "model": "llama-3-8b", "api": "chat"},
            {"name": "b", "endpoint": "http://[::1]:9000", "api_type": "vllm"},
            {"name": "c", "endpoint": "http://host:1/api/v1/chat/completions"},
            {"name": "d", "endpoint": "gguf:tiny", "settings": {"n_ctx": 512, "flash_attn": False, "n_threads": 2}},
            {"name": "e", "endpoint": "file:../models/tiny.gguf"},
            {"name": "f", "endpoint": f"file://{dirs['models'] / 'tiny.gguf'}"},
            {
                "name": "g",
                "endpoint": "http://127.0.0.1:1/v1",
                "auth": {"type": "bearer", "credentials_path": str(dirs["creds"] / "key")},
            },
        ],
        "workloads": [
            {
                "name": "open",
                "input_dataset": "../data/prompts.txt",
                "input_token_range": {"min": 8, "max": 64},
                "request_rates": [2.5, 0.5, 10],
                "arrival": "constant",
                "max_concurrency": 8,
                "requests": 50,
                "duration_seconds": 60,
                "warmup_requests": 0,
                "seed": 7,
            },
            {"input_dataset": "builtin"},
        ],
    }
    VALIDATOR.validate(document)
    suite = parse(document, policy, base_dir=dirs["suites"])
    assert suite.name == "suite"  # no test_suite.name: parse_suite's default (load_suite: the file's stem)
    urls = [m.url for m in suite.models[:3]]
    assert urls == ["https://api.example.org/v1", "http://[::1]:9000/v1", "http://host:1/api/v1"]
    assert (suite.models[0].served_model, suite.models[0].api, suite.models[1].api_type) == (
        "llama-3-8b",
        "chat",
        "vllm",
    )
    real = (dirs["models"] / "tiny.gguf").resolve()
    assert [m.path for m in suite.models[3:6]] == [real, real, real]
    assert suite.models[3].settings == {"n_ctx": 512, "flash_attn": False, "n_threads": 2}
    assert len({*suite.models, *suite.workloads}) == 9  # hashable: usable as keys
    assert (
        suite.models[6].auth_type == "bearer" and suite.models[6].credentials_path == (dirs["creds"] / "key").resolve()
    )
    open_loop, builtin = suite.workloads
    assert open_loop.rates == (0.5, 2.5, 10.0) and open_loop.concurrency == ()
    assert (open_loop.arrival, open_loop.max_concurrency, open_loop.requests, open_loop.duration_s) == (
        "constant",
        8,
        50,
        60,
    )
    assert (open_loop.warmup, open_loop.seed, open_loop.input_tokens) == (0, 7, (8, 64))
    assert open_loop.dataset == (dirs["data"] / "prompts.txt").resolve()
    assert builtin.name == "workload-2" and builtin.dataset is None and builtin.concurrency == (1,)
    assert builtin.requests == 32


def test_yaml_and_json_files_load_alike(policy: SuitePolicy, tmp_path: Path) -> None:
    document = base_document()
    as_json = tmp_path / "s.json"
    as_json.write_text(json.dumps(document))
    as_yaml = tmp_path / "nightly.yaml"
    as_yaml.write_text(
        "test_suite: {name: edge-vs-cloud, description: one of each, version: '1'}\n"
        "models:\n"
        "  - {name: cloud, endpoint: 'http://127.0.0.1:8080/v1', api_type: openai}\n"
        "  - {name: smol, endpoint: 'gguf:bundled'}\n"
        "workloads:\n"
        "  - {name: short, output_token_target: 32, concurrency: 2, duration_seconds: 30}\n"
        "  - {name: sweep, concurrency_levels: [4, 1, 2], requests: 8}\n"
    )
    from_json, from_yaml = load_suite(as_json, policy), load_suite(as_yaml, policy)
    assert from_json.models == from_yaml.models and from_json.workloads == from_yaml.workloads
    assert from_json.source == str(as_json)
    assert from_json.sha256 != from_yaml.sha256  # of each file's own bytes
    import hashlib

    assert from_yaml.sha256 == hashlib.sha256(as_yaml.read_bytes()).hexdigest()


# -- refusals -----------------------------------------------------------------------------------------------------
def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted path ("workloads.0.concurrency") in the base document."""

    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = document
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = document
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return mutate


HOSTILE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("string for int", _set("workloads.0.concurrency", "4"), "$.workloads[0].concurrency"),
    ("bool for int", _set("workloads.0.concurrency", True), "$.workloads[0].concurrency"),
    ("float for int", _set("workloads.0.duration_seconds", 30.0), "$.workloads[0].duration_seconds"),
    ("list for object", _set("test_suite", ["a"]), "$.test_suite"),
    ("list for model", _set("models.1", ["gguf:bundled"]), "$.models[1]"),
    ("object for array", _set("workloads", {"name": "x"}), "$.workloads"),
    ("string for range", _set("workloads.0.input_token_range", "8-64"), "$.workloads[0].input_token_range"),
    (
        "bool in range",
        _set("workloads.0.input_token_range", {"min": True, "max": 4}),
        "$.workloads[0].input_token_range.min",
    ),
    (
        "range min > max",
        _set("workloads.0.input_token_range", {"min": 9, "max": 4}),
        "$.workloads[0].input_token_range.min",
    ),
    (
        "range min 0",
        _set("workloads.0.input_token_range", {"min": 0, "max": 4}),
        "$.workloads[0].input_token_range.min",
    ),
    ("range max missing", _set("workloads.0.input_token_range", {"min": 4}), "$.workloads[0].input_token_range.max"),
    ("concurrency 10**6", _set("workloads.0.concurrency", 10**6), "$.workloads[0].concurrency"),
    ("concurrency 0", _set("workloads.0.concurrency", 0), "$.workloads[0].concurrency"),
    ("concurrency -1", _set("workloads.0.concurrency", -1), "$.workloads[0].concurrency"),
    ("level 10**6", _set("workloads.1.concurrency_levels", [1, 10**6]), "$.workloads[1].concurrency_levels[1]"),
    ("level twice", _set("workloads.1.concurrency_levels", [2, 2]), "$.workloads[1].concurrency_levels[1]"),
    ("levels empty", _set("workloads.1.concurrency_levels", []), "$.workloads[1].concurrency_levels"),
    (
        "too many levels",
        _set("workloads.1.concurrency_levels", list(range(1, 40))),
        "$.workloads[1].concurrency_levels",
    ),
    ("both concurrency keys", _set("workloads.0.concurrency_levels", [1]), "$.workloads[0].concurrency_levels"),
    ("rate NaN", _set("workloads.0.request_rates", [math.nan]), "$.workloads[0].request_rates[0]"),
    ("rate inf", _set("workloads.0.request_rates", [1, math.inf]), "$.workloads[0].request_rates[1]"),
    ("rate 0", _set("workloads.0.request_rates", [0]), "$.workloads[0].request_rates[0]"),
    ("rate negative", _set("workloads.0.request_rates", [-2.5]), "$.workloads[0].request_rates[0]"),
    ("rate too high", _set("workloads.0.request_rates", [501]), "$.workloads[0].request_rates[0]"),
    ("rate string", _set("workloads.0.request_rates", ["5"]), "$.workloads[0].request_rates[0]"),
    ("rate bool", _set("workloads.0.request_rates", [True]), "$.workloads[0].request_rates[0]"),
    # every level is held to [suite] max_duration (6 h): 8 requests at 1e-300 req/s never fit; nor do the default
    # 32 requests at 1e-7 req/s (a schedule of 10 years); nothing overflows on the way
    ("rate schedule too long", _set("workloads.1.request_rates", [1, 1e-300]), "$.workloads[1].request_rates[1]"),
    (
        "rate schedule too long by default",
        lambda d: d["workloads"].append({"name": "slow", "request_rates": [1e-7]}),
        "$.workloads[2].request_rates[0]",
    ),
    (
        "arrival unknown",
        lambda d: d["workloads"][0].update({"request_rates": [1], "arrival": "bursty"}),
        "$.workloads[0].arrival",
    ),
    ("arrival without rates", _set("workloads.0.arrival", "constant"), "$.workloads[0].arrival"),
    ("duration 0", _set("workloads.0.duration_seconds", 0), "$.workloads[0].duration_seconds"),
    ("duration a week", _set("workloads.0.duration_seconds", 7 * 86400), "$.workloads[0].duration_seconds"),
    ("requests 0", _set("workloads.1.requests", 0), "$.workloads[1].requests"),
    ("requests 10**9", _set("workloads.1.requests", 10**9), "$.workloads[1].requests"),
    ("output 0", _set("workloads.0.output_token_target", 0), "$.workloads[0].output_token_target"),
    ("output 10**5", _set("workloads.0.output_token_target", 10**5), "$.workloads[0].output_token_target"),
    ("seed negative", _set("workloads.0.seed", -1), "$.workloads[0].seed"),
    ("typo concurency", _set("workloads.0.concurency", 4), "$.workloads[0].concurency"),
    ("unknown top key", _set("extra", 1), "$.extra"),
    ("unknown model key", _set("models.0.api_key", SECRET), "$.models[0].api_key"),
    ("unknown auth key", _set("models.0.auth", {"type": "none", "token": SECRET}), "$.models[0].auth.token"),
    ("odd key", _set("models.0.\x00x y", 1), '$.models[0]["\\u0000x y"]'),
    ("missing test_suite", _drop("test_suite"), "$.test_suite"),
    ("missing models", _drop("models"), "$.models"),
    ("missing name", _drop("models.0.name"), "$.models[0].name"),
    ("missing endpoint", _drop("models.1.endpoint"), "$.models[1].endpoint"),
    ("empty models", _set("models", []), "$.models"),
    ("empty workloads", _set("workloads", []), "$.workloads"),
    ("too many models", _set("models", [{"name": f"m{i}", "endpoint": "gguf:bundled"} for i in range(17)]), "$.models"),
    ("duplicate model", _set("models.1.name", "cloud"), "$.models[1].name"),
    ("duplicate model by case", _set("models.1.name", "CLOUD"), "$.models[1].name"),
    ("duplicate workload", _set("workloads.1.name", "short"), "$.workloads[1].name"),
    ("NUL in model name", _set("models.0.name", "clo\x00ud"), "$.models[0].name"),
    ("newline in workload name", _set("workloads.1.name", "a\nb"), "$.workloads[1].name"),
    ("bidi override in suite name", _set("test_suite.name", "abc\u202edef"), "$.test_suite.name"),
    ("blank name", _set("models.0.name", "  "), "$.models[0].name"),
    ("long name", _set("models.0.name", "x" * 200), "$.models[0].name"),
    ("api_type enum", _set("models.0.api_type", "anthropic"), "$.models[0].api_type"),
    ("api extension enum", _set("models.0.api", "responses"), "$.models[0].api"),
    ("endpoint ftp", _set("models.0.endpoint", "ftp://host/v1"), "$.models[0].endpoint"),
    ("endpoint bare word", _set("models.0.endpoint", "localhost:8080"), "$.models[0].endpoint"),
    ("endpoint number", _set("models.0.endpoint", 8080), "$.models[0].endpoint"),
    ("endpoint fragment", _set("models.0.endpoint", "http://h/v1#x"), "$.models[0].endpoint"),
    ("endpoint query", _set("models.0.endpoint", "http://h/v1?x=1"), "$.models[0].endpoint"),
    ("endpoint no host", _set("models.0.endpoint", "http:///v1"), "$.models[0].endpoint"),
    ("endpoint bad port", _set("models.0.endpoint", "http://h:99999/v1"), "$.models[0].endpoint"),
    ("endpoint space", _set("models.0.endpoint", "http://h /v1"), "$.models[0].endpoint"),
    ("endpoint unicode host", _set("models.0.endpoint", "http://hôst/v1"), "$.models[0].endpoint"),
    ("gguf name traversal", _set("models.1.endpoint", "gguf:../etc/passwd"), "$.models[1].endpoint"),
    ("gguf name absent", _set("models.1.endpoint", "gguf:nope"), "$.models[1].endpoint"),
    ("settings on endpoint", _set("models.0.settings", {"n_ctx": 512}), "$.models[0].settings"),
    ("setting out of bounds", _set("models.1.settings", {"n_threads": 0}), "$.models[1].settings.n_threads"),
    ("setting unknown", _set("models.1.settings", {"n_cxt": 512}), "$.models[1].settings.n_cxt"),
    ("setting flash_attn int", _set("models.1.settings", {"flash_attn": 1}), "$.models[1].settings.flash_attn"),
    ("auth enum", _set("models.0.auth", {"type": "basic"}), "$.models[0].auth.type"),
    ("auth bearer without path", _set("models.0.auth", {"type": "bearer"}), "$.models[0].auth.credentials_path"),
    ("auth not object", _set("models.0.auth", SECRET), "$.models[0].auth"),
    ("auth on local model", _set("models.1.auth", {"type": "api_key", "credentials_path": "k"}), "$.models[1].auth"),
    (
        "credentials /etc/shadow",
        _set("models.0.auth", {"type": "bearer", "credentials_path": "/etc/shadow"}),
        "$.models[0].auth.credentials_path",
    ),
    (
        "credentials traversal",
        _set("models.0.auth", {"type": "api_key", "credentials_path": "../creds/../outside/secret.txt"}),
        "$.models[0].auth.credentials_path",
    ),
    (
        "credentials with none",
        _set("models.0.auth", {"type": "none", "credentials_path": "x"}),
        "$.models[0].auth.credentials_path",
    ),
    ("dataset /etc/passwd", _set("workloads.0.input_dataset", "/etc/passwd.txt"), "$.workloads[0].input_dataset"),
    ("dataset not a prompt file", _set("workloads.0.input_dataset", "/etc/passwd"), "$.workloads[0].input_dataset"),
    ("dataset no extension", _set("workloads.0.input_dataset", "../data"), "$.workloads[0].input_dataset"),
    ("dataset .conf", _set("workloads.0.input_dataset", "notakey.conf"), "$.workloads[0].input_dataset"),
    (
        "dataset traversal",
        _set("workloads.0.input_dataset", "../data/../outside/secret.txt"),
        "$.workloads[0].input_dataset",
    ),
    ("dataset missing", _set("workloads.0.input_dataset", "../data/none.txt"), "$.workloads[0].input_dataset"),
    ("dataset directory", _set("workloads.0.input_dataset", "../data/folder.txt"), "$.workloads[0].input_dataset"),
    ("dataset link to a key", _set("workloads.0.input_dataset", "../data/link.txt"), "$.workloads[0].input_dataset"),
    ("dataset URL", _set("workloads.0.input_dataset", "https://example.org/x.jsonl"), "$.workloads[0].input_dataset"),
    ("dataset number", _set("workloads.0.input_dataset", 3), "$.workloads[0].input_dataset"),
    ("empty object", lambda d: d.clear(), "$.test_suite"),
]


@pytest.mark.parametrize(("case", "mutate", "path"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_document_refused_with_its_path(
    case: str, mutate: Callable[[dict[str, Any]], None], path: str, policy: SuitePolicy, dirs: dict[str, Path]
) -> None:
    document = base_document()
    mutate(document)
    exc = refused(document, policy, base_dir=dirs["suites"])
    assert exc.path == path, str(exc)
    assert str(exc).startswith(f"suite.json: {path}: ")
    assert "is not allowed; expected" in str(exc)
    assert SECRET not in str(exc) and "\x00" not in str(exc)
    if ".auth" in path and not path.endswith(".auth.credentials_path"):  # a credentials_path is shown: a path
        assert "'(hidden)'" in str(exc)


@pytest.mark.parametrize("document", [[], "suite", 3, None, True])
def test_document_not_an_object(document: object, policy: SuitePolicy) -> None:
    assert refused(document, policy).path == "$"


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@127.0.0.1:8080/v1",
        f"https://{SECRET}@api.example.org/v1",
        f"https://api.example.org/v1?api_key={SECRET}",
        f"https://api.example.org/v1?x=1&access_token={SECRET}",
        f"https://api.example.org/v1?X-Amz-Signature={SECRET}",
        f"https://api.example.org/v1?PASSWORD={SECRET}",
        f"ftp://user:{SECRET}@h/",
        f"https://api.example.org/v1?x=1;token={SECRET}",
        f"https://api.example.org/v1#access_token={SECRET}",
    ],
)
def test_credentials_in_the_url_refused_and_never_echoed(url: str, policy: SuitePolicy) -> None:
    assert url_has_credentials(url)
    document = base_document()
    document["models"][0]["endpoint"] = url
    exc = refused(document, policy)
    assert exc.path == "$.models[0].endpoint"
    assert SECRET not in str(exc) and SECRET not in repr(exc.value) and "'(hidden)'" in str(exc)
    assert "credentials_path" in str(exc)


def test_secrets_are_not_echoed_from_misplaced_values(policy: SuitePolicy) -> None:
    """A credential-carrying URL or an auth object where another type belongs is still not shown."""
    for mutate, path in (
        (lambda d: d["models"].__setitem__(1, f"http://u:{SECRET}@h/v1"), "$.models[1]"),
        (lambda d: d["models"][0].__setitem__("name", [f"https://h/v1?api_key={SECRET}"]), "$.models[0].name"),
        (lambda d: d.__setitem__("models", {"auth": {"token": SECRET}}), "$.models"),
        (lambda d: d["models"][0].__setitem__("endpoint", f"http://h/v1?x={SECRET}"), "$.models[0].endpoint"),
        (lambda d: d["models"][0].__setitem__("endpoint", f"http://h/v1#{SECRET}"), "$.models[0].endpoint"),
    ):
        document = base_document()
        mutate(document)
        exc = refused(document, policy)
        assert exc.path == path and SECRET not in str(exc), str(exc)


def test_symlinks_are_followed_before_the_directory_check(
    policy: SuitePolicy, dirs: dict[str, Path], tiny_model: Path
) -> None:
    (dirs["data"] / "escape.txt").symlink_to(dirs["outside"] / "secret.txt")
    (dirs["data"] / "sub").symlink_to(dirs["outside"])
    (dirs["creds"] / "escape").symlink_to(dirs["outside"] / "secret.txt")
    (dirs["models"] / "escape.gguf").symlink_to(tiny_model)
    for dataset in (str(dirs["data"] / "escape.txt"), "../data/sub/secret.txt"):
        document = base_document()
        document["workloads"][1]["input_dataset"] = dataset
        exc = refused(document, policy, base_dir=dirs["suites"])
        assert exc.path == "$.workloads[1].input_dataset" and "dataset_dirs" in str(exc)
    document = base_document()
    document["models"][0]["auth"] = {"type": "bearer", "credentials_path": str(dirs["creds"] / "escape")}
    assert refused(document, policy).path == "$.models[0].auth.credentials_path"
    for endpoint in ("gguf:escape", f"file://{dirs['models'] / 'escape.gguf'}"):
        document = base_document()
        document["models"][1]["endpoint"] = endpoint
        exc = refused(document, policy)
        assert exc.path == "$.models[1].endpoint" and "model_dirs" in str(exc)
    # a symlink that stays inside is fine
    (dirs["data"] / "alias.txt").symlink_to(dirs["data"] / "prompts.txt")
    document = base_document()
    document["workloads"][1]["input_dataset"] = "../data/alias.txt"
    suite = parse(document, policy, base_dir=dirs["suites"])
    assert suite.workloads[1].dataset == (dirs["data"] / "prompts.txt").resolve()


def test_empty_policy_directories(dirs: dict[str, Path], tmp_path: Path, tiny_model: Path) -> None:
    """No dataset or credentials directory configured: none may be read; no model_dirs: any GGUF path (CLI)."""
    bare = SuitePolicy()
    document = base_document()
    document["workloads"][0]["input_dataset"] = str(dirs["data"] / "prompts.txt")
    exc = refused(document, bare)
    assert exc.path == "$.workloads[0].input_dataset" and "none configured" in str(exc)
    document = base_document()
    document["models"][1]["endpoint"] = f"file://{tiny_model}"
    assert parse(document, bare).models[1].path == tiny_model
    document["models"][1]["endpoint"] = "file:tiny.gguf"
    assert refused(document, bare).path == "$.models[1].endpoint"  # relative, and no suite directory
    document["models"][1]["endpoint"] = "gguf:tiny"
    assert "model_dirs" in str(refused(document, bare))
    os.mkfifo(tmp_path / "fifo.gguf")  # opening it to read the magic would block
    document["models"][1]["endpoint"] = f"file://{tmp_path / 'fifo.gguf'}"
    assert "not a device or FIFO" in str(refused(document, bare))
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    document["models"][1]["endpoint"] = f"file://{not_gguf}"
    exc = refused(document, bare)
    assert exc.path == "$.models[1].endpoint" and "GGUF" in str(exc)


def test_file_level_refusals(policy: SuitePolicy, tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    document = base_document()
    document["test_suite"]["description"] = "x" * 2000
    big.write_text(json.dumps(document))
    small = SuitePolicy(max_document_bytes=1024)
    with pytest.raises(SuiteError) as info:
        load_suite(big, small)
    assert info.value.path == "$" and "at most 1024 bytes" in str(info.value)

    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(SuiteError) as info:
        load_suite(bomb, policy)
    assert info.value.path == "$" and "anchor" in str(info.value)

    merge = tmp_path / "merge.yaml"
    merge.write_text("test_suite: {}\nmodels: []\nworkloads: [{<<: {concurrency: 2}}]\n")
    with pytest.raises(SuiteError) as info:
        load_suite(merge, policy)
    assert "merge" in str(info.value)

    for name, text in (
        ("deep.json", "[" * 100 + "]" * 100),
        ("deeper.json", "[" * 200_000 + "]" * 200_000),
        ("deep.yaml", "[" * 100 + "]" * 100),
        ("deeper.yaml", "[" * 200_000 + "]" * 200_000),
        ("indented.yaml", "a:\n" + "".join(" " * (i + 1) + "-\n" for i in range(100))),
    ):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(SuiteError) as info:
            load_suite(path, policy)
        assert "nested levels" in str(info.value), name
    assert refused(json.loads("[" * 40 + "]" * 40), policy).path == "$"

    for name, text, expected in (
        ("dup.json", '{"test_suite": {}, "test_suite": {}}', "twice"),
        ("dup.yaml", "test_suite: {}\ntest_suite: {}\n", "twice"),
        ("syntax.json", '{"test_suite": ', "valid JSON"),
        ("syntax.yaml", "test_suite: [\n", "valid YAML"),
        ("two.yaml", "a: 1\n---\nb: 2\n", "valid YAML"),
        ("tagged.yaml", "!!python/object:os.system {}\n", "valid YAML"),
        ("suite.toml", "x = 1\n", ".json, .yaml or .yml"),
        ("huge.json", '{"test_suite": {"n": ' + "9" * 5000 + "}}", "at most 4300 digits"),
        ("huge.yaml", "test_suite: {n: " + "9" * 5000 + "}\n", "at most 4300 digits"),
    ):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(SuiteError) as info:
            load_suite(path, policy)
        where = "$.test_suite" if name.startswith("dup.") else "$"  # a key given twice: its path
        assert info.value.path == where and expected in str(info.value), (name, str(info.value))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"test_suite": {"name": "caf\xe9"}}')
    with pytest.raises(SuiteError, match="UTF-8"):
        load_suite(latin, policy)
    with pytest.raises(SuiteError, match="an existing suite file"):
        load_suite(tmp_path / "absent.yaml", policy)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(SuiteError, match="a regular file"):
        load_suite(fifo, policy)


def test_yaml_timestamps_and_non_string_keys_are_refused(policy: SuitePolicy, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "test_suite: {version: 2024-01-01}\nmodels: [{name: a, endpoint: 'gguf:bundled'}]\nworkloads: [{}]\n"
    )
    with pytest.raises(SuiteError) as info:
        load_suite(path, policy)
    assert info.value.path == "$.test_suite.version"
    path.write_text("test_suite: {}\nmodels: [{name: a, endpoint: 'gguf:bundled', 3: x}]\nworkloads: [{}]\n")
    with pytest.raises(SuiteError) as info:
        load_suite(path, policy)
    assert info.value.path == '$.models[0]["3"]'


def test_long_values_are_shortened(policy: SuitePolicy) -> None:
    document = base_document()
    document["workloads"][0]["concurrency"] = "9" * 5000
    text = str(refused(document, policy))
    shown = text.split(": ", 2)[2].split(" is not allowed")[0]
    assert len(shown) == 80 and shown.startswith("'999") and shown.endswith("…")


def test_refusals_name_what_is_allowed(policy: SuitePolicy) -> None:
    document = base_document()
    document["workloads"][0]["concurency"] = 4
    text = str(refused(document, policy))
    assert "did you mean 'concurrency'?" in text and "concurrency_levels" in text and "output_token_target" in text
    document = base_document()
    document["workloads"][0]["concurrency"] = 10**5000  # past Python's int-to-text limit: still one clear line
    exc = refused(document, policy)
    assert exc.path == "$.workloads[0].concurrency" and "an integer of 16610 bits" in str(exc)
    document = base_document()
    document["workloads"][0]["request_rates"] = [1, 1.0]
    assert "each request rate once" in str(refused(document, policy))


# -- credentials ---------------------------------------------------------------------------------------------------
def test_read_credentials(policy: SuitePolicy, dirs: dict[str, Path]) -> None:
    def model_with(path: str, kind: str = "bearer") -> Any:
        document = base_document()
        document["models"][0]["auth"] = {"type": kind, "credentials_path": path}
        return parse(document, policy, base_dir=dirs["suites"]).models[0]

    assert read_credentials(model_with("../creds/key"), policy, "s.yaml") == SECRET
    assert read_credentials(parse(base_document(), policy).models[0], policy, "s.yaml") is None

    cases = {
        "multi": f"{SECRET}\nsecond line\n",
        "empty": "\n",
        "control": f"{SECRET}\x07",
        "big": SECRET * 300,
    }
    for name, content in cases.items():
        (dirs["creds"] / name).write_text(content)
        with pytest.raises(SuiteError) as info:
            read_credentials(model_with(str(dirs["creds"] / name), "api_key"), policy, "s.yaml")
        assert info.value.path == "$.models[0].auth.credentials_path", name
        # the path is shown (it is no secret), the content never
        assert SECRET not in str(info.value) and repr(str(dirs["creds"] / name)) in str(info.value)
    # a policy narrowed after parsing is checked again
    model = model_with("../creds/key")
    with pytest.raises(SuiteError, match="credentials_dirs"):
        read_credentials(model, SuitePolicy(credentials_dirs=(dirs["data"],)), "s.yaml")
    # swapped for a symlink pointing out after the suite was parsed
    swapped = model_with("../creds/swap")
    (dirs["creds"] / "swap").symlink_to(dirs["outside"] / "secret.txt")
    with pytest.raises(SuiteError, match="credentials_dirs"):
        read_credentials(swapped, policy, "s.yaml")
    # a FIFO (a read would block), a directory and a missing file
    os.mkfifo(dirs["creds"] / "fifo")
    with pytest.raises(SuiteError, match="a regular credentials file"):
        read_credentials(model_with("../creds/fifo"), policy, "s.yaml")
    (dirs["creds"] / "dir").mkdir()
    for name in ("dir", "absent"):
        with pytest.raises(SuiteError) as info:
            read_credentials(model_with(str(dirs["creds"] / name)), policy, "s.yaml")
        assert info.value.path == "$.models[0].auth.credentials_path"


# -- the seed's schema holds for every accepted document ----------------------------------------------------------
_INTS = st.one_of(st.integers(1, 64), st.integers(1, 64), st.integers(-3, 80), st.sampled_from([10**6, 2**63, True]))
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_ENDPOINTS = st.one_of(
    st.sampled_from(
        [
            "http://127.0.0.1:8080/v1",
            "https://api.example.org",
            "http://h:8000/v1/",
            "gguf:bundled",
            "http://user:pw@h/v1",
            "http://h/v1?token=x",
            "ftp://h",
            "http://h/v1#f",
            "file:",
            "gguf:",
            "http://h:0/v1",
            "HTTP://H/V1",
            "http://h/a%zz",
            "http://h/%41/v1",
        ]
    ),
    st.text(max_size=20),
    st.builds(lambda s: f"http://{s}/v1", st.text(max_size=10)),
    st.builds(lambda s: f"http://{s}/v1", st.text("abc.:-_~%4[]@!$&'()*+,;=", max_size=10)),
)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda plausible: strategy if plausible else _ANY)


_MODEL = st.fixed_dictionaries(
    {"name": _maybe(st.sampled_from(["a", "b", "m-1", "A"])), "endpoint": _ENDPOINTS},
    optional={
        "api_type": _maybe(st.sampled_from(["openai", "vllm", "tgi", "custom"])),
        "auth": _maybe(st.fixed_dictionaries({}, optional={"type": _maybe(st.just("none"))})),
        "model": _maybe(st.just("llama")),
        "api": _maybe(st.sampled_from(["auto", "chat", "completions"])),
    },
)
_WORKLOAD = st.fixed_dictionaries(
    {},
    optional={
        "name": _maybe(st.sampled_from(["w", "x", "W"])),
        "input_dataset": _maybe(st.just("builtin")),
        "input_token_range": _maybe(st.fixed_dictionaries({"min": _INTS, "max": _INTS})),
        "output_token_target": _maybe(_INTS),
        "concurrency": _maybe(_INTS),
        "duration_seconds": _maybe(_INTS),
        "request_rates": _maybe(st.lists(st.one_of(_INTS, st.floats()), max_size=4)),
        "requests": _maybe(_INTS),
        "seed": _maybe(_INTS),
    },
)
_DOCUMENT = st.fixed_dictionaries(
    {
        "test_suite": _maybe(
            st.fixed_dictionaries({}, optional={"name": _maybe(st.sampled_from(["nightly", "s 1", "Ünïcode"]))})
        ),
        "models": _maybe(st.lists(_MODEL, min_size=1, max_size=3)),
        "workloads": _maybe(st.lists(_WORKLOAD, min_size=1, max_size=3)),
    }
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCUMENT)
def test_every_accepted_document_is_valid_against_the_seed_schema(document: dict[str, Any]) -> None:
    try:
        suite = parse_suite(document, source="gen.json", base_dir=None, policy=SuitePolicy())
    except SuiteError as exc:
        assert exc.path.startswith("$")
        assert str(exc).startswith(f"gen.json: {exc.path}: ")
        assert ":pw@" not in str(exc) and "token=x" not in str(exc)  # the credentials in _ENDPOINTS
        return
    VALIDATOR.validate(document)
    assert suite.models and suite.workloads
    for workload in suite.workloads:
        assert workload.concurrency or workload.rates
        assert all(1 <= c <= 64 for c in workload.concurrency)
        assert all(math.isfinite(r) and 0 < r <= 500 for r in workload.rates)


_VALID_YAML = (
    "test_suite: {name: s}\nmodels:\n  - {name: a, endpoint: 'http://h:1/v1'}\nworkloads:\n"
    "  - {name: w, concurrency_levels: [1, 2], requests: 4}\n"
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.tuples(st.integers(0, len(_VALID_YAML)), st.text(max_size=8)).map(
            lambda cut: (_VALID_YAML[: cut[0]] + cut[1] + _VALID_YAML[cut[0] :]).encode()
        ),
    ),
    st.sampled_from([".json", ".yaml"]),
)
def test_any_bytes_load_or_are_refused_in_one_line(tmp_path: Path, data: bytes, suffix: str) -> None:
    """Whatever the file holds, load_suite returns a suite or raises SuiteError: never another exception."""
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        load_suite(path, SuitePolicy())
    except SuiteError as exc:
        assert str(exc).startswith(f"{path}: $") and "\n" not in str(exc)


def test_accepted_documents_are_found_by_the_generator() -> None:
    """The property above is not vacuous: the schema's format check is on, and valid documents are generated."""
    assert not VALIDATOR.is_valid(
        {"test_suite": {}, "models": [{"name": "a", "endpoint": "not a uri"}], "workloads": []}
    )
    accepted = 0

    @settings(max_examples=300, deadline=None, database=None)
    @given(_DOCUMENT)
    def count(document: dict[str, Any]) -> None:
        nonlocal accepted
        try:
            parse_suite(document, source="gen.json", base_dir=None, policy=SuitePolicy())
        except SuiteError:
            return
        accepted += 1

    count()
    assert accepted >= 5


# -- prompts ------------------------------------------------------------------------------------------------------
def _workload(policy: SuitePolicy, **fields: Any) -> Any:
    document = base_document()
    document["workloads"] = [{"name": "w", **fields}]
    return parse(document, policy).workloads[0]


def test_prompts_without_a_token_range(policy: SuitePolicy, dirs: dict[str, Path]) -> None:
    prompts, note = workload_prompts(_workload(policy), 20, None, None)
    assert len(prompts) == 20 and prompts[0] == prompts[8]  # the 8 built-in prompts, cycled
    assert "built-in" in note and "8 distinct" in note
    w = _workload(policy, input_dataset=str(dirs["data"] / "prompts.txt"))
    prompts, note = workload_prompts(w, 3, None, None)
    assert [p.text for p in prompts] == ["Tell me about rivers.", "Name three colours.", "Tell me about rivers."]
    assert "2 distinct" in note
    with pytest.raises(UsageError, match="tokenizer") as refused:
        workload_prompts(_workload(policy, input_token_range={"min": 4, "max": 8}), 3, None, None, source="s.yaml")
    assert str(refused.value).startswith("s.yaml: $.workloads[0] (workload ")  # the file and the JSON path


def _tokenizers(engine: LlamaEngine) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    def detokenize(ids: list[int]) -> str:
        return bytes(engine.llm.detokenize(ids)).decode("utf-8", "replace")

    return engine.tokenize, detokenize


def test_prompts_cut_to_a_token_range_by_the_tiny_model(policy: SuitePolicy, tiny_engine: LlamaEngine) -> None:
    tokenize, detokenize = _tokenizers(tiny_engine)
    lengths = sorted(len(tokenize(p.text)) for p in workload_prompts(_workload(policy), 8, None, None)[0])
    # a range holding some built-in prompts: those are selected, the rest built
    low, high = lengths[2], lengths[4]
    in_range = sum(low <= n <= high for n in lengths)
    w = _workload(policy, input_token_range={"min": low, "max": high}, seed=5)
    prompts, note = workload_prompts(w, 12, tokenize, detokenize)
    assert len(prompts) == 12
    assert all(low <= len(tokenize(p.text)) <= high for p in prompts)
    assert f"{in_range} selected" in note and f"{12 - in_range} built" in note
    # a range none of them falls in: all built, lengths spread over the range, reproducible by seed
    w = _workload(policy, input_token_range={"min": 150, "max": 200}, seed=5)
    prompts, note = workload_prompts(w, 10, tokenize, detokenize)
    counts = [len(tokenize(p.text)) for p in prompts]
    assert all(150 <= n <= 200 for n in counts) and len(set(counts)) > 3
    assert "0 selected" in note and "10 built" in note
    again, _ = workload_prompts(w, 10, tokenize, detokenize)
    assert again == prompts
    other, _ = workload_prompts(
        _workload(policy, input_token_range={"min": 150, "max": 200}, seed=6), 10, tokenize, detokenize
    )
    assert other != prompts
    with pytest.raises(UsageError, match="detokenizer"):
        workload_prompts(w, 10, tokenize, None)


def test_prompts_cut_to_a_token_range_by_smollm2(policy: SuitePolicy, dirs: dict[str, Path], smollm2: Path) -> None:
    """SmolLM2's BPE merges across the cut: every prompt is counted again by the same tokenizer."""
    with LlamaEngine.load(smollm2, EngineSettings(n_ctx=512, n_threads=1), compute_sha256=False) as engine:
        tokenize, detokenize = _tokenizers(engine)
        lines = (dirs["data"] / "prompts.txt").read_text().splitlines()
        for low, high in ((1, 3), (4, 8), (17, 19), (60, 64), (300, 300)):
            in_range = sum(low <= len(tokenize(line)) <= high for line in lines)
            w = _workload(
                policy,
                input_dataset=str(dirs["data"] / "prompts.txt"),
                input_token_range={"min": low, "max": high},
                seed=11,
            )
            prompts, note = workload_prompts(w, 6, tokenize, detokenize)
            counts = [len(tokenize(p.text)) for p in prompts]
            assert all(low <= n <= high for n in counts), (low, high, counts)
            assert f"{in_range} selected from dataset" in note and f"{6 - in_range} built" in note
            assert all(p.text == p.text.strip() and p.text for p in prompts)
            assert workload_prompts(w, 6, tokenize, detokenize) == (prompts, note)
            if (low, high) == (4, 8):
                assert in_range == 2 and [p.text for p in prompts[:2]] == lines
