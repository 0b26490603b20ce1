"""Multi-document YAML read the way kubectl reads it, for every consumer of manifests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode
from yaml.reader import ReaderError

from shared import gcpause, ryml_yaml
from shared.errors import InvalidArgument


class _KubeReading:
    """Safe YAML read the way kubectl reads it: timestamps stay strings, duplicate keys fail.

    kubectl converts YAML to JSON, where a timestamp is a string; a bare ``datetime`` in a
    routed body would not survive the trip to its service. A duplicate key is an error there
    too, rather than a silent last-one-wins.
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)  # type: ignore[attr-defined]
            if key in seen:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc, no-any-return]


class _Loader(_KubeReading, yaml.SafeLoader):
    pass


_CLoader: Any = None
if hasattr(yaml, "CSafeLoader"):  # PyYAML built with libyaml

    class _CLoaderImpl(_KubeReading, yaml.CSafeLoader):
        pass

    _CLoader = _CLoaderImpl


def load_all(
    text: str,
    source: str,
    error: Callable[[str], Exception] = InvalidArgument,
    *,
    bulk: bool = False,
) -> list[Any]:
    """Every document of ``text``; a syntax error is ``error(message)`` naming ``source``.
    ``bulk``: a piece of a large file (rapidyaml whatever its size)."""
    with gcpause.paused():  # millions of small objects that all stay: nothing to collect
        return _load_all(text, source, error, bulk)


# below this size PyYAML's own readers take milliseconds: rapidyaml is for bulk
FAST_READER_MIN_BYTES = 256 * 1024


def _load_all(text: str, source: str, error: Callable[[str], Exception], bulk: bool) -> list[Any]:
    # bulk manifests parsed by rapidyaml in C++, several times faster than even libyaml
    # through PyYAML, where its reading is PyYAML's; anything else is PyYAML's, with its
    # messages. Hand-written manifests, small, always take PyYAML's path.
    if bulk or len(text) >= FAST_READER_MIN_BYTES:
        simple = ryml_yaml.load_all(text, _Loader(""))
        if simple is not None:
            return simple
    if _CLoader is not None:
        # libyaml's parser, tens of times faster on bulk manifests (tens of thousands of
        # Services); on any error the Python parser reads the text again, so that messages
        # and their positions are always the same
        with contextlib.suppress(yaml.YAMLError, ValueError, RecursionError):
            return list(yaml.load_all(text, Loader=_CLoader))
    try:
        return list(yaml.load_all(text, Loader=_Loader))  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{source}: invalid YAML{where}: {problem}") from None
    except ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        raise error(
            f"{source}: invalid YAML at line {line}: unacceptable character #x{char:04x}"
        ) from None
    except RecursionError:
        raise error(f"{source}: invalid YAML: nested too deeply") from None
    except ValueError as exc:  # a scalar with an explicit tag it does not fit (!!int abc)
        raise error(f"{source}: invalid YAML: {exc}") from None


def describe(where: str, obj: Any) -> str:
    """``document 2 (NetworkPolicy/web)``: as much of kind and name as can be read."""
    if not isinstance(obj, Mapping):
        return where
    kind = obj.get("kind")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if isinstance(kind, str) and kind:
        return f"{where} ({kind}/{name})" if isinstance(name, str) and name else f"{where} ({kind})"
    return where
