"""Every ``membrane ...`` the documentation shows parses: concrete command lines completely,
synopses (``membrane pod list [-n NS | -A] [-o json]``) down to their subcommand and flags."""

from __future__ import annotations

import argparse
import re

import pytest

from membrane import clidoc
from membrane.cli import build_parser
from tests.documented import concrete, synopses

PARSER = build_parser(run_flags=True)
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    children = _children(parser)
    if not children:
        return [parser]
    return [leaf for child in children.values() for leaf in _leaves(child)]


def _expand(text: str) -> list[str]:
    """Tokens of a synopsis: ``--[from-|to-]pod`` -> --pod --from-pod --to-pod; brackets and
    alternatives' bars become spaces."""
    text = text.replace("\\|", "|")
    text = re.sub(
        r"--\[([^\]]+)\]([\w-]+)",
        lambda m: " ".join(
            [f"--{m.group(2)}", *(f"--{p}{m.group(2)}" for p in m.group(1).split("|"))]
        ),
        text,
    )
    return [t for t in re.split(r"[\s\[\]()]+", text) if t]


def check_synopsis(text: str) -> None:
    tokens = _expand(text)
    parsers = [PARSER]
    while tokens and _children(parsers[0]):
        word = tokens[0]
        if word.startswith("-"):
            break
        choices = [_children(p) for p in parsers]
        alternatives = [w for w in word.split("|") if w]
        if all(w.isupper() or w in ("...",) for w in alternatives):  # SERVICE, MAP: any child
            parsers = [leaf for p in parsers for leaf in _leaves(p)]
            tokens.pop(0)
            break
        for w in alternatives:
            assert all(w in c for c in choices), f"no command {w!r} (known: {sorted(choices[0])})"
        parsers = [c[w] for c in choices for w in alternatives]
        tokens.pop(0)
        if any(tok.startswith("|") for tok in tokens[:1]):
            tokens.pop(0)
    for token in tokens:
        for part in token.split("|"):
            flag = FLAG.match(part)
            if flag and flag.group(0) not in ("-",):
                known = [p for p in parsers if flag.group(0) in p._option_string_actions]
                assert known, f"flag {flag.group(0)} is not an option of `membrane {text}`"


@pytest.mark.parametrize(("where", "text"), synopses(), ids=lambda v: str(v)[:60])
def test_documented_synopses_exist(where: str, text: str) -> None:
    check_synopsis(text)


@pytest.mark.parametrize("command", concrete(), ids=lambda c: c.where)
def test_documented_commands_parse(command: object) -> None:
    args = PARSER.parse_args(command.argv)  # type: ignore[attr-defined]
    assert callable(args.func)


def test_there_are_documented_commands() -> None:
    assert len(concrete()) >= 20 and len(synopses()) >= 40


def test_the_reference_in_docs_cli_md_is_up_to_date() -> None:
    committed = clidoc.DOC.read_text()
    assert committed == clidoc.refreshed(committed), (
        "docs/cli.md's reference is out of date: run `python -m membrane.clidoc`"
    )
