"""The docs cannot rot: README.md and docs/ checked against the code.

Convention (docs/README.md says the same): a fenced block whose info string is `bash runnable` runs
offline in seconds on a tiny model; a plain `bash` block is a long run (a real model, a GPU, the network,
minutes) and is only read. No other shell info string (`sh`, `shell`, `console`) is allowed, so no shell
block escapes the choice. The checks:

- runnable blocks: each page's runnable blocks run in order under `bash -e -o pipefail`, in a fresh
  directory holding links to recipes/, tests/, bench/ and the three scripts, with HF_HUB_OFFLINE=1, one
  thread and a timeout, so that they write nothing into the repository. The README's tour runs by
  default; the guides' blocks are `slow` (about 10-40 s a page);
- CLI options: every `--option` of a command line that starts with `adapt <command>`,
  `python convert.py|finetune.py|sample.py`, `python -m adapt.demo|adapt.lm_eval_model` or
  `python bench/<script>.py` (in a code block or an inline code span) exists in that command's `--help`
  (a bench script's: its argparse definitions);
- every relative link and its #anchor resolves; every recipes/, bench/, tests/ or adapt/ path a page
  names exists (outputs under bench/out/ excepted); every `test_...` name it names is a test;
- the README starts with the two commands, the second being what CI runs, and stays under 250 lines.

Each checker is a function run on the real pages and, in the last tests, on pages with planted faults,
so that a checker that cannot find anything fails.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted([README, *(ROOT / "docs").rglob("*.md")])
RUNNABLE, LONG = "bash runnable", "bash"
SHELLS = {"sh", "shell", "console", "zsh", "bash"}  # first word of an info string that means a shell block
LINKED = ("recipes", "tests", "bench", "convert.py", "finetune.py", "sample.py")
BLOCK_TIMEOUT = 300
README_MAX_LINES = 250
CI_TEST_COMMAND = "python -m pytest"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    text: str


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`]*?)\s*$")


def parse(path: Path, text: str | None = None) -> tuple[list[Block], str]:
    """(fenced blocks, the prose outside them) of a Markdown file."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks, prose, i = [], [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, j = m.group(1), i + 1
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        blocks.append(Block(path, i + 1, m.group(2), "\n".join(lines[i + 1 : j])))
        prose.append("")
        i = j + 1
    return blocks, "\n".join(prose)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return path.name


# ----------------------------------------------------------------------------- block markers


def marker_faults(blocks: list[Block]) -> list[str]:
    """Shell blocks must say whether they run: `bash runnable` or `bash` (a long run)."""
    return [
        f"{rel(b.path)}:{b.line}: shell block marked {b.info!r}; use {RUNNABLE!r} or {LONG!r}"
        for b in blocks
        if b.info.split(" ")[0] in SHELLS and b.info not in (RUNNABLE, LONG)
    ]


def test_every_shell_block_is_marked_runnable_or_long() -> None:
    faults = [f for page in PAGES for f in marker_faults(parse(page)[0])]
    assert not faults, "\n".join(faults)


# ----------------------------------------------------------------------------- runnable blocks


def workspace(root: Path) -> Path:
    """A fresh directory where the blocks run: links to what they read, nothing of the repository to
    write into (outputs go to out/ here)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    return root


def block_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        COLUMNS="200",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("ADAPT_DEBUG", None)
    return env


def run_blocks(blocks: list[Block], cwd: Path, timeout: float = BLOCK_TIMEOUT) -> list[str]:
    """Run the runnable blocks in order in `cwd`; the failures (stopping at the first)."""
    for b in blocks:
        if b.info != RUNNABLE:
            continue
        try:
            proc = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", b.text],
                cwd=cwd,
                env=block_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return [f"{rel(b.path)}:{b.line}: runnable block ran past {timeout:.0f} s"]
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            return [f"{rel(b.path)}:{b.line}: runnable block exited {proc.returncode}:\n{tail}"]
    return []


def runnable_pages() -> list:
    pages = [p for p in PAGES if any(b.info == RUNNABLE for b in parse(p)[0])]
    return [pytest.param(p, id=rel(p), marks=() if p == README else pytest.mark.slow) for p in pages]


@pytest.mark.parametrize("page", runnable_pages())
def test_runnable_blocks_run(page: Path, tmp_path: Path) -> None:
    failures = run_blocks(parse(page)[0], workspace(tmp_path / "ws"))
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- CLI options

SCRIPTS = {"convert.py": "convert", "finetune.py": "finetune", "sample.py": "sample"}
MODULES = {"adapt.demo": "quickstart", "adapt.lm_eval_model": "lm-eval"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "!"}
OPTION = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


@functools.cache
def adapt_commands() -> tuple[str, ...]:
    import typer

    from adapt.cli import app

    return tuple(typer.main.get_command(app).commands)


@functools.cache
def help_options(command: str) -> frozenset[str]:
    """The options `--help` shows: `adapt [COMMAND] --help` (a wide terminal), or a bench script's
    argparse definitions (`bench/NAME.py`)."""
    if command.startswith("bench/"):
        tree = ast.parse((ROOT / command).read_text())
        return frozenset(
            arg.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            for arg in node.args
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")
        )
    from typer.testing import CliRunner

    from adapt.cli import app

    args = [*([] if command == "adapt" else [command]), "--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, (command, result.output)
    return frozenset(OPTION.findall(result.output))


def logical_lines(text: str) -> list[str]:
    """Lines joined across trailing backslashes and indented `[--option ...]` usage continuations."""
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if out and (out[-1].endswith("\\") or (line[:1].isspace() and stripped.startswith("["))):
            out[-1] = out[-1].rstrip("\\") + " " + stripped
        else:
            out.append(line)
    return out


def tokens_of(line: str) -> list[str]:
    """Shell words of a line; in usage brackets (`[--dtype auto|float32]`) `|` separates choices, not
    commands."""
    while True:
        unpiped = re.sub(r"\[[^\[\]|]*\|[^\[\]]*\]", lambda m: m.group(0).replace("|", "/"), line)
        if unpiped == line:
            break
        line = unpiped
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: fall back to words
        return line.split("#")[0].split()


def segments(tokens: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in SEPARATORS:
            out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


def option_name(token: str) -> str | None:
    token = token.lstrip("[").rstrip("],").split("=")[0]
    return token if OPTION.fullmatch(token) else None


def options_in(words: list[str]) -> list[str]:
    return [o for o in map(option_name, words) if o]


def commands_in(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """(command, the options given to it) for each adapt/script/bench command of a shell line."""
    found = []
    for seg in segments(tokens):
        words = [w for w in seg if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]  # env assignments
        if not words:
            continue
        head = words[0]
        if head == "adapt":
            rest, k = words[1:], 0
            while k < len(rest) and rest[k].startswith("-"):  # `adapt --debug COMMAND ...`
                k += 1
            found.append(("adapt", options_in(rest[:k])))
            if k < len(rest) and rest[k] in adapt_commands():
                found.append((rest[k], options_in(rest[k + 1 :])))
            continue
        if head not in ("python", "python3", "accelerate", "torchrun"):
            continue
        for i, w in enumerate(words):
            target = None
            if Path(w).name in SCRIPTS and not w.startswith("bench/"):
                target = SCRIPTS[Path(w).name]
            elif w.startswith("bench/") and w.endswith(".py"):
                target = w
            elif w == "-m" and i + 1 < len(words) and words[i + 1] in MODULES:
                target, i = MODULES[words[i + 1]], i + 1
            if target is not None:
                found.append((target, options_in(words[i + 1 :])))
                break
    return found


COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:adapt\s|python3?\s|accelerate\s)")


def command_lines(blocks: list[Block], prose: str) -> list[str]:
    """Shell lines of the code blocks (python, json and output blocks left out), and inline code spans
    that start with a command."""
    lines = [line for b in blocks if b.info.split(" ")[0] in SHELLS for line in logical_lines(b.text)]
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)
    return lines + [s for s in spans if COMMAND_START.match(s)]


def option_faults(path: Path, text: str | None = None) -> list[str]:
    blocks, prose = parse(path, text)
    faults = []
    for line in command_lines(blocks, prose):
        for command, options in commands_in(tokens_of(line)):
            if command.startswith("bench/") and not (ROOT / command).is_file():
                faults.append(f"{rel(path)}: {command} does not exist (in: {line.strip()})")
                continue
            known = help_options(command)
            faults += [
                f"{rel(path)}: `{command}` has no option {o} in its --help (in: {line.strip()})"
                for o in options
                if o not in known
            ]
    return faults


def test_every_option_named_exists_in_the_commands_help() -> None:
    faults = [f for page in PAGES for f in option_faults(page)]
    assert not faults, "\n".join(faults)


# ----------------------------------------------------------------------------- links, paths, names

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./~$-])((?:recipes|bench|tests|adapt)/[\w./*-]*)")
TEST_NAME = re.compile(r"^(test_\w+)(?:\[[^\]]*\])?$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in parse(path)[1].splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_faults(path: Path, text: str | None = None) -> list[str]:
    prose = parse(path, text)[1]
    faults = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            faults.append(f"{rel(path)}: link to {target}: {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            faults.append(f"{rel(path)}: link to {target}: no heading #{anchor} in {rel(dest)}")
    return faults


def path_faults(path: Path, text: str | None = None) -> list[str]:
    body = path.read_text() if text is None else text
    faults = []
    for name in sorted(set(PATH.findall(body))):
        name = name.rstrip(".")
        if name.startswith("bench/out/"):  # what bench scripts write
            continue
        if not glob.glob(str(ROOT / name)):
            faults.append(f"{rel(path)}: names {name}, which does not exist")
    return faults


@functools.cache
def defined_tests() -> frozenset[str]:
    names = set()
    for f in (ROOT / "tests").glob("*.py"):
        names |= set(re.findall(r"^\s*def (test_\w+)", f.read_text(), re.MULTILINE))
    return frozenset(names)


def named_test_faults(path: Path, text: str | None = None) -> list[str]:
    body = path.read_text() if text is None else text
    spans = re.findall(r"`([^`\n]+)`", body)
    named = {m.group(1) for s in spans if (m := TEST_NAME.match(s.strip()))}
    return [f"{rel(path)}: names the test {n}, which does not exist" for n in sorted(named - defined_tests())]


def test_links_resolve() -> None:
    faults = [f for page in PAGES for f in link_faults(page)]
    assert not faults, "\n".join(faults)


def test_named_paths_and_tests_exist() -> None:
    faults = [f for page in PAGES for f in path_faults(page) + named_test_faults(page)]
    assert not faults, "\n".join(faults)


# ----------------------------------------------------------------------------- the README


def readme_faults(text: str, ci: str) -> list[str]:
    faults = []
    blocks, _ = parse(README, text)
    first = [b.text.strip() for b in blocks[:2]]
    if len(first) < 2 or not (
        first[0].startswith("pip install") and first[0].endswith("python -m adapt.demo")
    ):
        faults.append("the README's first code block is not the install + `python -m adapt.demo` command")
    if len(first) < 2 or first[1] != CI_TEST_COMMAND:
        faults.append(f"the README's second code block is not `{CI_TEST_COMMAND}`")
    if CI_TEST_COMMAND not in [line.strip() for line in ci.splitlines()]:
        faults.append(f".ci/run does not run `{CI_TEST_COMMAND}`")
    if len(text.splitlines()) > README_MAX_LINES:
        faults.append(f"the README has {len(text.splitlines())} lines, more than {README_MAX_LINES}")
    return faults


def test_readme_starts_with_the_two_commands_and_stays_short() -> None:
    faults = readme_faults(README.read_text(), (ROOT / ".ci/run").read_text())
    assert not faults, "\n".join(faults)


# ----------------------------------------------------------------------------- the checkers can fail

PLANTED = """# A page with faults

See [a missing page](missing.md), [a missing heading](#nowhere) and [this one](#a-page-with-faults).
Train with `recipes/no_such_recipe.yaml`; `adapt sample CKPT --no-such-option 1` in prose; the test
`test_that_does_not_exist` proves nothing.

```sh
adapt convert A B [--dtype auto|float32]
                  [--no-such-flag]
```

```bash
python finetune.py recipes/adapt_text.yaml --print-config --not-an-option
python bench/block_speed.py --model M --no-such-bench-option
```

```bash runnable
echo ran > ran.txt
exit 3
```

```bash runnable
echo never > never.txt
```
"""


def test_the_checkers_catch_planted_faults(tmp_path: Path) -> None:
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(PLANTED)
    blocks, _ = parse(page)
    assert [b.info for b in blocks] == ["sh", "bash", RUNNABLE, RUNNABLE]

    assert len(marker_faults(blocks)) == 1

    links = link_faults(page)
    assert len(links) == 2 and "missing.md" in links[0] and "#nowhere" in links[1], links

    assert [f.split("names ")[1] for f in path_faults(page)] == [
        "recipes/no_such_recipe.yaml, which does not exist"
    ]
    assert named_test_faults(page) == [
        f"{rel(page)}: names the test test_that_does_not_exist, which does not exist"
    ]

    options = "\n".join(option_faults(page))
    for planted in ("--no-such-option", "--no-such-flag", "--not-an-option", "--no-such-bench-option"):
        assert planted in options, options
    for real in ("--print-config", "--model"):
        assert f"option {real} " not in options, options

    ws = workspace(tmp_path / "ws")
    failures = run_blocks(blocks, ws, timeout=30)
    assert len(failures) == 1 and "exited 3" in failures[0], failures
    assert (ws / "ran.txt").is_file() and not (ws / "never.txt").exists(), "runs in order, stops at a failure"


def test_the_readme_check_catches_a_readme_that_moved_its_commands() -> None:
    ci = (ROOT / ".ci/run").read_text()
    text = README.read_text()
    assert readme_faults(text, ci) == []
    moved = "# adapt\n\n```bash\nadapt sample X\n```\n\n" + text
    assert len(readme_faults(moved, ci)) == 2
    assert len(readme_faults(text + "\n" * README_MAX_LINES, ci)) == 1
    assert len(readme_faults(text, ci.replace(CI_TEST_COMMAND, "pytest -x"))) == 1
