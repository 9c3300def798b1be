"""llama.cpp's own ``llama-server``, built from the exact llama.cpp that the pinned llama-cpp-python vendors.

``ensure_llama_server()`` returns a cached binary, building it the first time (minutes on 2 cores);
``LlamaServerProcess`` runs it on 127.0.0.1 for a test. ``python tests/llama_server.py`` builds (or finds) it and
prints its path.

The pin is read from pyproject.toml (the ``agent`` extra's ``llama-cpp-python==X``); its sdist on PyPI carries
``vendor/llama.cpp``. The binary is cached in ``~/.cache/llm-latency-lens/llama-server-X/llama-server`` (or under
``$XDG_CACHE_HOME``); delete that directory to rebuild. It links llama.cpp and ggml statically (CPU backend, built
for this machine's CPU: ``GGML_NATIVE=ON``), without the web UI and without HTTPS, so it is one file that needs only
the system's C/C++ runtime libraries.

What the HTTP API of this llama.cpp (the one vendored by llama-cpp-python 0.3.36) answers — checked against the
real server by tests/test_llama_server.py:

- ``GET /health`` → 200 ``{"status": "ok"}`` once the model is loaded (503 while loading).
- ``POST /tokenize`` ``{"content": str, "add_special": false, "with_pieces": bool}`` → ``{"tokens": [int, …]}``,
  or with ``with_pieces`` ``{"tokens": [{"id": int, "piece": str | [byte, …]}, …]}`` (a piece that is not valid
  UTF-8 on its own is a list of byte values). ``add_special`` defaults to false (no BOS).
- ``POST /detokenize`` ``{"tokens": [int, …]}`` → ``{"content": str}``; with this SentencePiece-style vocabulary the
  leading ``▁`` stays a space: /detokenize of /tokenize of "the cat" is " the cat".
- ``POST /completion`` accepts ``prompt`` as a list of token ids, used as it is (no BOS added, nothing
  re-tokenized); a string prompt is tokenized with BOS when the model asks for one (the tiny test model does), so
  ``"prompt": text`` ≡ ``"prompt": [bos, *tokenize(text)]``. With ``"return_tokens": true`` the answer's ``tokens``
  is the list of generated ids (without it: ``[]``). Other fields: ``content`` (the generated text, = /detokenize of
  ``tokens``), ``prompt`` (the prompt as text), ``tokens_predicted``, ``tokens_evaluated`` (prompt length),
  ``tokens_cached`` (what the slot's KV cache holds afterwards: prompt + generated − 1), ``stop_type`` ("limit"
  when ``n_predict`` ran out, "eos", "word"), ``stop``, ``stopping_word``, ``truncated``, ``has_new_line``,
  ``generation_settings``, ``id_slot``, ``index``, ``model`` (the model path).
- ``timings`` (every completion): ``cache_n`` (prompt tokens reused from the slot's KV cache: ``cache_prompt``,
  default true, keeps the longest common prefix with the previous request's prompt + output), ``prompt_n`` (prompt
  tokens evaluated by this request; ``cache_n + prompt_n`` = prompt length), ``prompt_ms`` (from the task's start
  to the end of prompt processing), ``prompt_per_token_ms`` (= prompt_ms / prompt_n), ``prompt_per_second``,
  ``predicted_n`` (= tokens generated), ``predicted_ms`` (from the end of the prompt to the last token),
  ``predicted_per_token_ms`` and ``predicted_per_second`` — these two count ``predicted_n − 1`` decode steps: the
  first generated token comes from the prompt batch's logits, so it is free. ``draft_n`` / ``draft_n_accepted``
  appear only when the server itself drafts (``--model-draft``).
- ``n_probs`` > 0 adds ``completion_probabilities``: one entry per generated token, ``{"id": int, "token": str,
  "bytes": [int, …], "logprob": float, "top_logprobs": [{"id", "token", "bytes", "logprob"}, … n_probs of them,
  most likely first]}`` (``token`` is the piece, with a space for ``▁``; ``bytes`` its UTF-8). The log-probabilities
  are those of the model's distribution before the sampler chain (temperature, top-k, … not applied), so greedy
  picks ``top_logprobs[0]``. With ``"post_sampling_probs": true`` the names are ``prob`` and ``top_probs`` and they
  hold probabilities after the sampler chain (greedy: 1.0 for the chosen token).
- Greedy: ``"temperature": 0`` (with ``"top_k": 1``) is deterministic and consistent in token space — prompt + the
  first j generated ids continues with the remaining ids, whether the prefix comes from the cache or not.
- Options of this build (``llama-server --help``): ``--no-webui`` (alias of ``--no-ui``), ``-np/--parallel``,
  ``-c/--ctx-size``, ``-t/--threads``, ``-tb/--threads-batch``, ``-s/--seed``, ``--no-warmup``; ``--version`` says
  "version: 0.5.0-dev (build 0, commit unknown)" (an sdist carries no git metadata).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llama-cpp-python"
BINARY = "llama-server"

# Only what the llama-server target needs: the common library and the tools (the server lives in tools/server),
# no tests, examples or unified app; no prebuilt web UI (it would be downloaded from Hugging Face) and no npm build;
# no HTTPS (no OpenSSL needed); llama.cpp and ggml linked statically into the one binary. (LLAMA_CURL is deprecated
# and ignored in this llama.cpp; the server is in LLAMA_BUILD_TOOLS and needs LLAMA_BUILD_COMMON.)
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


def log(message: str) -> None:
    print(f"llama-server: {message}", file=sys.stderr, flush=True)


def pinned_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The exact ``llama-cpp-python==X`` of the ``agent`` extra in pyproject.toml."""
    data = tomllib.loads(pyproject.read_text())
    for requirement in data["project"]["optional-dependencies"]["agent"]:
        match = re.fullmatch(r"\s*llama[-_.]cpp[-_.]python\s*==\s*([^\s;,\[]+)\s*", requirement, flags=re.I)
        if match:
            return match.group(1)
    raise RuntimeError(f"no exact {PACKAGE}==X pin in the agent extra of {pyproject}")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-latency-lens"


def cached_binary(version: str | None = None) -> Path:
    """Where the binary for ``version`` (default: the pinned one) lives once built."""
    return cache_root() / f"llama-server-{version or pinned_version()}" / BINARY


def ensure_llama_server(version: str | None = None) -> Path:
    """The cached ``llama-server`` for the pinned llama-cpp-python, built first if it is missing."""
    version = version or pinned_version()
    binary = cached_binary(version)
    if binary.is_file():
        return binary
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"llama-server-{version}.lock", "w") as lock:
        if binary.is_file():
            return binary
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building {binary}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():  # built by the process that held the lock
            return binary
        _build(version, binary)
    return binary


def _run(command: Sequence[str], cwd: Path, logfile: Path, progress: bool = False) -> None:
    """Run ``command``, its output into ``logfile`` (progress lines to stderr every 15 s); the log's tail on failure."""
    with open(logfile, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        last = time.monotonic()
        for line in proc.stdout:
            out.write(line)
            if progress and time.monotonic() - last >= 15 and re.match(r"\s*\[\s*\d+", line):
                log(line.strip())
                last = time.monotonic()
        rc = proc.wait()
    if rc != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{command[0]} failed (exit {rc}); full log: {logfile}\n{tail}")


def _build(version: str, binary: Path) -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama-server needs {tool} (apt-get install cmake g++)")
    started = time.monotonic()
    root = cache_root()
    logfile = root / f"llama-server-{version}.build.log"
    logfile.write_text("")
    work = Path(tempfile.mkdtemp(prefix=f".build-{version}-", dir=root))
    try:
        log(f"building llama-server from the llama.cpp vendored by {PACKAGE}=={version} (minutes; log: {logfile})")
        log(f"downloading the {PACKAGE}=={version} sdist")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                PACKAGE,
                "--dest",
                str(work),
                f"{PACKAGE}=={version}",
            ],
            work,
            logfile,
        )
        sdists = list(work.glob("*.tar.gz"))
        if len(sdists) != 1:
            raise RuntimeError(f"expected one sdist of {PACKAGE}=={version} in {work}, found {sdists}")
        log(f"extracting vendor/llama.cpp from {sdists[0].name}")
        source = _extract_llama_cpp(sdists[0], work / "src")
        build = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log("configuring: cmake " + " ".join(CMAKE_OPTIONS))
        _run(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_OPTIONS], work, logfile)
        jobs = str(os.cpu_count() or 2)
        log(f"compiling the {BINARY} target with {jobs} jobs")
        _run(["cmake", "--build", str(build), "--target", BINARY, "-j", jobs], work, logfile, progress=True)
        built = build / "bin" / BINARY
        if not built.is_file():
            raise RuntimeError(f"the build produced no {built}")
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=root))
        staging.chmod(0o755)
        shutil.copy2(built, staging / BINARY)
        (staging / "BUILD-INFO").write_text(
            f"{PACKAGE}=={version}\ncmake {' '.join(CMAKE_OPTIONS)}\n"
            f"built {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} in {time.monotonic() - started:.0f} s\n"
        )
        final = binary.parent
        if final.exists():  # a partial leftover (no binary in it): replace it
            shutil.rmtree(final)
        os.rename(staging, final)
        size = binary.stat().st_size / 1e6
        log(f"built {binary} ({size:.1f} MB) in {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in root.glob(f".staging-{version}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Extract ``<sdist>/vendor/llama.cpp`` into ``dest`` and return the extracted tree."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if re.match(r"[^/]+/vendor/llama\.cpp/", m.name)]
        if not members:
            raise RuntimeError(f"{sdist.name} carries no vendor/llama.cpp")
        if sys.version_info >= (3, 12):
            tar.extractall(dest, members=members, filter="data")
        else:
            for member in members:
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise RuntimeError(f"unsafe path in {sdist.name}: {member.name}")
            tar.extractall(dest, members=members)  # paths checked above
    top = members[0].name.split("/", 1)[0]
    return dest / top / "vendor" / "llama.cpp"


class ServedProcess:
    """A test server on 127.0.0.1:``port`` run as a child process (``command()``): its log goes to a temporary file
    (a pipe nobody reads could fill and block it), ``start()`` returns once ``GET /health`` answers 200 (or raises
    with the end of the log), ``stop()`` ends it. Also a context manager."""

    name = "server"  # in error messages
    poll_s = 0.05  # how often start() asks /health

    def __init__(self, port: int, *, start_timeout: float, stop_timeout: float = 10.0) -> None:
        self.port, self.start_timeout, self.stop_timeout = port, start_timeout, stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_options(self) -> dict[str, Any]:
        """More ``subprocess.Popen`` arguments (environment, session)."""
        return {}

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        data: bytes = self._log.read()
        return data.decode(errors="replace")

    def start(self) -> Any:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 — closed by close()
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, **self.popen_options()
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"{self.name} exited with {code} before it was ready:\n{self.log_text()[-4000:]}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.url + "/health", timeout=1) as response,
            ):
                if response.status == 200:
                    return self
            time.sleep(self.poll_s)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {self.start_timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Any:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LlamaServerProcess(ServedProcess):
    """``llama-server`` serving ``model`` on 127.0.0.1:``port``, set up for small deterministic tests.

    One slot (``-np 1``), a 512-token context, 2 threads, no web UI, a fixed seed; ``extra_args`` are appended
    (later options win). ``start()`` returns once ``GET /health`` answers 200; ``stop()`` terminates it (SIGKILL
    after ``stop_timeout``). Also a context manager.
    """

    name = "llama-server"

    def __init__(
        self,
        binary: Path,
        model: Path,
        port: int,
        extra_args: Sequence[str] = (),
        *,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.binary, self.model = Path(binary), Path(model)
        self.extra_args = list(extra_args)

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ctx-size",
            "512",
            "--parallel",
            "1",
            "--threads",
            "2",
            "--threads-batch",
            "2",
            "--seed",
            "0",
            "--no-webui",
            "--no-warmup",
            *self.extra_args,
        ]

    def post(self, path: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
        """POST ``body`` as JSON to ``path``; the decoded JSON answer (an HTTP error raises with its body)."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {path} → {exc.code}: {exc.read().decode(errors='replace')}") from None

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())


@contextlib.contextmanager
def llama_server(model: Path, port: int, extra_args: Sequence[str] = ()) -> Iterator[LlamaServerProcess]:
    """The pinned ``llama-server`` (built if needed) serving ``model`` for the duration of the block."""
    with LlamaServerProcess(ensure_llama_server(), model, port, extra_args) as server:
        yield server


def main() -> None:
    version = pinned_version()
    binary = cached_binary(version)
    if binary.is_file():
        log(f"cached for {PACKAGE}=={version} (delete {binary.parent} to rebuild)")
    print(ensure_llama_server(version))


if __name__ == "__main__":
    main()
