"""The docs' code blocks as a user pastes them, for tests/test_docs.py and tests/test_readme.py.

The conventions these helpers read are those of docs/index.md: a ```sh block is commands, run in order from the
checkout's root after ``. .venv/bin/activate``; ``<!-- not run: REASON -->`` on the line before a block keeps it from
running (it is still checked against the command trees); ``<!-- run with: aggregator -->`` runs it beside a real
``lens-aggregator serve --db aggregator.db --port 8443``; a command whose comment starts ``# exit N`` must exit N.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*(not run|run with):\s*(.*?)\s*-->\s*$", re.S)
EXIT = re.compile(r"\s#\s*exit (\d+)\b.*$")
PROGRAMS = ("lens-agent", "lens-aggregator")
# a command line in a block: the program first (the checkout's .venv/bin/ form too)
COMMAND_LINE = re.compile(r"^\s*(?:sudo (?:-u \S+ )?)?(?:\.venv/bin/)?lens-(?:agent|aggregator)(?:\s|$)", re.M)
# the aggregator a "run with: aggregator" block finds: the README's store-and-forward recipe's
AGGREGATOR_DB = "aggregator.db"
AGGREGATOR_PORT = 8443
# where an installed agent and aggregator keep their state: a page run from a checkout never writes there
STATE_DIRS = (Path("/var/lib/lens-agent"), Path("/var/lib/lens-aggregator"))


@dataclass(frozen=True)
class Block:
    page: str  # the page's path in the repository
    line: int  # the line of the opening fence
    lang: str
    text: str
    not_run: str | None  # the reason given, for a block that is not run
    needs: str | None  # what it runs beside ("aggregator")

    def where(self, offset: int = 0) -> str:
        """``page:line`` of the block's ``offset``-th line (0: the fence)."""
        return f"{self.page}:{self.line + offset}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with the marker on the line before it."""
    text = path.read_text()
    page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        kind, value = (marker.group(1), marker.group(2)) if marker else (None, None)
        out.append(
            Block(
                page=page,
                line=text.count("\n", 0, m.start()) + 1,
                lang=m.group(1),
                text=m.group(2),
                not_run=value if kind == "not run" else None,
                needs=value if kind == "run with" else None,
            )
        )
    return out


# --- static checks: the commands against the click trees ---


def command_trees() -> dict[str, click.Group]:
    from agent.cli import cli as agent_cli
    from aggregator.cli import cli as aggregator_cli

    return {"lens-agent": agent_cli, "lens-aggregator": aggregator_cli}


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(offset of the first physical line, the command) for each command of a shell block: continuation lines
    joined, heredoc bodies and comment lines left out."""
    out: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", line)
        i += 1
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        if line.strip() and not line.lstrip().startswith("#"):
            out.append((start + 1, line))
    return out


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a synopsis: words are enough here
        return line.split("#", 1)[0].split()


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) of each lens-agent / lens-aggregator in one command line (pipes, && and ; split it;
    sudo, environment assignments and the .venv/bin/ prefix are taken off)."""
    out = []
    segment: list[str] = []
    for word in [*_words(line.replace("\\|", " | ")), ";"]:
        if word in ("|", "||", "&&", ";", "&"):
            while segment and (segment[0] == "sudo" or re.match(r"^\w+=", segment[0])):
                segment = segment[3:] if segment[:2] == ["sudo", "-u"] else segment[1:]
            if (
                segment
                and Path(segment[0]).name in PROGRAMS
                and segment[0] in (Path(segment[0]).name, ".venv/bin/" + Path(segment[0]).name)
            ):
                args = []
                skip = False
                for w in segment[1:]:
                    if skip:
                        skip = False
                    elif w in (">", ">>", "2>", "<"):
                        skip = True
                    elif not re.match(r"^\d?>>?|^<", w):
                        args.append(w)
                out.append((Path(segment[0]).name, args))
            segment = []
        else:
            segment.append(word)
    return out


def _options(command: click.Command, ctx: click.Context) -> set[str]:
    names = {"-h", "--help"}
    for param in command.get_params(ctx):
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names


def check_invocation(program: str, args: list[str], trees: dict[str, click.Group]) -> str | None:
    """Why ``program args`` cannot parse (an unknown subcommand or option), or None. Placeholders (``[--json]``,
    ``ID``, ``csv|json``) are allowed: only the subcommand names and the option names are checked."""
    command: click.Command = trees[program]
    path = [program]
    words = [w.strip("[]") for w in args]
    words = [w for w in words if w and w not in ("...", "…")]
    i = 0
    while True:
        ctx = click.Context(command, info_name=" ".join(path))
        options = _options(command, ctx)
        if isinstance(command, click.Group):
            takes_value = {
                o for p in command.get_params(ctx) if isinstance(p, click.Option) and not p.is_flag for o in p.opts
            }
            while i < len(words) and words[i].startswith("-"):
                if words[i].split("=", 1)[0] not in options:
                    return f"{' '.join(path)}: no option {words[i]!r}"
                i += 2 if words[i] in takes_value else 1  # a group's own option with its value (regressions --state X)
            if i == len(words):
                return None
            sub = command.get_command(ctx, words[i])
            if sub is None:
                return f"{' '.join(path)}: no command {words[i]!r} (has: {', '.join(command.list_commands(ctx))})"
            command, path, i = sub, [*path, words[i]], i + 1
            continue
        for word in words[i:]:
            is_option = word.startswith("-") and len(word) > 1 and not re.match(r"^-\d", word)
            if is_option and word.split("=", 1)[0] not in options:
                return f"{' '.join(path)}: no option {word!r} (has: {', '.join(sorted(options))})"
        return None


def check_block(block: Block, trees: dict[str, click.Group]) -> list[str]:
    """Each command of a shell block that does not parse, as ``page:line: why``."""
    problems = []
    for offset, line in logical_lines(block.text):
        for program, args in invocations(line):
            why = check_invocation(program, args, trees)
            if why:
                problems.append(f"{block.where(offset)}: {why}\n    {line.strip()}")
    return problems


# --- running: a scratch checkout, a network of its own, a real aggregator ---


def scratch_checkout(dest: Path) -> Path:
    """The files git tracks in this checkout, copied to ``dest`` as they are now, with ``.venv`` linked to the
    environment these tests run in."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        source = ROOT / name
        if not name or not (source.exists() or source.is_symlink()):
            continue  # tracked, deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    venv = ROOT / ".venv" if (ROOT / ".venv").is_dir() else Path(sys.prefix)
    (dest / ".venv").symlink_to(venv)
    return dest


def shell_env(checkout: Path) -> dict[str, str]:
    """The environment a user's shell has: no LENS_* settings of this process; the checkout's code imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LENS_", "VIRTUAL_ENV", "PYTHON"))}
    env["PYTHONPATH"] = str(checkout)
    return env


class Sandbox:
    """A network namespace with only a loopback device and a tmpfs over /var/lib (where the agent and the
    aggregator keep their state by default), entered by every command run through ``prefix``. Without the
    privilege to make one, ``prefix`` is empty, ``port`` a free port of this host's loopback, and only the state
    directories that did not exist before are watched."""

    def __init__(self) -> None:
        self.holder: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []
        self.port = AGGREGATOR_PORT
        self.absent = [p for p in STATE_DIRS if not p.exists()]
        if shutil.which("unshare") and shutil.which("nsenter"):
            holder = subprocess.Popen(
                ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c",
                 "ip link set lo up && mount -t tmpfs lens-docs-var-lib /var/lib && echo ready && exec sleep 3600"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert holder.stdout is not None
            if holder.stdout.readline().strip() == b"ready":
                self.holder = holder
                self.prefix = ["nsenter", "-t", str(holder.pid), "-n", "-m"]
            else:
                holder.kill()
                holder.communicate()
        if self.holder is None:
            from .netproxy import free_port

            self.port = free_port()

    def isolated(self) -> bool:
        return self.holder is not None

    def wrap(self, argv: list[str], cwd: Path) -> list[str]:
        """``argv`` run inside the sandbox in ``cwd`` (entering a mount namespace moves to its root)."""
        return [*self.prefix, f"--wd={cwd}", "--", *argv] if self.prefix else argv

    def written_under_var_lib(self) -> list[str]:
        """What the commands wrote under /var/lib (the sandbox's tmpfs; without one, the state directories that
        appeared)."""
        if self.holder is None:
            return [str(p) for p in self.absent if p.exists()]
        done = subprocess.run(
            self.wrap(["find", "/var/lib", "-mindepth", "1"], Path("/")), capture_output=True, text=True
        )
        return done.stdout.split()

    def close(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.communicate()


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def run_script(script: str, cwd: Path, env: dict[str, str], box: Sandbox, timeout: float) -> Ran:
    """``bash -c script`` in the sandbox, in its own process group (killed whole on timeout)."""
    proc = subprocess.Popen(
        box.wrap(["bash", "-c", script], cwd),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        return Ran(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Ran(-9, out, err, timed_out=True)


HEADER = "".join(
    line + "\n"
    for line in (
        "set -eEo pipefail",
        "trap '__s=$?; echo \"__docs_failed_line=$LINENO status=$__s\" >&2' ERR",
        ". .venv/bin/activate",  # the one prefix docs/index.md documents
    )
)


def block_script(text: str) -> str:
    """The block as bash runs it, line for line after HEADER: each command marked ``# exit N`` must exit N."""
    lines = text.splitlines()
    for offset, _ in logical_lines(text):
        first = offset - 1
        last = first
        while lines[last].endswith("\\"):
            last += 1
        m = EXIT.search(lines[last])
        if m is None:
            continue
        want = m.group(1)
        lines[last] = (
            lines[last][: m.start()]
            + f' ; }} && __rc=0 || __rc=$?; [ "$__rc" = {want} ] || '
            + f'{{ echo "__docs_failed_line=$LINENO expected exit {want}, got $__rc" >&2; exit 97; }}'
        )
        lines[first] = "{ " + lines[first]
    return HEADER + "\n".join(lines) + "\n"


def failed_line(block: Block, stderr: str) -> int | None:
    """The block's line (offset from its fence) bash's ERR trap named, if it did."""
    m = re.findall(r"__docs_failed_line=(\d+)", stderr)
    return int(m[-1]) - HEADER.count("\n") if m else None


class Aggregator:
    """``lens-aggregator serve --db aggregator.db --port 8443`` in the checkout, inside the sandbox."""

    def __init__(self, checkout: Path, env: dict[str, str], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.log = (checkout / ".aggregator.log").open("w+")
        self.proc = subprocess.Popen(
            sandbox.wrap([str(checkout / ".venv/bin/lens-aggregator"), "serve",
                          "--db", AGGREGATOR_DB, "--port", str(sandbox.port)], checkout),
            cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True,
        )  # fmt: skip
        probe = (
            "import sys, urllib.request\n"
            f"urllib.request.urlopen('http://127.0.0.1:{sandbox.port}/api/v1/health', timeout=1).read()\n"
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the aggregator exited: {self.stderr()}")
            up = subprocess.run(sandbox.wrap([sys.executable, "-c", probe], checkout), capture_output=True, env=env)
            if up.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the aggregator did not answer within 60 s: {self.stderr()}")
            time.sleep(0.2)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    try:
        yield box
    finally:
        box.close()
