"""Configuration from ``MEMBRANE_*`` environment variables and command-line flags.

A service declares its settings as a frozen dataclass; every field ``foo_bar`` is read from the
flag ``--foo-bar``, else from ``MEMBRANE_FOO_BAR``, else its default. The field's ``help``
metadata is the flag's help text, so the two never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from collections.abc import Mapping
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from shared.errors import InvalidArgument

ENV_PREFIX = "MEMBRANE_"

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:
    """A dataclass field with help text for its flag."""
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class CommonSettings:
    """What every service needs to reach the bus, Redis and tell who it is."""

    nats_url: str = setting("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("auto", "json, console, or auto (console on a terminal)")
    metrics_host: str = setting("127.0.0.1", "address of the Prometheus /metrics endpoint")
    metrics_port: int = setting(0, "port of the Prometheus /metrics endpoint (0: any free port)")
    replica: str = setting("", "a name for this replica in logs and NATS micro metadata")
    kv_replicas: int = setting(
        1, "copies of each JetStream KV bucket this service creates (3 in a NATS cluster)"
    )


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def require_at_least(settings: object, low: float, *names: str) -> None:
    """Refuse settings whose fields ``names`` are below ``low``, naming the first such
    variable (what every service's ``__post_init__`` checks of its counts and sizes)."""
    for name in names:
        if getattr(settings, name) < low:
            raise InvalidArgument(f"must be at least {low}", field=env_name(name))


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _convert(name: str, hint: Any, raw: str) -> Any:
    base = _base_type(hint)
    try:
        if base is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{raw!r} is not a boolean")
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if get_origin(base) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        raise InvalidArgument(f"invalid value {raw!r}: {exc}", field=name) from None


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one flag per settings field; unset flags fall back to the environment."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            default = ",".join(default)
        flag_only = _base_type(hints[f.name]) is bool
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            # a boolean may stand alone (``--dump-program``) or take a value (``... false``)
            nargs="?" if flag_only else None,
            const="true" if flag_only else None,
            # absent flags leave no attribute, so they never mask one set by a parent parser
            default=argparse.SUPPRESS,
            metavar=_base_type(hints[f.name]).__name__.upper()
            if isinstance(_base_type(hints[f.name]), type)
            else "LIST",
            help=f"{help_text} [env {env_name(f.name)}, default {default!r}]",
        )


def load(
    cls: type[T],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> T:
    """Build ``cls`` from flags, then environment, then defaults; bad values name the setting."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = getattr(args, f.name, None) if args is not None else None
        source = flag_name(f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
            source = env_name(f.name)
        if raw is not None:
            values[f.name] = _convert(source, hints[f.name], str(raw))
    return cls(**values)
