"""The shell commands the docs show, as the test suite runs them (``tests/test_docs_commands.py``).

A command is a line of a fenced block whose language is ``bash``/``sh``/``shell``/``console`` (a ``$ `` prompt is
dropped), or a ``$ ``-prompted line of an unlabelled block (a transcript: the lines after it are its output).
Lines ending in ``\\`` continue on the next. Comment-only lines are not commands.

A command that cannot run on a CPU machine says so in its trailing comment with a tag from :data:`NEEDS`, e.g.
``ray up cluster/aws-gpu.yaml   # [needs a cloud account]``; the suite lists it as skipped with that reason. Any
other tag is an error, so the docs cannot excuse a command the suite could run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The documents whose commands users copy; a new command in any of them is picked up by the suite.
DOC_FILES = ("README.md", "cluster/README.md")
# What a command may need that a CPU test machine does not have.
NEEDS = ("GPU", "a cloud account", "docker", "kubectl", "your cluster")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
_TAG = re.compile(r"\[needs ([^\]]+)\]")
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository root
    line: int  # 1-based line of the command's first line
    block: int  # 1-based line of the block's opening fence
    text: str  # the command as a shell reads it (continuations kept)
    needs: str | None  # the reason it cannot run here, from its [needs ...] tag

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _needs(text: str, where: str) -> str | None:
    tags = _TAG.findall(text)
    for tag in tags:
        if tag not in NEEDS:
            raise ValueError(f"{where}: unknown tag [needs {tag}] (allowed: {', '.join(NEEDS)})")
    return tags[0] if tags else None


def _commands_in_block(lines: list[tuple[int, str]], lang: str, file: str, block: int) -> list[DocCommand]:
    out: list[DocCommand] = []
    shell = lang in SHELL_LANGS
    i = 0
    while i < len(lines):
        number, raw = lines[i]
        text = raw.strip()
        i += 1
        prompted = text.startswith("$ ")
        if prompted:
            text = text[2:]
        elif not shell or not text or text.startswith("#"):
            continue
        parts = [text]
        while parts[-1].endswith("\\") and i < len(lines):
            parts.append(lines[i][1].rstrip())
            i += 1
        full = "\n".join(parts)
        out.append(DocCommand(file, number, block, full, _needs(full, f"{file}:{number}")))
    return out


def extract(path: Path, root: Path = ROOT) -> list[DocCommand]:
    """Every command of one markdown file, in order."""
    rel = str(path.relative_to(root)) if path.is_absolute() else str(path)
    out: list[DocCommand] = []
    fence, lang, start, body = None, "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence, lang, start, body = m.group(2), m.group(3).lower(), number, []
        elif fence is not None and line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
            out += _commands_in_block(body, lang, rel, start)
            fence = None
        elif fence is not None:
            body.append((number, line))
    return out


def all_commands(root: Path = ROOT) -> list[DocCommand]:
    return [c for name in DOC_FILES for c in extract(root / name, root)]


def blocks(commands: list[DocCommand]) -> dict[tuple[str, int], list[DocCommand]]:
    """Commands grouped by fenced block, in order: one block runs in one shell (its ``export``\\ s carry)."""
    out: dict[tuple[str, int], list[DocCommand]] = {}
    for c in commands:
        out.setdefault((c.file, c.block), []).append(c)
    return out


def block_script(commands: list[DocCommand]) -> str:
    """A bash script running ``commands`` in order in one shell; the first failure prints ``DOC-FAILED file:line``
    and stops. Skipped commands (``needs``) are left out."""
    lines = ["set -o pipefail"]
    for c in commands:
        if c.needs:
            continue
        lines += [f"echo 'DOC-RUN {c.where} at '$EPOCHREALTIME >&2", c.text,  # when: the log says where time went
                  f"rc=$?; if [ $rc -ne 0 ]; then echo 'DOC-FAILED {c.where} (exit '$rc')' >&2; exit 97; fi"]
    return "\n".join(lines) + "\n"
