"""``membrane get`` and ``describe``, and the listing every ``X list``/``X get`` shares.

kubectl's habits: ``get KIND [NAME...]``, ``-n NS`` (default ``default``) or ``-A`` on
namespaced kinds, ``-l`` selectors, ``-o table|wide|json|yaml`` (a list as
``{"items": [...]}``, one object as itself), and ``describe KIND NAME`` as ``Key: value``
lines.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml

from membrane import output, resources
from membrane.cliutil import parse_selector, with_bus
from membrane.resources import Kind
from shared.bus import Bus
from shared.errors import InvalidArgument

FORMATS = ("table", "wide", "json", "yaml")
DEFAULT_NAMESPACE = "default"


def list_flags(parser: argparse.ArgumentParser, kind: Kind, *, names: bool) -> None:
    """The flags of a listing of ``kind``: names, -n/-A, -l, -o."""
    if names:
        parser.add_argument("names", nargs="*", metavar="NAME", help="only these")
    if kind.namespaced:
        parser.add_argument(
            "-n", "--namespace", default=None, help=f"namespace (default {DEFAULT_NAMESPACE})"
        )
        parser.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    parser.add_argument("-l", "--selector", default="", help="labels: k=v,k!=v,k in (a,b),k,!k")
    parser.add_argument("-o", "--output", choices=FORMATS, default="table")


def add_listing(sub: Any, kind: Kind, **helps: str) -> None:
    """``list``/``get`` actions of ``kind`` under a command (``pod list``, ``pod get``): the
    actions named in ``helps`` (action -> help), with the listing's flags."""
    for action, help_text in helps.items():
        parser = sub.add_parser(action, help=help_text)
        list_flags(parser, kind, names=True)
        parser.set_defaults(func=cmd_list, kind=kind)


def namespace_of(args: argparse.Namespace) -> str:
    return getattr(args, "namespace", None) or DEFAULT_NAMESPACE


def select(kind: Kind, objects: Sequence[Any], args: argparse.Namespace) -> list[Any]:
    """The objects the flags select: namespace (unless -A), names, labels."""
    selector = parse_selector(args.selector)
    names = set(getattr(args, "names", None) or [])
    everywhere = getattr(args, "all_namespaces", False)
    chosen = []
    for obj in objects:
        namespace, name = kind.key(obj)
        if kind.namespaced and not everywhere and namespace not in (namespace_of(args), ""):
            continue  # "" : cluster-wide objects of a namespaced kind (CCNPs) show everywhere
        if names and name not in names:
            continue
        if not selector.matches(kind.labels(obj)):
            continue
        chosen.append(obj)
    return chosen


def render(kind: Kind, objects: Sequence[Any], fmt: str, *, one: bool, everywhere: bool) -> str:
    if fmt in ("json", "yaml"):
        docs = [kind.document(o) for o in objects]
        value: Any = docs[0] if one and len(docs) == 1 else {"items": docs}
        return output.structured_text(value, fmt)
    columns = list(kind.columns) + (list(kind.wide) if fmt == "wide" else [])
    if kind.namespaced and everywhere:
        columns.insert(0, ("NAMESPACE", lambda o: getattr(o, "namespace", "") or "-"))
    if not objects:
        return ""
    return output.table([h for h, _ in columns], [[f(o) for _, f in columns] for o in objects])


def show(kind: Kind, objects: Sequence[Any], args: argparse.Namespace, *, one: bool) -> int:
    everywhere = bool(getattr(args, "all_namespaces", False))
    text = render(kind, objects, args.output, one=one, everywhere=everywhere)
    if text:
        print(text)
    elif args.output in ("table", "wide"):
        where = "any namespace" if everywhere or not kind.namespaced else namespace_of(args)
        print(f"No {kind.name} found in {where}." if kind.namespaced else f"No {kind.name} found.")
    return 0


def fetch(kind: Kind, args: argparse.Namespace) -> tuple[list[Any], bool]:
    """The selected objects, and whether exactly one was asked for by name."""
    names: list[str] = list(getattr(args, "names", None) or [])

    async def go(bus: Bus) -> list[Any]:
        if len(names) == 1 and not args.selector:  # one read, and NotFound when it is not there
            return [await kind.get_one(bus, namespace_of(args), names[0])]
        return select(kind, await kind.list_all(bus), args)

    return with_bus(args, go), len(names) == 1


def cmd_list(args: argparse.Namespace) -> int:
    kind: Kind = args.kind
    objects, one = fetch(kind, args)
    return show(kind, objects, args, one=one)


def cmd_get(args: argparse.Namespace) -> int:
    args.kind = kind_of(args.resource)
    return cmd_list(args)


def kind_of(text: str) -> Kind:
    kind = resources.BY_NAME.get(text.lower())
    if kind is None:
        known = ", ".join(k.name for k in resources.KINDS)
        raise InvalidArgument(f"unknown kind {text!r}: {known}", field="kind")
    return kind


ACRONYMS = frozenset({"IP", "ID", "CIDR"})


def _title(header: str) -> str:
    """``POD-CIDR`` -> ``Pod CIDR``, as kubectl describe writes keys."""
    return " ".join(w if w in ACRONYMS else w.capitalize() for w in header.split("-"))


def describe(kind: Kind, obj: Any) -> str:
    """``Key: value`` lines of every column and field, nested values indented."""
    lines = []
    columns = [*kind.columns, *kind.wide]
    if kind.namespaced:
        lines.append(f"Namespace:  {getattr(obj, 'namespace', '') or '<cluster-wide>'}")
    for header, value in columns:
        lines.append(f"{_title(header)}:  {value(obj)}")
    detail = yaml.safe_dump(kind.document(obj), sort_keys=False).rstrip("\n")
    lines.append("Fields:")
    lines.extend(f"  {line}" for line in detail.splitlines())
    return "\n".join(lines)


def cmd_describe(args: argparse.Namespace) -> int:
    kind = kind_of(args.resource)

    async def go(bus: Bus) -> list[Any]:
        if args.names:
            return [await kind.get_one(bus, namespace_of(args), n) for n in args.names]
        return select(kind, await kind.list_all(bus), args)

    found = with_bus(args, go)
    print("\n\n".join(describe(kind, obj) for obj in found) or f"No {kind.name} found.")
    return 0


def add_parsers(sub: Any) -> None:
    kinds = ", ".join(f"{k.name} ({', '.join(k.aliases)})" for k in resources.KINDS)
    for command, func, help_text in (
        ("get", cmd_get, "list objects of a kind, kubectl-style"),
        ("describe", cmd_describe, "every detail of objects of a kind"),
    ):
        p = sub.add_parser(command, help=help_text, description=f"KIND: {kinds}.")
        p.add_argument("resource", metavar="KIND")
        p.add_argument("names", nargs="*", metavar="NAME", help="only these")
        p.add_argument("-n", "--namespace", default=None, help="namespace (default default)")
        p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
        p.add_argument("-l", "--selector", default="", help="labels: k=v,k!=v,k in (a,b),k,!k")
        if command == "get":
            p.add_argument("-o", "--output", choices=FORMATS, default="table")
        p.set_defaults(func=func)
