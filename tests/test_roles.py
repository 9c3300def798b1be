"""The two roles of one distribution: the aggregator installs and runs without the agent's engine.

A wheel of this tree goes into a fresh virtual environment as the base install (no extras), as on a central
server; that environment must hold neither llama-cpp-python nor the agent's other dependencies, and its
``lens-aggregator`` serves, ingests a batch and renders the fleet page while ``lens-agent`` says in one line what is
missing. The layout is checked too: ``lens_core`` imports neither role, and neither role imports the other.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tomllib

from agent.launcher import AGENT_DEPENDENCIES
from agent.synthetic import synthetic_records
from lens_core import wire

from .netproxy import free_port
from .processes import ROOT, AggregatorProcess

AGENT_ONLY = {"llama-cpp-python", "gguf", "psutil", "tqdm", "apscheduler", "pyyaml"}


def _imports(path: Path) -> set[str]:
    """Top-level packages a module imports, relative imports resolved to its own package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(path.relative_to(ROOT).parts[0] if node.level else (node.module or "").split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("lens_core", {"agent", "aggregator"}), ("agent", {"aggregator"}), ("aggregator", {"agent"})],
)
def test_layout_imports(package: str, forbidden: set[str]) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & forbidden) for path in (ROOT / package).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_agent_extra_is_what_the_launcher_checks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = {
        req.split("==")[0].split(">")[0].split("<")[0].split("[")[0]
        for req in project["optional-dependencies"]["agent"]
    }
    assert extra == set(AGENT_DEPENDENCIES.values()) == AGENT_ONLY
    base = {req.split(">")[0].split("=")[0].split(";")[0].strip() for req in project["dependencies"]}
    assert not base & AGENT_ONLY
    pins = [req for req in str(project).split("'") if req.startswith("llama-cpp-python==")]
    assert len(pins) == 1, f"the llama-cpp-python pin must live in one place: {pins}"
    # the docs that name a version name this one
    named = {
        f"{path.relative_to(ROOT)}: {match}"
        for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("packaging/*.md"), ROOT / "Makefile"]
        for match in re.findall(r"llama-cpp-python==[0-9][0-9.]*[0-9]", path.read_text())
        if match != pins[0]
    }
    assert not named, named


def role_env() -> dict[str, str]:
    """The tests' environment without what would put this tree or the tests' venv before the installed role."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LENS_")}


def venv_pip(venv: Path, *args: str) -> list[str]:
    """pip acting on ``venv`` (the tests' own pip, ``--python``: the venv is made without one of its own, which
    saves ensurepip's seconds; what it installs is the same)."""
    return [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), *args, "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def aggregator_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with this tree's wheel installed as the base install (the aggregator role)."""
    work = tmp_path_factory.mktemp("role")
    wheels = work / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=role_env(),
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("llm_latency_lens-*.whl")
    venv = work / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        venv_pip(venv, "install", "--quiet", str(wheel)), capture_output=True, text=True, timeout=900, env=role_env()
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def test_aggregator_role_pulls_no_agent_dependency(aggregator_venv: Path) -> None:
    listed = subprocess.run(
        venv_pip(aggregator_venv, "list", "--format=json"), capture_output=True, text=True, check=True, env=role_env()
    )
    names = {row["name"].lower() for row in json.loads(listed.stdout)}
    assert "llm-latency-lens" in names
    assert not names & AGENT_ONLY, names & AGENT_ONLY
    probe = subprocess.run(
        [str(aggregator_venv / "bin" / "python"), "-c", "import llama_cpp"],
        capture_output=True,
        text=True,
        env=role_env(),
    )
    assert probe.returncode != 0 and "No module named 'llama_cpp'" in probe.stderr


def test_lens_agent_without_its_role_says_what_to_install(aggregator_venv: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(aggregator_venv / "bin" / "lens-agent"), "status"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=role_env(),
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "the agent role is not installed" in done.stderr and "llama-cpp-python" in done.stderr
    assert "pip install 'llm-latency-lens[agent]'" in done.stderr


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), answer.read().decode()


def test_aggregator_role_serves_ingests_and_renders(aggregator_venv: Path, tmp_path: Path) -> None:
    exe = aggregator_venv / "bin" / "lens-aggregator"
    db = tmp_path / "fleet.db"
    env = role_env()
    added = subprocess.run(
        [str(exe), "token", "add", "--db", str(db), "edge-07"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    port = free_port()
    server = AggregatorProcess(db, port, command=[str(exe)], cwd=tmp_path, env=env)
    server.start()
    try:
        base = f"http://127.0.0.1:{port}"
        status, _, body = _get(base + "/api/v1/health")
        assert status == 200 and json.loads(body)["service"] == "lens-aggregator"

        records = synthetic_records(25, seed=7, device_id="edge-07")
        blobs = [wire.encode_record(r, "cbor") for r in records]
        batch = wire.encode_batch(blobs, device_id="edge-07", batch_id="role-1", sent_us=1, codec="cbor")
        request = urllib.request.Request(
            base + "/api/v1/ingest", data=batch, headers={"Authorization": f"Bearer {token}"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            ack = json.loads(answer.read())
        assert answer.status == 200
        ids = [bytes.fromhex(r["id"].replace("-", "")) for r in records]
        assert wire.check_ack(ack, "role-1", ids) == (25, 0)

        status, kind, page = _get(base + "/")
        assert status == 200 and kind.startswith("text/html") and "edge-07" in page
        status, _, stored = _get(base + "/api/v1/measurements?device=edge-07&limit=100")
        assert status == 200 and len(json.loads(stored)["measurements"]) == 25
        status, _, fleet = _get(base + "/api/v1/fleet")
        assert any(row.get("device_id") == "edge-07" for row in json.loads(fleet)["devices"])
        # the device page and the charting library it loads come from the wheel (package data, no CDN)
        status, _, device_page = _get(base + "/device/edge-07")
        assert status == 200 and 'src="../static/uPlot.iife.min.js"' in device_page
        status, kind, script = _get(base + "/static/uPlot.iife.min.js")
        assert (
            status == 200
            and kind.startswith("text/javascript")
            and script.startswith("/*! https://github.com/leeoniya/uPlot")
        )
        status, kind, _ = _get(base + "/static/uPlot.min.css")
        assert status == 200 and kind.startswith("text/css")
        status, _, metrics = _get(base + "/metrics")
        assert 'device="edge-07"' in metrics
        # protobuf is an extra: without its runtime the export says what to install, and the definitions ship
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(base + "/api/v1/measurements?format=protobuf")
        assert refused.value.code == 501  # a valid request this server lacks the extra for
        assert "pip install 'llm-latency-lens[protobuf]'" in json.loads(refused.value.read())["error"]
        shipped = next(aggregator_venv.glob("lib/python*/site-packages/lens_core/proto/llm_latency_lens/v1"))
        assert {"measurement.proto", "measurement_pb2.py", "measurement_pb2.pyi"} <= {p.name for p in shipped.iterdir()}
    finally:
        server.stop()
