"""The command lines the documentation shows, extracted from the Markdown (README.md, docs/,
examples/): ``$ membrane ...`` lines of fenced blocks (concrete commands, each with the exit
code the text promises) and ``membrane ...`` forms in inline code and usage tables (synopses
with placeholders). tests/unit/test_docs_commands.py checks that all of them parse;
tests/e2e/test_documented.py runs the concrete ones against a cluster."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(membrane [^`]+)`")
SHELL = frozenset({"|", "||", "&&", ";", "<"})


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    argv: list[str]  # after "membrane"
    exit_code: int = 0  # what the text shows for it (`$ echo $?` after it), else 0


def _files() -> list[Path]:
    found: list[Path] = []
    for source in SOURCES:
        found.extend(sorted(source.rglob("*.md")) if source.is_dir() else [source])
    return found


def concrete() -> list[Command]:
    """``$ membrane ...`` lines of fenced blocks, shell pipes cut off, in document order."""
    commands: list[Command] = []
    for path in _files():
        text = path.read_text()
        for block in FENCE.finditer(text):
            lines = block.group(1).splitlines()
            first_line = text[: block.start(1)].count("\n") + 1
            for index, line in enumerate(lines):
                if not line.startswith("$ membrane "):
                    continue
                words = shlex.split(line[2:], comments=True)
                # the shell's part ends the command: pipes, redirections, lists
                cut = [i for i, w in enumerate(words) if w in SHELL or w.startswith((">", "2>"))]
                words = words[: cut[0]] if cut else words
                code = 0
                rest = [x for x in lines[index + 1 :] if x.startswith("$ ")]
                if rest and rest[0] == "$ echo $?":
                    after = lines[lines.index(rest[0], index + 1) + 1]
                    code = int(after.strip())
                where = f"{path.relative_to(REPO)}:{first_line + index}"
                commands.append(Command(where, words[1:], code))
    return commands


def synopses() -> list[tuple[str, str]]:
    """(file:line, text after "membrane ") of every inline ``membrane ...`` form."""
    found = []
    for path in _files():
        text = path.read_text()
        for match in INLINE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            body = " ".join(match.group(1).split()[1:])
            found.append((f"{path.relative_to(REPO)}:{line}", body))
    return found
