"""The two .deb packages: built by packaging/build-deb.sh, inspected with dpkg-deb, unpacked with dpkg -x and run
from there.

lens-agent's build compiles llama.cpp for any CPU of this architecture (bypassing pip's wheel cache): a few minutes
the first time, then seconds (the script keeps that wheel under ~/.cache/llm-latency-lens/deb-wheels/).
lens-aggregator's compiles nothing and has a fixture of its own, so its tests do not wait for the agent's. When the
tests selected need both packages, the two builds run side by side (each is mostly pip and gzip, on one core): the
second package is ready when the first one is, not after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netproxy import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.deb


class Build:
    """``packaging/build-deb.sh --role ROLE`` started in the background; ``deb()`` waits for the package."""

    def __init__(self, role: str, out: Path) -> None:
        assert shutil.which("dpkg-deb"), "dpkg-deb is missing: `make sysdeps` installs it"
        self.role = role
        # files, not pipes: nobody reads a pipe while the build runs, and a full one (64 KiB of pip's warnings)
        # would stop it
        self.stdout, self.stderr = out / "build.stdout", out / "build.stderr"
        with self.stdout.open("wb") as stdout, self.stderr.open("wb") as stderr:
            self.proc = subprocess.Popen(
                ["bash", str(ROOT / "packaging" / "build-deb.sh"), "--role", role, str(out / "debs")],
                stdout=stdout,
                stderr=stderr,
            )
        self._deb: Path | None = None

    def deb(self) -> Path:
        if self._deb is None:
            try:
                self.proc.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                self.stop()
                raise
            assert self.proc.returncode == 0, self.stderr.read_text(errors="replace")[-3000:]
            deb = Path(self.stdout.read_text().strip().splitlines()[-1])
            assert deb.name.startswith(f"lens-{self.role}_") and deb.suffix == ".deb", deb
            self._deb = deb
        return self._deb

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


NEEDS = {"agent": "deb", "aggregator": "aggregator_deb"}  # each package and its fixture


class Builds:
    """The packages' builds of this module: the first package asked for starts every one a selected test here needs
    (through its fixture in ``NEEDS``), so they run side by side."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.request, self.tmp_path_factory = request, tmp_path_factory
        self.started: dict[str, Build] = {}

    def needed(self) -> list[str]:
        module = self.request.module.__name__
        items = [i for i in self.request.session.items if getattr(i, "module", None) is not None]
        return [
            role
            for role, fixture in NEEDS.items()
            if any(i.module.__name__ == module and fixture in getattr(i, "fixturenames", ()) for i in items)
        ]

    def deb(self, role: str) -> Path:
        if not self.started:
            for other in self.needed():
                self.started[other] = Build(other, self.tmp_path_factory.mktemp(f"deb-{other}"))
        if role not in self.started:
            self.started[role] = Build(role, self.tmp_path_factory.mktemp(f"deb-{role}"))
        return self.started[role].deb()

    def stop(self) -> None:
        for build in self.started.values():
            build.stop()


@pytest.fixture(scope="module")
def builds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builds]:
    started = Builds(request, tmp_path_factory)
    try:
        yield started
    finally:
        started.stop()


def unpack(deb: Path, root: Path) -> Path:
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def contents(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "--contents", str(deb)], check=True, capture_output=True, text=True).stdout


def control_file(deb: Path, name: str) -> str:
    """One file of the package's control archive (control, conffiles, postinst …) as dpkg-deb prints it."""
    return subprocess.run(["dpkg-deb", "--info", str(deb), name], check=True, capture_output=True, text=True).stdout


def files(deb: Path) -> set[str]:
    """Every path in the package that is not a directory (files and links): what dpkg would refuse to share."""
    found = set()
    for line in contents(deb).splitlines():
        if line and not line.startswith("d"):
            found.add(re.split(r"\s+", line, maxsplit=5)[5].split(" -> ")[0])
    return found


def venv_env() -> dict[str, str]:
    """This process's environment without the test venv's, so the unpacked venv's python runs on its own."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}


@pytest.fixture(scope="module")
def deb(builds: Builds) -> Path:
    return builds.deb("agent")


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(deb, tmp_path_factory.mktemp("root"))


@pytest.fixture(scope="module")
def aggregator_deb(builds: Builds) -> Path:
    return builds.deb("aggregator")


@pytest.fixture(scope="module")
def aggregator_unpacked(aggregator_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(aggregator_deb, tmp_path_factory.mktemp("root-aggregator"))


# lens-agent


def test_package_metadata(deb: Path) -> None:
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], check=True, capture_output=True, text=True).stdout
    assert "Package: lens-agent" in info and "Depends: python3 (>= 3." in info and "adduser" in info
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in info
    postinst = control_file(deb, "postinst")
    assert "deb-systemd-helper enable lens-agent.service" in postinst
    assert "systemctl start" not in postinst  # enabled, not started
    # the aggregator is its own package: not its user, its config or its service here
    assert control_file(deb, "conffiles").split() == ["/etc/lens-agent/agent.toml"]
    assert re.search(r"adduser --system .* lens-agent$", postinst, re.MULTILINE)
    assert not re.search(r"adduser.*lens-aggregator|for user in", postinst)
    for script in ("postinst", "prerm", "postrm"):
        assert "lens-aggregator.service" not in control_file(deb, script), script


def test_package_contents(deb: Path) -> None:
    listing = contents(deb)
    for path in (
        "./opt/lens-agent/bin/lens-agent",
        "./usr/bin/lens-agent -> /opt/lens-agent/bin/lens-agent",
        "./lib/systemd/system/lens-agent.service",
        "./etc/lens-agent/agent.toml",
        "./usr/lib/tmpfiles.d/lens-agent-rapl.conf",
        "./usr/share/lens-agent/lens-agent-jetson.conf",
        "./usr/share/lens-agent/prompts/short-chat.jsonl",
        "./usr/share/lens-agent/suites/edge-smoke.yaml",
        "./usr/share/doc/lens-agent/README.md",
        "/site-packages/llama_cpp/",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ):
        assert path in listing, path
    for path in ("lens-aggregator.service", "./etc/lens-aggregator/", "./usr/bin/lens-aggregator"):
        assert path not in listing, path
    assert "root/root" in listing and "__pycache__" not in listing


def test_unpacked_cli_runs(unpacked: Path, tiny_model: Path, tmp_path: Path) -> None:
    venv = unpacked / "opt" / "lens-agent"
    script = (venv / "bin" / "lens-agent").read_text().splitlines()[0]
    assert script == "#!/opt/lens-agent/bin/python3"  # relocated to where it will live
    python = venv / "bin" / "python3"
    env = venv_env()
    run = [str(python), "-c", "from agent.cli import main; main()"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert version.returncode == 0 and "lens-agent" in version.stdout
    bench = subprocess.run(
        [
            *run,
            "bench",
            "--model",
            str(tiny_model),
            "--runs",
            "2",
            "--warmup",
            "0",
            "--max-tokens",
            "4",
            "--n-ctx",
            "128",
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert bench.returncode == 0, bench.stderr
    assert '"time_to_first_token"' in bench.stdout
    # the packaged example suite, as its user runs it (the tiny model as the device's model, for speed)
    suite = subprocess.run(
        [*run, "bench", "--suite", str(unpacked / "usr/share/lens-agent/suites/edge-smoke.yaml"), "--json"],
        capture_output=True,
        text=True,
        env={
            **env,
            "LENS_MODEL_PATH": str(tiny_model),
            "LENS_MODEL_N_CTX": "512",
            "LENS_AGENT_DATA_DIR": str(tmp_path),
        },
        cwd=tmp_path,
        timeout=300,
    )
    assert suite.returncode == 0, suite.stderr
    assert len(json.loads(suite.stdout)) == 2  # one results document per workload (one level each)
    bundled = subprocess.run(
        [str(python), "-c", "from agent.engines.modelfile import bundled_model_path as b; print(b())"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert str(unpacked) in bundled.stdout  # the model inside the package is found by itself


def test_units_verify_against_the_unpacked_tree(unpacked: Path, tmp_path: Path) -> None:
    text = (unpacked / "lib/systemd/system/lens-agent.service").read_text()
    assert re.search(r"^LimitNOFILE=\d+$", text, re.MULTILINE)  # the packaged unit is the repository's
    (tmp_path / "lens-agent.service").write_text(text.replace("/opt/lens-agent", str(unpacked / "opt" / "lens-agent")))
    done = subprocess.run(
        ["systemd-analyze", "verify", "lens-agent.service"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# lens-aggregator


def test_aggregator_package_metadata(aggregator_deb: Path) -> None:
    control = control_file(aggregator_deb, "control")
    assert re.search(r"^Package: lens-aggregator$", control, re.MULTILINE)
    assert re.search(r"^Depends: python3 \(>= 3\.\d+\), python3 \(<< 3\.\d+\), adduser$", control, re.MULTILINE)
    assert re.search(r"^Description: \S", control, re.MULTILINE)
    info = subprocess.run(["dpkg-deb", "--info", str(aggregator_deb)], check=True, capture_output=True, text=True)
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in info.stdout
    assert control_file(aggregator_deb, "conffiles").split() == ["/etc/lens-aggregator/aggregator.toml"]
    postinst = control_file(aggregator_deb, "postinst")
    assert "adduser --system" in postinst and "lens-aggregator" in postinst
    assert "deb-systemd-helper enable lens-aggregator.service" in postinst
    assert "systemctl start" not in postinst  # enabled, not started
    assert "lens-agent" not in postinst  # not the agent's user or service
    assert "systemctl stop lens-aggregator.service" in control_file(aggregator_deb, "prerm")
    postrm = control_file(aggregator_deb, "postrm")
    assert "deb-systemd-helper purge lens-aggregator.service" in postrm
    assert "rm -rf /var/lib" not in postrm  # the database outlives the package


def test_aggregator_package_contents(aggregator_deb: Path) -> None:
    listing = contents(aggregator_deb)
    for path in (
        "./opt/lens-aggregator/bin/lens-aggregator",
        "./opt/lens-aggregator/bin/python3",
        "./usr/bin/lens-aggregator -> /opt/lens-aggregator/bin/lens-aggregator",
        "./lib/systemd/system/lens-aggregator.service",
        "./etc/lens-aggregator/aggregator.toml",
        "./usr/share/doc/lens-aggregator/README.md",
        "./usr/share/doc/lens-aggregator/fleet.md",
        "/site-packages/aggregator/app.py",
        "/site-packages/lens_core/",
        "/site-packages/aiohttp/",
    ):
        assert path in listing, path
    # the base install: no inference engine, no model files, no device probes
    for absent in (
        "/site-packages/llama_cpp",
        "llama_cpp_python",
        "/site-packages/gguf",
        "/site-packages/psutil",
        ".gguf",
        "./opt/lens-aggregator/bin/lens-agent",
        "./usr/bin/lens-agent",
        "./lib/systemd/system/lens-agent.service",
        "./etc/lens-agent/",
    ):
        assert absent not in listing, absent
    assert "root/root" in listing and "__pycache__" not in listing


def test_aggregator_venv_has_no_agent_dependencies(aggregator_unpacked: Path, tmp_path: Path) -> None:
    python = aggregator_unpacked / "opt" / "lens-aggregator" / "bin" / "python3"
    probe = (
        "import importlib.util as u, importlib.metadata as m, json; "
        "names = ('llama_cpp', 'gguf', 'psutil', 'apscheduler', 'tqdm', 'aggregator', 'lens_core'); "
        "dists = sorted(d.metadata['Name'].lower() for d in m.distributions()); "
        "print(json.dumps({'found': {n: u.find_spec(n) is not None for n in names}, 'dists': dists}))"
    )
    done = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, env=venv_env(), cwd=tmp_path, check=True
    )
    answer = json.loads(done.stdout)
    assert answer["found"] == {
        "llama_cpp": False,
        "gguf": False,
        "psutil": False,
        "apscheduler": False,
        "tqdm": False,
        "aggregator": True,
        "lens_core": True,
    }
    assert not {"llama-cpp-python", "llama_cpp_python", "gguf", "psutil"} & set(answer["dists"]), answer["dists"]


def test_the_packages_share_no_file(deb: Path, aggregator_deb: Path) -> None:
    """Both can be installed on one machine (a small server measuring itself): dpkg refuses a file in two packages."""
    agent, aggregator = files(deb), files(aggregator_deb)
    assert "./usr/bin/lens-agent" in agent and "./usr/bin/lens-aggregator" in aggregator
    assert not agent & aggregator, sorted(agent & aggregator)[:20]


def test_unpacked_aggregator_runs(aggregator_unpacked: Path, tmp_path: Path) -> None:
    venv = aggregator_unpacked / "opt" / "lens-aggregator"
    script = venv / "bin" / "lens-aggregator"
    assert script.read_text().splitlines()[0] == "#!/opt/lens-aggregator/bin/python3"  # relocated
    run = [str(venv / "bin" / "python3"), str(script)]  # the shipped entry point, by the unpacked interpreter
    env = venv_env()
    usage = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert usage.returncode == 0, usage.stderr
    assert "lens-aggregator" in usage.stdout and "serve" in usage.stdout and "token" in usage.stdout

    # the shipped conffile with the database and the port moved to this test's directory
    shipped = (aggregator_unpacked / "etc/lens-aggregator/aggregator.toml").read_text()
    port = free_port()
    config = tmp_path / "aggregator.toml"
    config.write_text(
        shipped.replace('"/var/lib/lens-aggregator/aggregator.db"', json.dumps(str(tmp_path / "agg.db"))).replace(
            "port = 8443", f"port = {port}"
        )
    )
    assert str(tmp_path / "agg.db") in config.read_text() and f"port = {port}" in config.read_text()
    server = subprocess.Popen(
        [*run, "serve", "--config", str(config), "--host", "127.0.0.1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health = None
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(OSError):
                with direct.open(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as answer:
                    health = json.loads(answer.read())
                break
            time.sleep(0.1)
        assert health is not None, server.stderr.read() if server.poll() is not None else "no answer"
        assert health["status"] == "ok" and health["service"] == "lens-aggregator"
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert (tmp_path / "agg.db").exists()


def test_aggregator_unit_verifies_against_the_unpacked_tree(aggregator_unpacked: Path, tmp_path: Path) -> None:
    text = (aggregator_unpacked / "lib/systemd/system/lens-aggregator.service").read_text()
    assert "ExecStart=/opt/lens-aggregator/bin/lens-aggregator serve" in text
    assert "\nLimitNOFILE=65536\n" in text  # the connection cap is sized from it (docs/service.md)
    prefix = str(aggregator_unpacked / "opt" / "lens-aggregator")
    (tmp_path / "lens-aggregator.service").write_text(text.replace("/opt/lens-aggregator", prefix))
    done = subprocess.run(
        ["systemd-analyze", "verify", "lens-aggregator.service"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
