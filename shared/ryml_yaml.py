"""Bulk manifests read by rapidyaml (a maintained C++ YAML parser), with PyYAML's meaning.

rapidyaml parses the text and emits it as JSON in C++, msgspec decodes the JSON in C: 9 MB of
Services and EndpointSlices in a fraction of PyYAML's time (even with libyaml). JSON is not how
PyYAML reads YAML, so the result is used only where it is PyYAML's (kube_yaml's reading:
YAML 1.1 scalars, timestamps as strings, duplicate keys an error); :func:`load_all` returns
``None`` otherwise and the caller reads the text with PyYAML, which also gives the errors:

- anchors, aliases, tags, merge keys and directives (rapidyaml emits an alias as its text):
  declined on sight;
- a plain scalar PyYAML gives a type JSON does not (``yes``, ``~``, ``0x1F``, ``1_000``, ``.inf``,
  ``1:20``, ``True``, a number as a key): every distinct string of the result that PyYAML would
  type when plain is looked for unquoted in the text;
- a number with an exponent (JSON's float, YAML 1.1's string unless it has a dot and a sign);
- a duplicate key (JSON keeps the last): the keys emitted against the keys decoded.

``tests/unit/test_ryml_yaml.py`` compares both readers on every manifest of the repository and
on the cases above.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import msgspec
import yaml

try:
    import ryml
except ImportError:  # no wheel for this platform: PyYAML reads everything
    ryml = None

# an anchor, alias or tag where a token starts, an indicator PyYAML refuses to start a plain
# scalar with, a merge key, a complex key (a directive: "%" at the start of a line)
_DECLINED = re.compile(r"[&*!%@`]|<<|\? ")
# a bare JSON number with an exponent (only looked for when the result has a float)
_EXPONENT = re.compile(r"(?:: |[\[,\n] *)[-+]?[0-9.]+[eE]")
_STR = "tag:yaml.org,2002:str"


class _Decline(Exception):
    pass


def load_all(text: str, loader: Any) -> list[Any] | None:
    """Every document of ``text`` as PyYAML reads it with ``loader`` (an instance whose
    resolver and constructor give plain scalars their meaning), or ``None``: PyYAML's to read."""
    if ryml is None or _declined(text):
        return None
    try:
        with _quiet():
            tree = ryml.parse_in_arena(text.encode())
        root = tree.root_id()
        emitted = ryml.emit_json_malloc(tree, root)
        if emitted is None:  # nothing but comments and blank lines
            return []
        decoded = msgspec.json.decode(emitted)
        docs: list[Any] = decoded if tree.is_stream(root) else [decoded]
        keys, values, floats = _strings(docs)
        if floats and _EXPONENT.search(emitted):
            return None
        if len(keys) != emitted.count('": '):
            return None  # a duplicate key (or a value with '": ' in it: PyYAML's anyway)
        _check(text, set(keys), loader, as_key=True)
        _check(text, values, loader, as_key=False)
    except (_Decline, msgspec.DecodeError, RuntimeError, ValueError, yaml.YAMLError):
        return None
    except Exception as exc:  # rapidyaml's parse errors
        if ryml is not None and isinstance(exc, ryml.ExceptionParse | ryml.ExceptionBasic):
            return None
        raise
    return docs


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """rapidyaml writes a parse error to fd 2 before raising it: PyYAML reads the text again
    and says what is wrong, so that message is not the user's to see."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _declined(text: str) -> bool:
    if not any(indicator in text for indicator in ("&", "*", "!", "%", "@", "`", "<<", "? ")):
        return False  # substring searches: far faster than the expression on 9 MB
    for m in _DECLINED.finditer(text):
        start = m.start()
        line = text[text.rfind("\n", 0, start) + 1 : start]
        if line.lstrip().startswith("#"):
            continue  # in a comment line: no matter
        token = m.group()
        if token == "<<" or (
            line[-1:] in ("", " ", "\t", "[", "{", ",", ":", "-")
            and (token != "? " or not line.strip())  # "? " only as a complex key
        ):
            return True
    return False


def _strings(docs: list[Any]) -> tuple[list[str], set[str], bool]:
    """Every key (a list: duplicates count), the distinct string values of ``docs``, and
    whether there is a float."""
    keys: list[str] = []
    values: set[str] = set()
    floats = False
    add = values.add
    stack = list(docs)
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is dict:
            keys.extend(node)
            items = node.values()
        elif kind is list:
            items = node
        else:
            if kind is str:
                add(node)
            floats = floats or kind is float
            continue
        for v in items:
            t = type(v)
            if t is str:
                add(v)
            elif t is dict or t is list:
                stack.append(v)
            elif t is float:
                floats = True
    return keys, values, floats


def _check(text: str, strings: set[str], loader: Any, *, as_key: bool) -> None:
    """Decline when a string of the result could have been a plain scalar that PyYAML gives
    another type (JSON made it a string): when the text has it unquoted."""
    first = loader.yaml_implicit_resolvers
    for s in strings:
        if not s or (s[0] not in first and None not in first) or s.count(".") > 1:
            continue  # no implicit type starts with that character; two dots: no number
        if loader.resolve(yaml.ScalarNode, s, (True, False)) == _STR:
            continue
        if not as_key and not _emitted_as_string(s):
            continue  # rapidyaml gives this one plain as a bare number or literal, not a string
        if _unquoted(text, s):
            raise _Decline


def _unquoted(text: str, s: str) -> bool:
    for m in re.finditer(re.escape(s), text):
        start, end = m.start(), m.end()
        before = text[start - 1] if start else "\n"
        after = text[end] if end < len(text) else "\n"
        if before in "\"'" and after == before:
            continue
        if before in " \t\n[{,:-" and after in " \t\r\n]},:#":
            return True
    return False


@lru_cache(maxsize=4096)
def _emitted_as_string(s: str) -> bool:
    try:
        with _quiet():
            tree = ryml.parse_in_arena(f"a: {s}\n".encode())
        return str(ryml.emit_json_malloc(tree, tree.root_id())).startswith('{\n  "a": "')
    except Exception:  # rapidyaml's parse errors: assume the worst
        return True
