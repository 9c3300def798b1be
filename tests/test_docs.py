"""Every page of docs/ and packaging/README.md runs as a user pastes it (the conventions of docs/index.md).

Each page's ```sh blocks run in order with bash in a scratch copy of this checkout (the files git tracks, ``.venv``
linked), after the one documented prefix ``. .venv/bin/activate``, in a network namespace of their own with only a
loopback device and a tmpfs over /var/lib: a block that reaches the network fails, and one that writes where the
agent or the aggregator keeps an installed machine's state (/var/lib/lens-agent, /var/lib/lens-aggregator) fails
its page. A block marked ``<!-- not run: REASON -->`` is not run, and like every other command in the docs — the
inline ``lens-agent …`` / ``lens-aggregator …`` spans too — is checked against the click command trees: its
subcommands and options exist. Only exit statuses are checked (``# exit N`` where it is not 0), never output text.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import click
import pytest

from .doc_blocks import (
    AGGREGATOR_PORT,
    COMMAND_LINE,
    ROOT,
    Aggregator,
    Block,
    block_script,
    blocks,
    check_block,
    check_invocation,
    command_trees,
    failed_line,
    invocations,
    run_script,
    sandbox,
    scratch_checkout,
    shell_env,
)

PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "packaging" / "README.md"]
PAGE_SECONDS = 120  # a page's blocks together, at most (a busy 2-core machine; they take a few seconds each)
KNOWN_NEEDS = {"aggregator"}


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang == "sh" and b.not_run is None]


@pytest.fixture(scope="module")
def trees() -> dict[str, click.Group]:
    return command_trees()


def test_the_conventions_are_documented_and_linked() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    assert ". .venv/bin/activate" in index and "<!-- not run:" in index and "<!-- run with: aggregator -->" in index
    assert "# exit" in index
    assert "docs/index.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_commands_are_in_sh_blocks_with_known_markers(path: Path) -> None:
    for block in blocks(path):
        if block.lang != "sh":
            assert not COMMAND_LINE.search(block.text), (
                f"{block.where()}: a command in a ```{block.lang} block: commands go in ```sh blocks (docs/index.md)"
            )
            assert block.not_run is None and block.needs is None, f"{block.where()}: a marker on a non-sh block"
        assert block.needs is None or block.needs in KNOWN_NEEDS, f"{block.where()}: unknown 'run with: {block.needs}'"
        assert block.not_run is None or block.not_run.strip(), f"{block.where()}: 'not run:' without a reason"
        for named in re.findall(r"(?:tests|packaging|bench)/[\w./-]+\.(?:py|sh)", block.not_run or ""):
            assert (ROOT / named).is_file(), f"{block.where()}: the reason names {named}, which does not exist"
        if block.lang == "sh":
            syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
            assert syntax.returncode == 0, f"{block.where()}: not valid shell: {syntax.stderr}"


@pytest.mark.parametrize("path", [*PAGES, ROOT / "README.md"], ids=page_id)
def test_every_command_parses(path: Path, trees: dict[str, click.Group]) -> None:
    """The blocks' commands and the inline spans name subcommands and options that exist."""
    problems = [p for b in blocks(path) if b.lang == "sh" for p in check_block(b, trees)]
    text = path.read_text()
    for m in re.finditer(r"`((?:\.venv/bin/)?lens-(?:agent|aggregator)(?: [^`\n]*)?)`", text):
        for program, args in invocations(m.group(1)):
            why = check_invocation(program, args, trees)
            if why:
                problems.append(f"{page_id(path)}:{text.count(chr(10), 0, m.start()) + 1}: {why}\n    {m.group(1)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [*PAGES, ROOT / "README.md"], ids=page_id)
def test_the_configs_named_are_shipped(path: Path) -> None:
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    for named in re.findall(r"configs/[\w./-]*\w", path.read_text()):
        assert named in tracked or any(f.startswith(named + "/") for f in tracked), f"{page_id(path)}: {named}"


def test_the_static_check_finds_what_does_not_parse(trees: dict[str, click.Group]) -> None:
    assert check_invocation("lens-agent", ["bench", "--runs", "1"], trees) is None
    assert check_invocation("lens-agent", ["outbox", "retry", "[SEQ", "...]", "[--code", "CODE]"], trees) is None
    assert "no option '--rnus'" in str(check_invocation("lens-agent", ["bench", "--rnus", "1"], trees))
    assert "no command 'tnue'" in str(check_invocation("lens-agent", ["tnue", "run"], trees))
    assert invocations("sudo -u x lens-aggregator token add D > D.token && .venv/bin/lens-agent sync | jq .") == [
        ("lens-aggregator", ["token", "add", "D"]),
        ("lens-agent", ["sync"]),
    ]


def test_a_marked_exit_status_is_held_to() -> None:
    script = block_script("true\nfalse   # exit 1: expected\n(exit 3)   # exit 2\necho never\n")
    done = subprocess.run(["bash", "-c", script.replace(". .venv/bin/activate\n", ":\n")], capture_output=True)
    assert done.returncode == 97 and b"expected exit 2, got 3" in done.stderr and b"never" not in done.stdout


PAGES_THAT_RUN = [p for p in PAGES if runnable(p)]


def test_pages_with_commands_run_them() -> None:
    """The pages whose commands a user can paste on this machine: each has a block that is run here."""
    names = {page_id(p) for p in PAGES_THAT_RUN}
    assert {"docs/service.md", "docs/tuning.md", "docs/feedback.md", "docs/campaigns.md"} <= names, names


@pytest.mark.parametrize("path", PAGES_THAT_RUN, ids=page_id)
def test_page_runs_as_written(path: Path, tmp_path: Path, tiny_model: Path) -> None:
    checkout = scratch_checkout(tmp_path / "checkout")
    # the agent's model: the tiny generated one instead of the bundled SmolLM2, through the documented override
    env = {**shell_env(checkout), "LENS_MODEL_PATH": str(tiny_model)}
    deadline = time.monotonic() + PAGE_SECONDS
    with sandbox() as box:
        aggregator: Aggregator | None = None
        try:
            for block in runnable(path):
                if block.needs == "aggregator" and aggregator is None:
                    aggregator = Aggregator(checkout, env, box)
                text = block.text
                if not box.isolated():  # the host's loopback: the recipe's port may be taken
                    text = text.replace(str(AGGREGATOR_PORT), str(box.port))
                ran = run_script(block_script(text), checkout, env, box, deadline - time.monotonic())
                if ran.timed_out or ran.returncode != 0 or "Traceback" in ran.stderr:
                    offset = failed_line(block, ran.stderr)
                    lines = block.text.splitlines()
                    command = lines[offset - 1] if offset and 0 < offset <= len(lines) else block.text
                    why = f"timed out (the page's {PAGE_SECONDS} s)" if ran.timed_out else f"exit {ran.returncode}"
                    log = f"\naggregator log:\n{aggregator.stderr()[-2000:]}" if aggregator else ""
                    pytest.fail(
                        f"{block.where(offset or 0)}: {why}: {command.strip()}\n"
                        f"stdout:\n{ran.stdout[-4000:]}\nstderr:\n{ran.stderr[-4000:]}{log}"
                    )
        finally:
            if aggregator is not None:
                aggregator.stop()
        written = box.written_under_var_lib()
        assert not written, f"{page_id(path)}: its commands wrote under /var/lib: {written}"
