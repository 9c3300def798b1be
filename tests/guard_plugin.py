"""A real guardrail plugin package for the tests: written into a directory with its ``dist-info`` (METADATA and
``entry_points.txt``), so that :mod:`importlib.metadata` discovers it in the group ``llm_latency_lens.guardrails``
once the directory is on ``sys.path`` (or ``PYTHONPATH`` for a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def agent_head(tmp_path: Path, model: Path) -> str:
    """The start of an agent config for a guarded service test: its data under ``tmp_path``, the tiny ``model`` on
    one thread, no power source or idle baseline to wait for."""
    return "\n".join(
        (
            "[agent]",
            f'data_dir = "{tmp_path / "data"}"',
            "[model]",
            f'path = "{model}"',
            "n_ctx = 256",
            "n_threads = 1",
            "[probes]",
            'idle_baseline = "0"',
            'power_source = "none"',
        )
    )


MODULE = '''
"""Test guardrails: a planted word, a failure, a hang, garbage answers."""

import threading
import time

from agent.guardrails.base import CheckResult, Violation

RELEASE = threading.Event()  # set by a test to let a hung call return


class Planted:
    """Answers a violation when the text holds the planted word; otherwise a clean result."""

    def __init__(self, options):
        self.word = options["word"]
        self.type = options.get("type", "prompt_injection")
        self.severity = options.get("severity", "critical")
        self.calls = []

    def _check(self, text):
        self.calls.append(text)
        if self.word in text:
            return CheckResult([Violation(self.type, self.severity, "planted word found")], risk_score=0.97)
        return CheckResult(risk_score=0.01)

    validate_input = detect_threats = filter_output = _check


class DictAnswers:
    """Answers a plain dict, with a violation type outside the vocabulary."""

    def __init__(self, options):
        self.word = options["word"]

    def validate_input(self, text):
        if self.word in text:
            return {"violations": [{"type": "our-own-rule", "severity": "high", "description": "own rule"}],
                    "risk_score": 0.7, "server_ms": 1.5, "network_ms": 0.5}
        return {"violations": [], "risk_score": 0.0}


class Raiser:
    def __init__(self, options):
        pass

    def validate_input(self, text):
        raise RuntimeError("the guard's model file is corrupt")

    detect_threats = filter_output = validate_input


class Hang:
    def __init__(self, options):
        self.seconds = float(options.get("seconds", 30))

    def detect_threats(self, text):
        RELEASE.wait(self.seconds)
        return CheckResult()


class Garbage:
    def __init__(self, options):
        self.answer = options["answer"]

    def validate_input(self, text):
        if self.answer == "risk":
            return CheckResult(risk_score=7)
        if self.answer == "severity":
            return CheckResult([Violation("other", 3, "x")], risk_score=0.5)
        if self.answer == "nan":
            return CheckResult(risk_score=float("nan"))
        return "all fine"


def input_only(options):
    """A factory: an object with validate_input only."""
    return DictAnswers(options)
'''

ENTRY_POINTS = """[llm_latency_lens.guardrails]
planted = lens_test_guard:Planted
dict-answers = lens_test_guard:input_only
raiser = lens_test_guard:Raiser
hang = lens_test_guard:Hang
garbage = lens_test_guard:Garbage
"""


def install_plugin(root: Path, module: str, source: str, entry_points: str) -> Path:
    """A package of one ``module`` with ``source``, installed under ``root`` as ``importlib.metadata`` sees it: its
    ``dist-info`` with METADATA (the distribution is the module's name with dashes) and ``entry_points.txt``.
    Returns ``root`` (put it on sys.path or PYTHONPATH)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    (info / "top_level.txt").write_text(f"{module}\n")
    return root


def write_plugin(root: Path) -> Path:
    """The installed package ``lens-test-guard`` under ``root``; returns ``root`` (put it on sys.path)."""
    return install_plugin(root, "lens_test_guard", MODULE, ENTRY_POINTS)


def run_once(config: Path, site: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``lens-agent run --config CONFIG --once`` from this checkout with the plugins under ``site`` importable and no
    LENS_ variable of the caller's."""
    root = Path(__file__).resolve().parents[1]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(root), str(site)])
    return subprocess.run(
        [sys.executable, "-c", "from agent.cli import main; main()", "run", "--config", str(config), "--once"],
        cwd=root,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
