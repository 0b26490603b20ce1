"""A fast reader for the plain block YAML that bulk manifests are written in.

PyYAML, even with libyaml's parser, builds a Python event and two marks per token: reading
20,000 Services with their EndpointSlices takes seconds. Manifests of that size are generated
and use a small part of YAML: block mappings and sequences, plain and simply quoted scalars.
:func:`load_all` reads exactly that part, line by line, and returns ``None`` for anything else
(anchors, tags, flow collections, multi-line scalars, comments after a value, escapes,
duplicate keys, tabs, non-ASCII, syntax errors), so that the caller reads the text again with
PyYAML: results are the same, and so are error messages. Plain scalars are resolved by PyYAML's
own resolver and constructor (each distinct text once), so ``yes``, ``0x1F`` or ``~`` mean
what they mean there.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
from typing import Any

import yaml

# any character outside printable ASCII (tabs, CR, control characters, Unicode): PyYAML's path
_UNUSUAL = re.compile(r"[^\n\x20-\x7e]")
# a plain scalar may not start with an indicator; '-' alone or '- ' are sequence entries
_PLAIN_START = frozenset("-?:,[]{}#&*!|>'\"%@`")
# characters that could make a plain scalar something else (flow context, comments)
_PLAIN_BAD = re.compile(r"[\[\]{},#]|: |:$")


class _Everything:
    def __contains__(self, _: object) -> bool:
        return True


_EVERYTHING = _Everything()


class _Decline(Exception):
    """Not the simple subset: PyYAML reads this text."""


class _Scalars:
    """Plain scalars resolved and constructed by PyYAML's safe constructor, cached by text."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.cache: dict[str, Any] = {}
        resolvers = loader.yaml_implicit_resolvers
        # every implicit type's first characters, or every character if some type has none
        self.first: Any = resolvers if None not in resolvers else _EVERYTHING

    def plain(self, text: str) -> Any:
        try:
            return self.cache[text]
        except KeyError:
            pass
        if text[0] in _PLAIN_START or _PLAIN_BAD.search(text) or text != text.strip():
            raise _Decline
        loader = self.loader
        if text[0] not in self.first or text.count(".") > 1:
            # no implicit type starts with this character; or two dots, which no number has
            # (an address): a string, without PyYAML's regular expressions
            self.cache[text] = text
            return text
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        value = loader.construct_object(yaml.ScalarNode(tag, text), deep=True)
        if tag == "tag:yaml.org,2002:str" or value is None or isinstance(value, int | float):
            self.cache[text] = value  # immutable: safe to share between documents
        return value

    def token(self, text: str) -> Any:
        """A scalar written on one line: plain, 'single' or "double" quoted (no escapes)."""
        first = text[0]
        if first == '"':
            inner = text[1:-1]
            if len(text) < 2 or text[-1] != '"' or '"' in inner or "\\" in inner:
                raise _Decline
            return inner
        if first == "'":
            inner = text[1:-1]
            if len(text) < 2 or text[-1] != "'" or "'" in inner:
                raise _Decline
            return inner
        if text == "{}":
            return {}
        if text == "[]":
            return []
        return self.plain(text)


class _Reader:
    def __init__(self, lines: list[tuple[int, str]], scalars: _Scalars) -> None:
        self.lines = lines  # (indent, content) of one document, without blank/comment lines
        self.i = 0
        self.scalars = scalars

    def node(self, indent: int) -> Any:
        content = self.lines[self.i][1]
        if content == "-" or content.startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def after_block(self, indent: int) -> bool:
        """Whether another entry of the block at ``indent`` follows."""
        if self.i >= len(self.lines):
            return False
        next_indent = self.lines[self.i][0]
        if next_indent > indent:
            raise _Decline  # a continuation line or bad indentation
        return next_indent == indent

    def value_below(self, indent: int, sequence_here: bool) -> Any:
        """The value of ``key:`` or ``-`` with nothing after it: the block below, or null."""
        if self.i >= len(self.lines):
            return None
        next_indent, content = self.lines[self.i]
        if next_indent > indent:
            return self.node(next_indent)
        if sequence_here and next_indent == indent and (content == "-" or content[:2] == "- "):
            return self.sequence(indent)  # "key:" then "- item" at the key's own column
        return None

    def mapping(self, indent: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        lines = self.lines
        token = self.scalars.token
        while True:
            content = lines[self.i][1]
            if content.endswith(":"):
                key_text, rest = content[:-1], ""
            else:
                key_text, sep, rest = content.partition(": ")
                if not sep:
                    raise _Decline  # a scalar document, or not YAML this reader knows
                rest = rest.lstrip(" ")
            if not key_text or key_text[0] in "\"'{[":
                raise _Decline
            key = self.scalars.plain(key_text)
            if key in out or key == "<<" or isinstance(key, dict | list):
                raise _Decline  # a duplicate is an error, a merge key PyYAML's business
            self.i += 1
            if rest:
                if rest == "-" or rest.startswith("- "):
                    raise _Decline
                out[key] = token(rest)
            else:
                out[key] = self.value_below(indent, sequence_here=True)
            if not self.after_block(indent):
                return out
            content = lines[self.i][1]
            if content == "-" or content.startswith("- "):
                return out  # the parent's sequence at this column goes on

    def sequence(self, indent: int) -> list[Any]:
        out: list[Any] = []
        lines = self.lines
        while True:
            content = lines[self.i][1]
            if content == "-":
                self.i += 1
                out.append(self.value_below(indent, sequence_here=False))
            elif content.startswith("- "):
                rest = content[2:].lstrip(" ")
                column = indent + len(content) - len(rest)
                if rest == "-" or rest.startswith("- ") or ": " in rest or rest[-1] == ":":
                    lines[self.i] = (column, rest)  # a block that starts on the dash's line
                    out.append(self.node(column))
                else:
                    self.i += 1
                    out.append(self.scalars.token(rest))
            else:
                raise _Decline
            if not self.after_block(indent):
                return out
            content = lines[self.i][1]
            if not (content == "-" or content.startswith("- ")):
                return out  # the parent mapping's next key at this column


def load_all(text: str, loader: Any) -> list[Any] | None:
    """Every document of ``text``, or ``None`` when it is not plain block YAML.

    ``loader`` is a PyYAML loader instance whose resolver and constructor give plain scalars
    their meaning.
    """
    if _UNUSUAL.search(text):
        return None
    scalars = _Scalars(loader)
    documents: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    started = False  # an explicit "---" opened the current document
    for raw in text.split("\n"):
        content = raw.strip(" ")
        if not content or content[0] == "#":
            continue
        if raw[0] != " " and (raw.startswith("---") or raw.startswith("...")):
            if raw.rstrip(" ") != "---":
                return None  # content after the marker, document end markers, "----"
            if current or started:
                documents.append(current)
            current, started = [], True
            continue
        current.append((len(raw) - len(raw.lstrip(" ")), content))
    if current or started:
        documents.append(current)
    out: list[Any] = []
    try:
        for lines in documents:
            if not lines:
                out.append(None)
                continue
            if lines[0][0] != 0:
                return None
            reader = _Reader(lines, scalars)
            out.append(reader.node(0))
            if reader.i != len(lines):
                return None
    except (_Decline, IndexError, yaml.YAMLError, ValueError):
        return None
    return out


# below this, a second process costs about what it saves
SPLIT_MIN_BYTES = 2 << 20


def load_all_split(text: str, loader: Any) -> list[Any] | None:
    """:func:`load_all`, the second half of the documents read by a forked child meanwhile.

    Same result as :func:`load_all` exactly: the text is cut at a ``---`` line, which the
    reader treats as a document boundary wherever it is, and either half declining declines
    the whole. Only a process with no other thread forks (a thread could hold a lock the child
    would then wait on forever): the CLI, not the services.
    """
    cut = text.find("\n---\n", len(text) // 2)
    if (
        len(text) < SPLIT_MIN_BYTES
        or cut < 0
        or threading.active_count() > 1
        or (os.cpu_count() or 1) < 2
    ):
        return load_all(text, loader)
    first, second = text[: cut + 1], text[cut + 1 :]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its half, pickled (exact types, unlike JSON), and gone
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as out:
                out.write(pickle.dumps(load_all(second, loader), pickle.HIGHEST_PROTOCOL))
        finally:
            os._exit(0)  # no atexit handlers or buffer flushes of the parent's state
    os.close(write_end)
    try:
        head = load_all(first, loader)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
    finally:
        os.waitpid(pid, 0)
    tail: list[Any] | None = pickle.loads(data) if data else None  # the child's: trusted
    if head is None or tail is None:
        return None
    return head + tail
