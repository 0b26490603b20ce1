"""The command reference in docs/cli.md, rendered from the parser itself so that it lists
every command and option; a unit test fails when the committed text and the parser disagree.

    python -m membrane.clidoc      # rewrites the generated part of docs/cli.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from membrane.cli import GLOBAL_OPTIONS, build_parser

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
BEGIN = "<!-- BEGIN GENERATED: python -m membrane.clidoc -->"
END = "<!-- END GENERATED -->"
GLOBAL_FLAGS = {flag for flag, _ in GLOBAL_OPTIONS} | {"-h", "--help"}


def _commands(
    parser: argparse.ArgumentParser, path: list[str]
) -> list[tuple[list[str], str, argparse.ArgumentParser]]:
    """(words, help, parser) of every command with an action, depth first, in parser order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                if name not in helps:
                    continue  # an alias
                words = [*path, name]
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    found.extend(_commands(child, words))
                else:
                    found.append((words, helps[name], child))
    return found


def _option(action: argparse.Action) -> str:
    names = (
        ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
    )
    if action.option_strings and action.nargs != 0:
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}"
            if action.choices
            else action.dest.upper()
        )
        names += f" `{metavar}`"
    return names


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%").replace("|", "\\|")
    if action.choices and action.option_strings and action.default not in (None, False):
        text += f" (default {action.default})"
    return re.sub(r"\s+", " ", text).strip() or "-"


def render(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser(run_flags=False)
    lines = [BEGIN, ""]
    for words, help_text, child in _commands(parser, []):
        lines.append(f"### `membrane {' '.join(words)}`")
        lines.append("")
        if help_text:
            lines.append(help_text[0].upper() + help_text[1:] + ".")
            lines.append("")
        rows = [
            a
            for a in child._actions
            if a.help != argparse.SUPPRESS and not (set(a.option_strings) & GLOBAL_FLAGS)
        ]
        if rows:
            lines += ["| argument | meaning |", "|---|---|"]
            lines += [f"| {_option(a)} | {_help(a)} |" for a in rows]
            lines.append("")
    lines.append(END)
    return "\n".join(lines)


def refreshed(text: str) -> str:
    """``text`` (docs/cli.md) with its generated part rendered anew."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + render() + tail


def main() -> int:
    DOC.write_text(refreshed(DOC.read_text()))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
