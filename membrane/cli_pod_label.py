"""``membrane pod label``: kubectl's ``label`` for pods, through the path the Kubernetes bridge
takes (the ``pods`` bucket, from which the node's agent re-identifies the pod)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from membrane.client import workloads
from membrane.cliutil import with_bus
from shared.bus import Bus
from shared.errors import InvalidArgument
from shared.labels import check_pod_labels, validate_key, validate_value
from shared.messages import Endpoint


def parse_changes(tokens: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``KEY=VALUE`` and ``KEY-`` arguments -> (labels to set, keys to remove), as kubectl
    reads them; a key may not be both set and removed, nor set twice."""
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for index, token in enumerate(tokens):
        field = f"labels[{index}]"
        key, sep, value = token.partition("=")
        if sep:
            validate_key(key, field)
            validate_value(value, field)
            if key in to_set:
                raise InvalidArgument(f"label {key!r} given twice", field=field)
            to_set[key] = value
        elif token.endswith("-") and len(token) > 1:
            validate_key(token[:-1], field)
            to_remove.append(token[:-1])
        else:
            raise InvalidArgument(f"{token!r} is neither KEY=VALUE nor KEY-", field=field)
    both = sorted(set(to_set) & set(to_remove))
    if both:
        raise InvalidArgument(f"label {both[0]!r} is both set and removed", field="labels")
    if not to_set and not to_remove:
        raise InvalidArgument("at least one KEY=VALUE or KEY- is required", field="labels")
    check_pod_labels(to_set, "labels")
    return to_set, to_remove


def relabel(
    current: dict[str, str], to_set: dict[str, str], to_remove: Sequence[str], overwrite: bool
) -> tuple[dict[str, str], list[str]]:
    """The pod's labels after the change, and the keys to remove it did not have. A key that
    has a value is changed only with ``overwrite`` (kubectl's rule)."""
    if not overwrite:
        for key in to_set:
            if key in current:
                raise InvalidArgument(
                    f"{key!r} already has a value ({current[key]}), and --overwrite is false",
                    field=f"labels[{key!r}]",
                )
    labels = {k: v for k, v in current.items() if k not in to_remove}
    labels.update(to_set)
    return labels, [key for key in to_remove if key not in current]


def cmd_pod_label(args: argparse.Namespace) -> int:
    to_set, to_remove = parse_changes(args.labels)

    async def go(bus: Bus) -> Endpoint:
        pod = await workloads.find_pod(bus, args.namespace, args.name)
        labels, missing = relabel(pod.labels, to_set, to_remove, args.overwrite)
        for key in missing:
            print(f"label {key!r} not found.", file=sys.stderr)
        if labels == pod.labels:
            return pod
        return await workloads.label_pod(bus, args.namespace, args.name, labels)

    endpoint = with_bus(args, go)
    print(f"pod/{endpoint.name} labeled: identity {endpoint.identity}")
    return 0


def add_parser(pod_sub: Any) -> None:
    sp = pod_sub.add_parser(
        "label", help="set (KEY=VALUE) or remove (KEY-) a pod's labels; it is re-identified"
    )
    sp.add_argument("name", help="the pod")
    sp.add_argument("labels", nargs="+", metavar="LABEL", help="KEY=VALUE sets, KEY- removes")
    sp.add_argument("-n", "--namespace", default="default")
    sp.add_argument("--overwrite", action="store_true", help="change labels that have a value")
    sp.set_defaults(func=cmd_pod_label)
