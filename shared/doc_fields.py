"""Reading fields of a Kubernetes-style document (parsed YAML/JSON) with errors that name them.

Shared by the manifest reader (``membrane apply``) and the policy parser: the same field path
spelling (``spec.containers[0].ports``) and the same type names in every message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.errors import InvalidArgument


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def typed(value: Any) -> str:
    """A scalar with its type (``string '80'``); anything else by its type alone."""
    if isinstance(value, bool | int | float | str):
        return f"{type_name(value)} {value!r}"
    return type_name(value)


def show(value: Any) -> str:
    """A value out of range as itself; one of the wrong type with its type too."""
    return str(value) if is_int(value) else typed(value)


def is_int(value: Any) -> bool:
    # YAML true/false are Python bools, which are ints; Kubernetes rejects them as numbers
    return isinstance(value, int) and not isinstance(value, bool)


def mapping(
    parent: Mapping[str, Any], key: str, path: str, *, required: bool = False
) -> Mapping[str, Any]:
    value = parent.get(key)
    if type(value) is dict:  # the usual case, without the ABC check (bulk manifests)
        return value
    if value is None:
        if required:
            raise InvalidArgument("is required", field=join(path, key))
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"must be a mapping, got {type_name(value)}", field=join(path, key))
    return value


def optional_list(parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"must be a list, got {type_name(value)}", field=join(path, key))
    return value
