"""The structural checks of a suite document (lens_core/suite.py), shared by the device and the aggregator.

The aggregator checks a campaign's configuration with :func:`lens_core.suite.check_document`; the device parses the
same document with :func:`agent.suite.parse_suite`. Both must refuse a document at the same JSON path with the same
message, and the aggregator must accept every document the device refuses only for its own files (a dataset,
credentials or model file checked against the device's directories). The hostile table and the document generator
are tests/test_suite_parse.py's own, imported.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import suite as agent_suite
from agent.suite import SuitePolicy, load_suite, parse_suite
from lens_core import suite as core
from lens_core.suite import (
    SuiteError,
    SuiteLimits,
    canonical_json,
    check_document,
    document_sha256,
    parse_json_document,
)

from . import test_suite_parse
from .test_suite_parse import _DOCUMENT, HOSTILE, base_document

dirs = test_suite_parse.dirs  # the fixtures the hostile table is written against
policy = test_suite_parse.policy

# hostile cases only the device can refuse: each names a file its directories (or its disk) decide on
DEVICE_ONLY = {
    "gguf name absent",
    "credentials /etc/shadow",
    "credentials traversal",
    "dataset /etc/passwd",
    "dataset traversal",
    "dataset missing",
    "dataset directory",
    "dataset link to a key",
}
# where a device-only refusal is raised: after the value's shape has passed the shared checks
DEVICE_PATHS = (".endpoint", ".auth.credentials_path", ".input_dataset")


def _refusal(check: Callable[[], object]) -> SuiteError | None:
    try:
        check()
    except SuiteError as exc:
        return exc
    return None


def _core(document: object, source: str = "suite.json") -> SuiteError | None:
    return _refusal(lambda: check_document(document, source=source, limits=SuiteLimits()))


def test_one_error_class_and_the_policy_is_a_set_of_limits() -> None:
    assert agent_suite.SuiteError is SuiteError and agent_suite.Suite is core.Suite
    assert isinstance(SuitePolicy(), SuiteLimits)
    assert {f.name for f in SuiteLimits.__dataclass_fields__.values()} < set(SuitePolicy.__dataclass_fields__)
    assert SuitePolicy(max_levels=3).max_levels == 3 and SuiteLimits() == SuiteLimits(max_concurrency=64)
    assert _core(base_document()) is None


def test_device_only_cases_are_in_the_table() -> None:
    assert {case for case, _, _ in HOSTILE} >= DEVICE_ONLY


@pytest.mark.parametrize(("case", "mutate", "path"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_table_refused_alike(
    case: str, mutate: Callable[[dict[str, Any]], None], path: str, policy: SuitePolicy, dirs: dict[str, Path]
) -> None:
    document = base_document()
    mutate(document)
    device = _refusal(lambda: parse_suite(document, source="suite.json", base_dir=dirs["suites"], policy=policy))
    assert device is not None and device.path == path
    shared = _core(document)
    if case in DEVICE_ONLY:
        assert shared is None, str(shared)  # structurally fine: no file is looked at
    else:
        assert shared is not None and shared.path == path
        assert str(shared) == str(device)


@pytest.mark.parametrize("document", [[], "suite", 3, None, True, json.loads("[" * 40 + "]" * 40)])
def test_not_an_object_or_too_deep(document: object) -> None:
    exc = _core(document)
    assert exc is not None and exc.path == "$"


def test_limits_apply_without_a_policy() -> None:
    document = base_document()
    document["workloads"][1]["concurrency_levels"] = [1, 2, 3, 4]
    exc = _refusal(
        lambda: check_document(document, source="campaign", limits=SuiteLimits(max_concurrency=3, max_levels=8))
    )
    assert exc is not None and exc.path == "$.workloads[1].concurrency_levels[3]"
    assert str(exc) == (
        "campaign: $.workloads[1].concurrency_levels[3]: 4 is not allowed; expected an integer from 1 to 3"
    )


# -- the same documents accepted ----------------------------------------------------------------------------------
_DEVICE_MODEL = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["dev-a", "dev-b"]),
        "endpoint": st.sampled_from(
            ["file:///nonexistent/x.gguf", "file:rel.gguf", "file://other/x.gguf", "gguf:nope", "gguf:default", "gguf:"]
        ),
    },
    optional={
        "auth": st.fixed_dictionaries(
            {"type": st.sampled_from(["bearer", "api_key", "none"])},
            optional={"credentials_path": st.sampled_from(["/etc/shadow", "rel/key", "", "a\x00b", 3])},
        )
    },
)
_DEVICE_WORKLOAD = st.fixed_dictionaries(
    {"name": st.sampled_from(["dev-w", "dev-x"])},
    optional={
        "input_dataset": st.sampled_from(["/etc/passwd", "prompts.txt", "builtin", "https://e/x.jsonl", "", "a\nb"])
    },
)


def _mix(document: dict[str, Any], models: list[Any], workloads: list[Any]) -> dict[str, Any]:
    """A generated document with values only a device can judge (files, credentials, datasets) mixed in."""
    for key, extra in (("models", models), ("workloads", workloads)):
        if isinstance(document.get(key), list):
            document[key] = document[key] + extra
    return document


_VALID_MIXED = st.builds(  # a valid document and a few such values: refused, if at all, mostly by the device
    _mix,
    st.builds(base_document),
    st.lists(_DEVICE_MODEL, max_size=2, unique_by=lambda m: m["name"]),
    st.lists(_DEVICE_WORKLOAD, max_size=2, unique_by=lambda w: w["name"]),
)
_MIXED = st.one_of(
    _DOCUMENT,
    st.builds(_mix, _DOCUMENT, st.lists(_DEVICE_MODEL, max_size=2), st.lists(_DEVICE_WORKLOAD, max_size=2)),
    _VALID_MIXED,
    _VALID_MIXED,
)


def test_check_document_accepts_what_the_device_accepts_structurally() -> None:
    """A document the device accepts passes the shared checks; one it refuses is refused alike, unless the device
    refused a file (then the shared checks found nothing wrong with that value)."""
    seen: Counter[str] = Counter()

    @settings(max_examples=250, deadline=None, database=None)
    @given(_MIXED)
    def compare(document: dict[str, Any]) -> None:
        device = _refusal(
            lambda: parse_suite(copy.deepcopy(document), source="gen.json", base_dir=None, policy=SuitePolicy())
        )
        shared = _core(copy.deepcopy(document), source="gen.json")
        if device is None:
            assert shared is None, str(shared)
            seen["both accept"] += 1
        elif shared is not None and str(shared) == str(device):
            seen["same refusal"] += 1
        else:
            assert device.path.endswith(DEVICE_PATHS), (str(device), str(shared))
            assert shared is None or shared.path != device.path, (str(device), str(shared))
            seen["device only"] += 1

    compare()
    assert seen["both accept"] >= 5 and seen["same refusal"] >= 20 and seen["device only"] >= 5, seen


# -- reading JSON ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b'{"test_suite": {}, "test_suite": {}}',
        b'{"test_suite": ',
        b'{"test_suite": {"n": ' + b"9" * 5000 + b"}}",
        b"[" * 100 + b"]" * 100,
        b"[" * 200_000 + b"]" * 200_000,
        b'{"a": "' + b"x" * 1100 + b'"}',
        b'{"test_suite": {"name": "caf\xe9"}}',
    ],
    ids=["twice", "syntax", "digits", "deep", "deeper", "big", "latin-1"],
)
def test_json_refused_as_the_device_refuses_a_file(data: bytes, tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_bytes(data)
    limits = SuitePolicy(max_document_bytes=1024)
    with pytest.raises(SuiteError) as device:
        load_suite(file, limits)
    with pytest.raises(SuiteError) as shared:
        parse_json_document(data, source=str(file), limits=limits)
    where = "$.test_suite" if data.startswith(b'{"test_suite": {}, "test_suite"') else "$"  # a key twice: its path
    assert shared.value.path == where and str(shared.value) == str(device.value)


def test_json_document_read_and_checked(tmp_path: Path) -> None:
    document = base_document()
    data = b"\xef\xbb\xbf" + json.dumps(document).encode()  # a BOM is allowed
    assert parse_json_document(data, source="c.json", limits=SuiteLimits()) == document
    file = tmp_path / "c.json"
    file.write_bytes(data)
    assert load_suite(file, SuitePolicy()).models[0].url == "http://127.0.0.1:8080/v1"


# -- the stored form ------------------------------------------------------------------------------------------------
def _reordered(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(item) for item in value]
    return value


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=4), _JSON, max_size=5))
def test_canonical_json_is_stable_under_key_order(document: dict[str, Any]) -> None:
    canonical = canonical_json(document)
    assert canonical_json(_reordered(document)) == canonical
    assert document_sha256(_reordered(document)) == document_sha256(document)
    assert json.loads(canonical) == json.loads(json.dumps(document))


def test_canonical_json_form_and_the_device_digest(policy: SuitePolicy) -> None:
    assert canonical_json({"b": 1, "a": [{"d": "é", "c": None}]}) == '{"a":[{"c":null,"d":"é"}],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"rate": math.nan})
    document = base_document()
    digest = document_sha256(document)
    assert len(digest) == 64 and digest == document_sha256(_reordered(document))
    # the digest a campaign is stored under is the one the device's parse gives the same document
    assert parse_suite(_reordered(document), source="campaign", base_dir=None, policy=policy).sha256 == digest


def test_an_open_loop_schedule_longer_than_max_duration_is_refused_alike(dirs: dict[str, Path]) -> None:
    """Every level is held to [suite] max_duration: 100 requests at 1 req/s do not fit in 60 s. Both sides refuse
    at the rate's JSON path with the same message; with duration_seconds the level is bounded and accepted."""
    limits = SuiteLimits(max_duration_s=60)
    document = base_document()
    document["workloads"][1] = {"name": "sweep", "request_rates": [2, 1], "requests": 100}
    aggregator = _refusal(lambda: check_document(document, source="s.json", limits=limits))
    device_policy = SuitePolicy(
        dataset_dirs=(dirs["data"],), credentials_dirs=(dirs["creds"],), model_dirs=(dirs["models"],), max_duration_s=60
    )
    device = _refusal(lambda: parse_suite(document, source="s.json", base_dir=dirs["suites"], policy=device_policy))
    assert aggregator is not None and device is not None
    assert str(aggregator) == str(device)
    assert aggregator.path == "$.workloads[1].request_rates[1]"
    assert "100 requests at 1 req/s take 100 s" in str(aggregator) and "max_duration (60 s)" in str(aggregator)
    document["workloads"][1]["duration_seconds"] = 30
    check_document(document, source="s.json", limits=limits)
