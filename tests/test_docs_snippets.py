"""The README and docs/*.md cannot drift from the code: every Python snippet runs on the embedded models, every
`guidekit` command they show exists with the options they give, docs/cli.md lists every option of every
command, and every relative link and anchor resolves.

A Python block that cannot run here (it needs a Hub model, a GPU or a running server) is preceded by the
marker `<!-- not run: what it needs -->`; such a block must still compile and may use no name it does not
define or import. Any block without the marker is executed, in a fresh namespace, in an empty temporary
working directory, offline.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: Optional[str]  # the marker's reason, or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


#: Options every command takes, documented once at the top of the page rather than in each section.
COMMON_OPTIONS = ("--verbose",)

def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with the not-run marker that precedes it (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        start, body, i = i, [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        blocks.append(Block(path, start + 1, match["info"].lower(), "\n".join(body) + "\n",
                            marker["reason"] if marker else None))
        i += 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in fenced_blocks(path)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
RUN = [b for b in PYTHON if b.not_run is None]
# A snippet shown on two pages (the README's quick start and its method's page) runs once.
UNIQUE_RUN = list({b.code: b for b in reversed(RUN)}.values())[::-1]
NOT_RUN_BLOCKS = [b for b in PYTHON if b.not_run is not None]


def undefined_names(code: str) -> list[str]:
    """Names a snippet reads but never binds (imports, assignments, definitions, arguments): a missing import
    shows here without running the code. Scopes are not told apart, which only makes the check lenient."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(used - bound)


# ---------------------------------------------------------------------------------------------- Python snippets

def test_the_docs_have_python_snippets_and_the_readme_runs_all_of_its_own():
    readme = [b for b in PYTHON if b.path.name == "README.md"]
    assert len(readme) >= 5, "the README's quick start should show each method in Python"
    assert not [b.where for b in readme if b.not_run], "the README's snippets must run on the embedded models"
    assert len(RUN) > len(NOT_RUN_BLOCKS), "most snippets should run on the embedded models"


def test_not_run_markers_sit_on_python_blocks_and_say_why():
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not NOT_RUN.match(line.strip()):
                continue
            following = next((l.strip() for l in lines[number:] if l.strip()), "")
            assert following.startswith("```python"), f"{path.name}:{number}: a not-run marker must precede a ```python block"
    for block in NOT_RUN_BLOCKS:
        assert len(block.not_run.split()) >= 2, f"{block.where}: say what the block needs, e.g. 'needs the Hub model X'"


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=[b.where for b in NOT_RUN_BLOCKS])
def test_a_snippet_that_cannot_run_here_still_compiles_and_imports_what_it_uses(block):
    compile(block.code, block.where, "exec")
    assert undefined_names(block.code) == [], f"{block.where} uses names it never defines or imports"


@pytest.mark.parametrize("block", UNIQUE_RUN, ids=[b.where for b in UNIQUE_RUN])
def test_snippet_runs(block, tmp_path, monkeypatch, pipeline_calls):
    import torch

    import guidekit.toy

    assert os.environ.get("HF_HUB_OFFLINE") == "1", "snippets must run offline (tests/conftest.py sets it)"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    start = time.process_time()
    try:
        exec(compile(block.code, block.where, "exec"), {"__name__": "__snippet__"})
    finally:
        torch.set_num_threads(threads)
    # CI has two cores: the whole file should stay well under two minutes, so each snippet must be cheap. CPU
    # time, not wall time, so that a busy machine does not fail it.
    spent = time.process_time() - start
    assert spent < 20, f"{block.where} took {spent:.0f} s of CPU time; a docs snippet should take a few (fewer steps)"

    # Classifier guidance on the embedded model draws a mess with the model's own deterministic sampler: a snippet
    # must sample it with the recommended one, and the README's, which newcomers copy, with its steps too.
    sampler = guidekit.toy.RECOMMENDED_ELUCD_SAMPLER
    embedded = Path(guidekit.toy.default_model_path()).resolve()
    for call in pipeline_calls:
        steered = [h for h in call["hooks"] if type(h).__name__ in {"EluCD", "ClassifierGuidance"}]
        if not steered or Path(call["pipe"].config._name_or_path).resolve() != embedded:
            continue
        assert call["scheduler"].lower().startswith(sampler["scheduler"]), (
            f"{block.where}: classifier guidance on the embedded model with {call['scheduler']}; sample it with "
            f"guidekit.toy.RECOMMENDED_ELUCD_SAMPLER ({sampler})")
        if block.path.name == "README.md":
            assert call["steps"] == sampler["steps"], f"{block.where}: use the recommended {sampler['steps']} steps"


# --------------------------------------------------------------------------------------------- shell commands

def _commands():
    """The CLI's commands by name, and by the module `python -m` runs them as."""
    import click

    from guidekit.apps.cli import SUBCOMMANDS, main

    ctx = click.Context(main)
    names = main.list_commands(ctx)
    return {name: main.get_command(ctx, name) for name in names}, {
        target.split(":")[0]: name for name, target in SUBCOMMANDS.items()}


def shell_invocations(text: str) -> list[list[str]]:
    """The words after each `guidekit` (or `-m guidekit.apps.X`) invocation in shell text, one list per command."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in a prose fragment: read it word by word
            words = line.split()
        for k, word in enumerate(words):
            if word == "guidekit" or (word == "-m" and k + 1 < len(words) and words[k + 1].startswith("guidekit.apps.")):
                rest = words[k + 1:]
                end = next((j for j, w in enumerate(rest) if w in {"&&", "||", ";", "|", "&"}), len(rest))
                found.append(([word] if word == "-m" else []) + rest[:end])
    return found


def _inline_invocations(text: str) -> list[str]:
    return [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith("guidekit ")]


def _check_invocation(words: list[str], commands: dict, modules: dict, where: str) -> None:
    if words and words[0] == "-m":
        module = words[1]
        assert module in modules, f"{where}: python -m {module} is not a guidekit command module"
        command = commands[modules[module]]
        words = words[2:]
    else:
        words = list(words)
        while words and words[0] in COMMON_OPTIONS:  # group options before the command: `guidekit --verbose generate`
            words = words[1:]
        if not words or words[0] in {"--help", "-h", "--version"} or words[0].isupper():
            return  # `guidekit --help`, or a placeholder such as `guidekit COMMAND --help`
        assert words[0] in commands, f"{where}: `guidekit {words[0]}` is not a command; accepted: {sorted(commands)}"
        command = commands[words[0]]
        words = words[1:]
    options = {"--help", "-h", *COMMON_OPTIONS}
    for param in command.params:
        options.update(getattr(param, "opts", []))
        options.update(getattr(param, "secondary_opts", []))
    for word in words:
        word = word.strip("[]")
        if word.startswith("--"):
            name = word.split("=")[0]
            assert name in options, f"{where}: guidekit {command.name} has no option {name}"


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_guidekit_command_shown_exists_with_its_options(path):
    commands, modules = _commands()
    text = path.read_text(encoding="utf-8")
    for block in fenced_blocks(path):
        if block.lang in SHELL_LANGS:
            for words in shell_invocations(block.code):
                _check_invocation(words, commands, modules, block.where)
    prose = "\n".join(line for line in _outside_fences(text))
    for span in _inline_invocations(prose):
        for words in shell_invocations(span):
            _check_invocation(words, commands, modules, f"{path.name}: `{span}`")


def _outside_fences(text: str):
    inside = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and inside is None:
            inside = match["fence"]
        elif inside is not None and line.strip().startswith(inside) and line.strip().strip(inside[0]) == "":
            inside = None
        elif inside is None:
            yield line


def test_the_cli_page_lists_every_command_and_option():
    commands, _ = _commands()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)
    for opt in COMMON_OPTIONS:
        assert f"`{opt}`" in sections[0], f"docs/cli.md: the introduction does not mention {opt}"
    for name, command in commands.items():
        section = next((s for s in sections if s.startswith(f"`guidekit {name}`")), None)
        assert section is not None, f"docs/cli.md has no section '## `guidekit {name}`'"
        for param in command.params:
            for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                if opt.startswith("--") and opt not in ("--help", *COMMON_OPTIONS):
                    assert f"`{opt}" in section, f"docs/cli.md: guidekit {name}'s section does not mention {opt}"


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_line = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    readme = [b.code.strip() for b in fenced_blocks(ROOT / "README.md") if b.lang in SHELL_LANGS]
    installs = [c for c in readme if c.startswith("python3 -m venv") and "pytest" in c]
    assert len(installs) == 1, "the README shows one command that installs and runs the tests"

    def words(command):  # pip's and pytest's verbosity flags do not change what runs
        return [w for w in shlex.split(command) if w not in {"-q", "-rs"}]

    assert words(installs[0]) == words(ci_line)
    generate = [c for c in readme if c.startswith("python3 -m venv") and "pip install . &&" in c and "guidekit generate" in c]
    assert generate, "the README shows one command that installs guidekit and runs `guidekit generate`"


def test_the_batch_page_shows_the_shipped_example_job_file():
    example = (ROOT / "assets" / "examples" / "jobs.jsonl").read_text(encoding="utf-8")
    shown = [b.code for b in fenced_blocks(ROOT / "docs" / "batch.md") if b.lang in {"json", "jsonl"}]
    assert example in shown, "docs/batch.md should show assets/examples/jobs.jsonl as it is"


# ------------------------------------------------------------------------------------------------------ links

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen, anchors = {}, set()
    for line in _outside_fences(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if match:
            slug = _slug(match[1])
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


# Pages that another change adds; a link to one of them is checked once it exists.
PENDING = {ROOT / "docs" / "style-task.md"}


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_and_anchors_resolve(path):
    text = "\n".join(_outside_fences(path.read_text(encoding="utf-8")))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if resolved in PENDING and not resolved.exists():
            continue
        assert resolved.exists(), f"{path.name}: link to {target} does not resolve"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{path.name}: link to {target}: no such heading"
