"""The Python API is quiet: the README's example, run as a user pastes it on the bundled SmolLM2, prints its one line
and nothing else; llama.cpp's own log (some 2,000 lines for a model load) goes through Python logging, where an
application that configures logging finds it, never straight to the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .test_readme import ROOT, find


def python(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_documented_example_prints_one_line(tmp_path: Path, smollm2: Path) -> None:
    (tmp_path / "model.gguf").symlink_to(smollm2)
    done = python(find("from llama_cpp import Llama"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    [line] = done.stdout.splitlines()
    ttft, tpot, tpot2 = (float(x) for x in line.split())
    assert ttft > 0 and tpot > 0 and tpot2 > 0


def test_llama_cpp_log_goes_through_python_logging(tmp_path: Path, smollm2: Path) -> None:
    """Even with llama-cpp-python's verbose default, llama.cpp's own lines reach the ``llama.cpp`` logger, not
    stderr; an application that asks for them gets them there."""
    script = f"""
import logging
from llama_cpp import Llama
import agent.api
seen = []
handler = logging.Handler(logging.DEBUG)
handler.emit = lambda record: seen.append(record.getMessage())
logger = logging.getLogger("llama.cpp")
logger.addHandler(handler)
logger.setLevel(logging.DEBUG)
llm = Llama({str(smollm2)!r}, n_ctx=256)
completion, m = agent.api.measured_completion(llm, "Hello", max_tokens=4)
print(len(seen), sum(1 for s in seen if s.startswith("llama_model_loader:")))
"""
    done = python(script, tmp_path)
    assert done.returncode == 0, done.stderr
    lines, loader_lines = (int(x) for x in done.stdout.split())
    assert lines > 100 and loader_lines > 10, done.stdout
    assert "llama_model_loader:" not in done.stderr and "load_tensors:" not in done.stderr
    assert len(done.stderr.splitlines()) < 30, done.stderr  # llama-cpp-python's own prints (verbose=True) only
