"""The .deb: built by packaging/build-deb.sh, inspected with dpkg-deb, unpacked with dpkg -x and run from there.

Building compiles llama.cpp for any CPU of this architecture (no wheel cache): a few minutes, once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.deb


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("dpkg-deb"), "dpkg-deb is missing: `make sysdeps` installs it"
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run(
        ["bash", str(ROOT / "packaging" / "build-deb.sh"), str(out)], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def test_package_metadata(deb: Path) -> None:
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], check=True, capture_output=True, text=True).stdout
    assert "Package: lens-agent" in info and "Depends: python3 (>= 3." in info and "adduser" in info
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in info
    postinst = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], check=True, capture_output=True).stdout
    assert b"deb-systemd-helper enable lens-agent.service" in postinst
    assert b"systemctl start" not in postinst  # enabled, not started


def test_package_contents(deb: Path) -> None:
    contents = subprocess.run(["dpkg-deb", "--contents", str(deb)], check=True, capture_output=True, text=True).stdout
    for path in (
        "./opt/lens-agent/bin/lens-agent",
        "./opt/lens-agent/bin/lens-aggregator",
        "./usr/bin/lens-agent -> /opt/lens-agent/bin/lens-agent",
        "./lib/systemd/system/lens-agent.service",
        "./lib/systemd/system/lens-aggregator.service",
        "./etc/lens-agent/agent.toml",
        "./etc/lens-aggregator/aggregator.toml",
        "./usr/lib/tmpfiles.d/lens-agent-rapl.conf",
        "./usr/share/lens-agent/lens-agent-jetson.conf",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ):
        assert path in contents, path
    assert "root/root" in contents and "__pycache__" not in contents


def test_unpacked_cli_runs(unpacked: Path, tiny_model: Path, tmp_path: Path) -> None:
    venv = unpacked / "opt" / "lens-agent"
    script = (venv / "bin" / "lens-agent").read_text().splitlines()[0]
    assert script == "#!/opt/lens-agent/bin/python3"  # relocated to where it will live
    python = venv / "bin" / "python3"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
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
    bundled = subprocess.run(
        [str(python), "-c", "from agent.engines.modelfile import bundled_model_path as b; print(b())"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert str(unpacked) in bundled.stdout  # the model inside the package is found by itself


def test_units_verify_against_the_unpacked_tree(unpacked: Path, tmp_path: Path) -> None:
    for unit in ("lens-agent.service", "lens-aggregator.service"):
        text = (unpacked / "lib/systemd/system" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/lens-agent", str(unpacked / "opt" / "lens-agent")))
    done = subprocess.run(
        ["systemd-analyze", "verify", "lens-agent.service", "lens-aggregator.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
