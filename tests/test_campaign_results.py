"""A campaign's results (aggregator/campaign_results.py): per device, per class, exports, and hostile records."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from aggregator import campaign_results as cr

from .campaign_docs import REAL_DOCUMENT, fleet, level_record, results_document

CAMPAIGN = str(uuid.uuid4())
ROOT = Path(__file__).resolve().parent.parent


def _doc(ttft: float, tpot: float, e2e: float, tps: float, errors: int = 0, j: float | None = None) -> dict[str, Any]:
    """A document whose p50s and p95s are exactly the given values (every sample the same)."""
    return results_document(
        ttft=[ttft] * 5,
        tpot=[tpot] * 5,
        e2e=[e2e] * 5,
        tokens_per_second=tps,
        errors=errors,
        j_per_token=[j] * 5 if j else None,
    )


def test_documents_are_in_the_seed_results_schema(results_schema: dict[str, Any]) -> None:
    template = json.loads(REAL_DOCUMENT.read_text())
    for shape in (None, template):
        records, classes = fleet(3, 2, template=shape)
        for record in records:
            jsonschema.validate(record["ext"]["results"], results_schema)
        assert cr.collect(records, classes).skipped_documents == 0


def test_class_figures_are_medians_over_devices_computed_independently() -> None:
    rng = np.random.default_rng(3)
    records: list[dict[str, Any]] = []
    samples: dict[tuple[str, str], dict[str, Any]] = {}  # (device, level) → its raw figures
    classes = {f"d{i}": ("orin", "nano", "laptop")[i % 3] for i in range(30)}
    for device, kind in classes.items():
        for level in ("concurrency 1", "concurrency 2", "concurrency 16"):
            raw = {
                "ttft": list(rng.uniform(20, 90, 15)),
                "tpot": list(rng.uniform(5, 20, 15)),
                "e2e": list(rng.uniform(200, 900, 15)),
                "tps": float(rng.uniform(40, 160)),
                "errors": int(rng.integers(0, 4)),
                "j": None if kind == "laptop" else list(rng.uniform(0.05, 0.3, 15)),
            }
            samples[(device, level)] = raw
            doc = results_document(
                ttft=raw["ttft"],
                tpot=raw["tpot"],
                e2e=raw["e2e"],
                tokens_per_second=raw["tps"],
                errors=raw["errors"],
                j_per_token=raw["j"],
            )
            records.append(level_record(device, doc, campaign_id=CAMPAIGN, level=level))
    rows = cr.class_rows(records, classes)
    assert sorted(rows) == ["laptop", "nano", "orin"]
    for kind, table in rows.items():
        assert [r["level"] for r in table] == ["concurrency 1", "concurrency 2", "concurrency 16"]  # natural order
        for row in table:
            mine = [
                raw for (device, level), raw in samples.items() if classes[device] == kind and level == row["level"]
            ]
            assert row["devices"] == len(mine) == 10
            ttft_p95 = [float(np.percentile(m["ttft"], 95)) for m in mine]
            assert row["ttft_p95_ms"] == pytest.approx(float(np.median(ttft_p95)), rel=1e-12)
            assert row["spread"]["ttft_p95_ms"]["min"] == pytest.approx(min(ttft_p95))
            assert row["spread"]["ttft_p95_ms"]["max"] == pytest.approx(max(ttft_p95))
            tpot_p50 = [float(np.percentile(m["tpot"], 50)) for m in mine]
            assert row["tpot_p50_ms"] == pytest.approx(float(np.median(tpot_p50)), rel=1e-12)
            e2e_p50 = [float(np.percentile(m["e2e"], 50)) for m in mine]
            assert row["e2e_p50_ms"] == pytest.approx(float(np.median(e2e_p50)), rel=1e-12)
            rates = [m["errors"] / (15 + m["errors"]) for m in mine]
            assert row["error_rate"] == pytest.approx(float(np.median(rates)))
            assert row["tokens_per_second"] == pytest.approx(float(np.median([m["tps"] for m in mine])))
            assert row["spread"]["tokens_per_second"]["median"] == row["tokens_per_second"]
            if kind == "laptop":  # no power source: no J/token, and no made-up spread for it
                assert row["j_per_output_token"] is None and "j_per_output_token" not in row["spread"]
            else:
                j = [float(np.median(m["j"])) for m in mine]
                assert row["j_per_output_token"] == pytest.approx(float(np.median(j)))


def test_one_class_two_devices_exact_numbers() -> None:
    records = [
        level_record("a", _doc(10, 2, 50, 100, j=0.1), campaign_id=CAMPAIGN),
        level_record("b", _doc(30, 4, 90, 60, errors=5, j=0.3), campaign_id=CAMPAIGN),
        level_record("c", _doc(20, 3, 70, 80), campaign_id=CAMPAIGN),
    ]
    rows = cr.class_rows(records, {"a": "orin", "b": "orin", "c": "nano"})
    (orin,) = rows["orin"]
    assert orin["devices"] == 2
    assert orin["ttft_p50_ms"] == 20.0 and orin["ttft_p95_ms"] == 20.0
    assert orin["tpot_p50_ms"] == 3.0 and orin["e2e_p95_ms"] == 70.0
    assert orin["tokens_per_second"] == 80.0
    assert orin["j_per_output_token"] == pytest.approx(0.2)
    assert orin["error_rate"] == pytest.approx((0 + 0.5) / 2)
    assert orin["spread"]["ttft_p50_ms"] == {"min": 10.0, "median": 20.0, "max": 30.0}
    (nano,) = rows["nano"]
    assert nano["devices"] == 1 and nano["ttft_p50_ms"] == 20.0 and nano["j_per_output_token"] is None
    devices = cr.device_results(records, {"a": "orin"})
    assert devices["a"]["device_class"] == "orin" and devices["b"]["device_class"] == "unknown"
    assert devices["a"]["documents"] == [records[0]["ext"]["results"]]


def test_newest_record_of_a_level_wins() -> None:
    old = level_record("a", _doc(10, 2, 50, 100), campaign_id=CAMPAIGN, started_us=1)
    new = level_record("a", _doc(40, 2, 50, 100), campaign_id=CAMPAIGN, started_us=2)
    for order in ([old, new], [new, old]):
        (row,) = cr.class_rows(order, {})["unknown"]
        assert row["ttft_p50_ms"] == 40.0 and row["devices"] == 1


def _hostile(base: dict[str, Any]) -> list[tuple[str, Any]]:
    """(what, record) pairs: each must be skipped and counted, never raise."""
    out: list[tuple[str, Any]] = [("not a map", [1, 2]), ("none", None), ("string", "x" * 100)]

    def variant(what: str, change: Any) -> None:
        record = copy.deepcopy(base)
        change(record)
        out.append((what, record))

    variant("device id a number", lambda r: r.__setitem__("device_id", 7))
    variant("device id empty", lambda r: r.__setitem__("device_id", ""))
    variant("ext a list", lambda r: r.__setitem__("ext", []))
    variant("no results", lambda r: r["ext"].pop("results"))
    variant("results a string", lambda r: r["ext"].__setitem__("results", "{}"))
    variant("results.results a list", lambda r: r["ext"]["results"].__setitem__("results", []))
    variant("model a map", lambda r: r["ext"]["campaign"].__setitem__("model", {"a": 1}))
    variant("level 10,000 chars", lambda r: r["ext"]["campaign"].__setitem__("level", "x" * 10_000))
    variant("campaign a list", lambda r: r["ext"].__setitem__("campaign", []))
    lat = ("results", "latency_metrics", "time_to_first_token", "p50_ms")
    for bad in (math.nan, math.inf, -math.inf, 1e308, -1.0, "12", True, [1], 10**400):
        variant(f"ttft p50 {bad!r:.20}", lambda r, bad=bad: _put(r["ext"]["results"], lat, bad))
    variant("latency section a number", lambda r: _put(r["ext"]["results"], ("results", "latency_metrics"), 3))
    variant(
        "tok/s nan",
        lambda r: _put(r["ext"]["results"], ("results", "throughput_metrics", "tokens_per_second"), math.nan),
    )
    variant("error rate 2", lambda r: _put(r["ext"]["results"], ("results", "error_metrics", "error_rate"), 2.0))
    variant(
        "errors > requests", lambda r: _put(r["ext"]["results"], ("results", "error_metrics", "total_errors"), 10**6)
    )
    variant("requests negative", lambda r: _put(r["ext"]["results"], ("results", "requests", "measured"), -1))
    variant("requests a float", lambda r: _put(r["ext"]["results"], ("results", "requests", "measured"), 5.0))
    variant("nan deep in the document", lambda r: _put(r["ext"]["results"], ("configuration", "x"), math.nan))
    variant("bytes in the document", lambda r: _put(r["ext"]["results"], ("configuration", "x"), b"\x00"))
    variant(
        "huge document", lambda r: _put(r["ext"]["results"], ("configuration", "x"), "y" * (cr.MAX_DOCUMENT_BYTES + 1))
    )
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    variant("deeply nested", lambda r: _put(r["ext"]["results"], ("configuration", "x"), deep))
    return out


def _put(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc.setdefault(key, {})
    doc[path[-1]] = value


def test_hostile_records_are_skipped_and_counted_never_raise() -> None:
    good = level_record("good", _doc(10, 2, 50, 100), campaign_id=CAMPAIGN)
    hostile = _hostile(level_record("evil", _doc(10, 2, 50, 100), campaign_id=CAMPAIGN))
    body = cr.results([good, *(r for _, r in hostile)], {"good": "orin", "evil": "orin"})
    assert body["skipped_documents"] == len(hostile), [w for w, r in hostile if _usable(r)]
    assert list(body["devices"]) == ["good"]
    assert body["classes"]["orin"][0]["devices"] == 1
    assert len(body["skip_reasons"]) == cr.MAX_SKIP_REASONS
    json.dumps(body, allow_nan=False)  # the answer always serialises as strict JSON
    for fmt in ("json", "csv", "arrow", "parquet", "protobuf"):
        data, _ = cr.export([good, *(r for _, r in hostile)], {}, fmt)
        assert data


def _usable(record: Any) -> bool:
    try:
        cr.read_record(record, {})
        return True
    except cr.Malformed:
        return False


def test_absent_figures_are_none_not_made_up() -> None:
    doc = results_document(ttft=[], tpot=[], e2e=[], tokens_per_second=0.0, errors=4)
    (row,) = cr.collect([level_record("a", doc, campaign_id=CAMPAIGN)], {}).rows
    assert row.requests == 4 and row.errors == 4
    assert row.figures["ttft_p50_ms"] is None and row.figures["e2e_p95_ms"] is None
    assert row.figures["error_rate"] == 1.0 and row.figures["j_per_output_token"] is None


def test_names_are_cleaned_and_classes_come_from_the_caller() -> None:
    record = level_record("a", _doc(10, 2, 50, 100), campaign_id=CAMPAIGN, model="evil\u202emodel\x1b[31m")
    (row,) = cr.collect([record], {"a": "orin\u200b\x00"}).rows
    assert row.model == "evilmodel[31m" and row.device_class == "orin"
    (row,) = cr.collect([record], {"a": "c" * 10_000}).rows  # a long class is cut, the record kept
    assert row.device_class == "c" * (cr.MAX_NAME_CHARS - 1) + "…"


def test_rows_are_bounded_per_device_and_in_all() -> None:
    records = [
        level_record(f"d{d}", _doc(10, 2, 50, 100), campaign_id=CAMPAIGN, level=f"level {i}")
        for d in range(5)
        for i in range(10)
    ]
    got = cr.collect(records, {}, max_levels_per_device=4, max_rows=12)
    assert len(got.rows) == 12 and got.rows_dropped == 50 - 12
    assert max(sum(1 for r in got.rows if r.device_id == f"d{d}") for d in range(5)) == 4
    assert "rows_dropped" not in cr.results(records, {})


def _fleet_export(fmt: str) -> tuple[list[dict[str, Any]], bytes]:
    records, classes = fleet(12, 3, samples=6)
    records.append(level_record("=cmd|' /C calc'!A0", _doc(1, 1, 1, 1), campaign_id=CAMPAIGN, workload="-2+3"))
    classes["=cmd|' /C calc'!A0"] = "@evil"
    body = json.loads(cr.export(records, classes, "json", benchmark_id=CAMPAIGN)[0])
    data, _ = cr.export(records, classes, fmt)
    return body["rows"], data


def test_json_export_rows_match_the_class_table_inputs() -> None:
    records, classes = fleet(6, 2)
    body = json.loads(cr.export(records, classes, "json", benchmark_id=CAMPAIGN)[0])
    assert body["benchmark_id"] == CAMPAIGN and body["columns"] == list(cr.COLUMNS)
    assert len(body["rows"]) == 12 and body["skipped_documents"] == 0
    for row in body["rows"]:
        (record,) = [
            r for r in records if r["device_id"] == row["device_id"] and r["ext"]["campaign"]["level"] == row["level"]
        ]
        res = record["ext"]["results"]["results"]
        assert row["ttft_p50_ms"] == res["latency_metrics"]["time_to_first_token"]["p50_ms"]
        assert row["requests"] == res["requests"]["measured"] and row["device_class"] == classes[row["device_id"]]


def test_csv_export_agrees_with_json_and_escapes_formulas() -> None:
    rows, data = _fleet_export("csv")
    parsed = list(csv.DictReader(io.StringIO(data.decode())))
    assert len(parsed) == len(rows)
    for want, got in zip(rows, parsed, strict=True):
        for column in cr.COLUMNS:
            value = want[column]
            if value is None:
                assert got[column] == ""
            elif isinstance(value, str):
                assert got[column] == (("'" + value) if value.startswith(cr.FORMULA_PREFIXES) else value)
            else:
                assert float(got[column]) == value  # exact: floats are written with repr
    assert any(g["device_id"].startswith("'=cmd") and g["device_class"] == "'@evil" for g in parsed)


def _pyarrow_rows(fmt: str, data: bytes) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.ipc.open_stream(data).read_all() if fmt == "arrow" else pq.read_table(pa.BufferReader(data))
    assert table.schema.names == list(cr.COLUMNS)
    assert str(table.schema.field("requests").type) == "int64"
    return list(table.to_pylist())


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_arrow_and_parquet_open_in_pyarrow_and_agree_with_json(fmt: str) -> None:
    rows, data = _fleet_export(fmt)
    assert _pyarrow_rows(fmt, data) == rows


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_arrow_and_parquet_open_in_duckdb_and_agree_with_json(fmt: str, tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the dev extra (pyproject.toml)")
    import pyarrow as pa

    rows, data = _fleet_export(fmt)
    con = duckdb.connect()
    if fmt == "parquet":
        path = tmp_path / "export.parquet"
        path.write_bytes(data)
        result = con.execute(f"SELECT * FROM read_parquet('{path}')").fetchall()
        names = [d[0] for d in con.description]
    else:
        reader = pa.ipc.open_stream(data)  # DuckDB reads an Arrow stream through a record batch reader
        con.register("export", reader)
        result = con.execute("SELECT * FROM export").fetchall()
        names = [d[0] for d in con.description]
    got = [dict(zip(names, r, strict=True)) for r in result]
    assert names == list(cr.COLUMNS) and got == rows
    source = "export" if fmt == "arrow" else f"read_parquet('{tmp_path / 'export.parquet'}')"
    if fmt == "arrow":  # a record batch reader is read once: register the stream again for a second query
        con.register("export", pa.ipc.open_stream(data))
    counted = dict(con.execute(f"SELECT device_class, count(*) FROM {source} GROUP BY 1").fetchall())
    assert counted == {c: sum(1 for r in rows if r["device_class"] == c) for c in {r["device_class"] for r in rows}}


def test_protobuf_export_carries_each_rows_keys_and_document() -> None:
    """One BenchmarkResults a row: the row's keys in campaign_level, its results document whole, the seed's figures
    in their fields — the same values as the JSON export."""
    from lens_core import protobuf
    from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb

    records, classes = fleet(12, 3, samples=6)
    body = json.loads(cr.export(records, classes, "json", benchmark_id=CAMPAIGN)[0])
    data, kind = cr.export(records, classes, "protobuf", benchmark_id=CAMPAIGN)
    assert kind == "application/x-protobuf; proto=llm_latency_lens.v1.BenchmarkResults; delimited=true"
    messages = list(protobuf.iter_delimited(data, pb.BenchmarkResults))
    assert len(messages) == len(body["rows"]) == len(cr.collect(records, classes).rows)
    for message, row, source in zip(messages, body["rows"], cr.collect(records, classes).rows, strict=True):
        level = message.campaign_level
        keys = (level.device_id, level.device_class, level.model, level.workload, level.level)
        assert keys == tuple(row[k] for k in cr.KEY_COLUMNS)
        assert (level.requests, level.errors) == (row["requests"], row["errors"])
        assert message.benchmark_id == CAMPAIGN
        assert protobuf.results_document(message) == source.document
        assert message.aggregated.ttft_distribution.p95_ms == row["ttft_p95_ms"]
        assert message.aggregated.throughput.tokens_per_second == row["tokens_per_second"]
    assert cr.export([], {}, "protobuf")[0] == b""


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json, csv, parquet, arrow"):
        cr.export([], {}, "xlsx")


def test_an_empty_campaign_exports_empty_tables() -> None:
    import pyarrow as pa

    data, kind = cr.export([], {}, "arrow")
    assert kind == "application/vnd.apache.arrow.stream"
    assert pa.ipc.open_stream(data).read_all().num_rows == 0
    assert cr.export([], {}, "csv")[0].decode().strip() == ",".join(cr.COLUMNS)


def test_without_pyarrow_arrow_and_parquet_say_which_extra() -> None:
    """A real interpreter where pyarrow cannot be imported: ArrowUnavailable naming the extra; json and csv work."""
    script = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
        "from aggregator import campaign_results as cr, arrow\n"
        "assert cr.export([], {}, 'csv')[1] == 'text/csv'\n"
        "for fmt in ('arrow', 'parquet'):\n"
        "    try:\n"
        "        cr.export([], {}, fmt)\n"
        "    except arrow.ArrowUnavailable as exc:\n"
        "        print(fmt, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("llm-latency-lens[arrow]" in line for line in lines)


def test_real_suite_documents_give_the_figures_of_their_own_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    """Results documents written by a real ``lens-agent bench --suite`` run (llama.cpp, a tiny model, two levels):
    each row's figures equal the percentiles of that level's own request records, computed here with numpy."""
    from .test_bench_cli import run_cli
    from .test_suite_run import agent_config, raw_records, write_prompts

    write_prompts(tmp_path / "prompts.jsonl")
    suite = {
        "test_suite": {"name": "campaign", "version": "1"},
        "models": [{"name": "tiny", "endpoint": f"file://{tiny_model}"}],
        "workloads": [
            {"name": "short", "input_dataset": "prompts.jsonl", "output_token_target": 6, "requests": 4,
             "concurrency_levels": [1, 2]}
        ],
    }  # fmt: skip
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    out, raw = tmp_path / "out", tmp_path / "requests.jsonl"
    code, _, stderr = run_cli(
        capsys, "bench", "--config", str(agent_config(tmp_path, tiny_model)), "--suite", str(tmp_path / "suite.json"),
        "--output", str(out), "--raw", str(raw), "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    documents = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(documents) == 2
    records = [
        level_record("edge-1", doc, campaign_id=CAMPAIGN, model="tiny", workload="short",
                     level=doc["configuration"]["suite"]["level"])
        for doc in documents
    ]  # fmt: skip
    got = {row["level"]: row for row in json.loads(cr.export(records, {"edge-1": "laptop"}, "json")[0])["rows"]}
    assert len(got) == 2
    requests = [r for r in raw_records(raw) if not r["warmup"]]
    for level, row in got.items():
        mine = [r for r in requests if r["ext"]["suite"]["level"] == level]
        ok = [r for r in mine if r["ok"]]
        assert row["requests"] == len(mine) == 4 and row["errors"] == len(mine) - len(ok)
        for column, field_name, q in (("ttft_p50_ms", "ttft_ms", 50), ("e2e_p95_ms", "e2e_ms", 95),
                                      ("tpot_p95_ms", "tpot_ms", 95)):  # fmt: skip
            assert row[column] == pytest.approx(float(np.percentile([r[field_name] for r in ok], q)), rel=1e-9)
        assert row["error_rate"] == pytest.approx((len(mine) - len(ok)) / len(mine))
        assert row["tokens_per_second"] is not None and row["tokens_per_second"] > 0
        assert row["j_per_output_token"] is None  # power_source = "none"
    classes = cr.class_rows(records, {"edge-1": "laptop"})
    assert [r["devices"] for r in classes["laptop"]] == [1, 1]


def test_results_list_every_targeted_device_with_its_state() -> None:
    records = [level_record("a", _doc(10, 2, 50, 100), campaign_id=CAMPAIGN)]
    body = cr.results(records, {"a": "orin", "b": "nano"}, {"a": "succeeded", "b": "timed_out", "c": "queued"})
    assert list(body["devices"]) == ["a", "b", "c"]
    assert body["devices"]["a"]["state"] == "succeeded" and len(body["devices"]["a"]["documents"]) == 1
    assert body["devices"]["b"] == {"device_class": "nano", "documents": [], "state": "timed_out"}
    assert body["devices"]["c"] == {"device_class": "unknown", "documents": [], "state": "queued"}
    assert "state" not in cr.results(records, {})["devices"]["a"]
