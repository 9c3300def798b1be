"""Candidates measured in a child process: an engine that aborts, segfaults or hangs ends that candidate, never the
process that tunes (the service, or ``lens-agent tune``).

The parent (:class:`WorkerPool`) starts ``python -m agent.tune_worker FD`` and sends it one request per line on its
standard input — a JSON object naming the model, the engine settings, the prompts and the request options — and the
child answers one JSON line on the file descriptor ``FD`` (a pipe of its own: llama.cpp and Python may write to
stdout and stderr whatever they like). The child loads the model with those settings, runs the warm-up and the
measured requests, closes the model and waits for the next request; the parent reuses it for the next block, so a
tune starts Python once, not once per block. When the child dies — a signal (SIGABRT from ``std::bad_alloc``,
SIGSEGV), an exit, or no answer within ``tune.candidate_timeout`` — the parent raises :class:`CandidateCrashed`
naming the signal, and the next block starts a fresh child. Plain JSON both ways: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engines.llama import EngineSettings
from .errors import LensError
from .probes.interference import InterferenceMonitor, Thresholds
from .probes.sysfs import Root
from .prompts import Prompt

MAX_ANSWER_BYTES = 4 << 20  # a block's answer: a few hundred requests' figures
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # the directory that holds this `agent` package


class MeasureStopped(LensError):
    """The tune was asked to stop (the service is shutting down): the child was ended in the middle of a block."""


class CandidateCrashed(LensError):
    """The child measuring a candidate died or hung: that candidate failed, the tune goes on."""

    def __init__(self, message: str, signal_name: str | None = None) -> None:
        self.signal_name = signal_name
        super().__init__(message)


@dataclass
class BlockResult:
    """What one block measured: per request ok, e2e/ttft/tpot (ms) and the error type."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    model_name: str | None = None
    quantization: str | None = None
    load_error: str | None = None  # the engine refused the settings (a clear error, not a crash)


def _signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class WorkerPool:
    """One child process at a time, restarted after a crash. Not thread-safe: one tune uses one pool."""

    def __init__(self, timeout_s: float = 600.0, should_stop: Callable[[], bool] = lambda: False) -> None:
        self.timeout_s = timeout_s
        self.should_stop = should_stop  # asked every second while a block runs: True ends the child at once
        self._proc: subprocess.Popen[bytes] | None = None
        self._answers: int | None = None  # the read end of the child's answer pipe
        self.started = 0  # children started (a crash costs one more)

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "agent.tune_worker", str(write_fd)],
                # `-m` puts the working directory first on sys.path: run it where this very package lives, so an
                # `agent/` in whatever directory the tune was started from is never imported
                cwd=PACKAGE_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                pass_fds=(write_fd,),
                env=env,
                start_new_session=True,  # a Ctrl-C to the terminal reaches the parent, which ends the child
            )
        except OSError as exc:
            os.close(read_fd)
            raise LensError(f"cannot start the measuring process ({exc.strerror})") from None
        finally:
            os.close(write_fd)
        self._answers = read_fd
        self.started += 1

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def measure(self, request: dict[str, Any]) -> BlockResult:
        """Run one block in the child; raises CandidateCrashed when it dies or hangs (the child is then gone)."""
        if self._proc is None or self._proc.poll() is not None:
            self._reap()
            self._start()
        assert self._proc is not None and self._proc.stdin is not None and self._answers is not None
        line = json.dumps(request).encode() + b"\n"
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died("before it took the request") from None
        deadline = time.monotonic() + self.timeout_s
        buffer = bytearray()
        while not buffer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if self.should_stop():
                self._kill()
                raise MeasureStopped("the measuring process was stopped: the tune is asked to stop")
            if left <= 0:
                self._kill()
                raise CandidateCrashed(f"the measuring process gave no answer within {self.timeout_s:g} s: killed")
            ready, _, _ = select.select([self._answers], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(self._answers, 65536)
            if not chunk:
                raise self._died("while measuring")
            buffer += chunk
            if len(buffer) > MAX_ANSWER_BYTES:
                self._kill()
                raise CandidateCrashed("the measuring process answered more than it should: killed")
        try:
            answer = json.loads(bytes(buffer))
        except ValueError:
            self._kill()
            raise CandidateCrashed("the measuring process answered something that is not JSON: killed") from None
        if not isinstance(answer, dict):
            self._kill()
            raise CandidateCrashed("the measuring process answered something that is not an object: killed")
        if answer.get("error"):
            return BlockResult(load_error=str(answer["error"])[:500])
        requests = answer.get("requests")
        return BlockResult(
            requests=[r for r in requests if isinstance(r, dict)] if isinstance(requests, list) else [],
            model_name=answer.get("model_name") if isinstance(answer.get("model_name"), str) else None,
            quantization=answer.get("quantization") if isinstance(answer.get("quantization"), str) else None,
        )

    def _died(self, when: str) -> CandidateCrashed:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self._proc.returncode or -signal.SIGKILL
        self._reap()
        name = _signal_name(code)
        what = f"was killed by {name}" if name else f"exited with status {code}"
        return CandidateCrashed(f"the engine process {what} {when}", name)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self._answers is not None:
            os.close(self._answers)
            self._answers = None
        if self._proc is not None:
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
            if self._proc.poll() is None:
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """End the child (it exits when its standard input closes)."""
        self._reap()


def block_request(
    model_path: Path,
    settings: EngineSettings,
    prompts: list[Prompt],
    options: dict[str, Any],
    *,
    run_id: str,
    device_id: str,
) -> dict[str, Any]:
    return {
        "model_path": str(model_path),
        "settings": settings.as_dict(),
        "prompts": [{"id": p.id, "text": p.text} for p in prompts],
        "options": options,
        "run_id": run_id,
        "device_id": device_id,
    }


def run_block(request: dict[str, Any]) -> dict[str, Any]:
    """In the child: load, run the block, close; the answer the parent reads."""
    from .bench.runner import BenchOptions, run_bench
    from .engines.llama import LlamaEngine

    settings = EngineSettings(**request["settings"])
    try:
        engine = LlamaEngine.load(Path(request["model_path"]), settings, compute_sha256=False)
    except LensError as exc:
        return {"error": str(exc)}
    monitor = _monitor(request.get("interference"), settings)
    try:
        if monitor is not None:
            monitor.start()
        run = run_bench(
            engine,
            [Prompt(id=p["id"], text=p["text"]) for p in request["prompts"]],
            BenchOptions(**request["options"]),
            run_id=request["run_id"],
            device_id=request["device_id"],
            interference=monitor,
        )
        info = engine.info
    finally:
        if monitor is not None:
            monitor.stop()
        engine.close()
    return {
        "model_name": info.name if info else None,
        "quantization": info.quantization if info else None,
        "requests": [
            {
                "ok": m.ok,
                "e2e_ms": m.e2e_ms,
                "ttft_ms": m.ttft_ms,
                "tpot_ms": m.tpot_ms,
                "error_type": m.error_type,
                **({"interference": m.ext["interference"]} if isinstance(m.ext.get("interference"), dict) else {}),
            }
            for m in run.measured
        ],
    }


def _monitor(spec: Any, settings: EngineSettings) -> InterferenceMonitor | None:
    """What else uses the device beside this block's requests (``TuneOptions.interference``; None: not sampled).
    This process is the one measuring: its own CPU time is the run's, everything else's is "other"."""
    if not isinstance(spec, dict):
        return None
    return InterferenceMonitor(
        Root(spec["sysfs_root"]),
        Thresholds(**spec["thresholds"]),
        rate_hz=float(spec["rate_hz"]),
        needed_cores=float(settings.n_threads),
        uses_gpu=settings.n_gpu_layers != 0,
    )


def main(argv: list[str]) -> int:
    answers = os.fdopen(int(argv[0]), "wb", buffering=0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            answer = run_block(request)
        except LensError as exc:
            answer = {"error": str(exc)}
        answers.write(json.dumps(answer).encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
