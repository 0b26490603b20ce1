"""Resolved policy with peer sets: what refers to them, and the entries they stand for.

The policy service publishes a subject's entries once per peer *selector* (``PolicyEntry
.selector``) and each selector's current identities apart (``PeerSet`` in the ``selectors``
bucket). Consumers that need one entry per peer identity (the datapath's compiler, ``explain``)
expand them here, with the members they know.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import msgspec

from shared.messages import PolicyEntry, ResolvedPolicy

__all__ = ["expand", "expand_entries", "referenced"]


def referenced(policy: ResolvedPolicy) -> set[int]:
    """The peer sets a resolved policy's entries name."""
    return {e.selector for e in (*policy.ingress, *policy.egress) if e.selector}


def expand_entries(
    entries: Iterable[PolicyEntry], members: Mapping[int, Collection[int]]
) -> list[PolicyEntry]:
    """One entry per peer identity; a peer set nobody has published yet stands for nobody."""
    out: list[PolicyEntry] = []
    for entry in entries:
        if not entry.selector:
            out.append(entry)
            continue
        for identity in sorted(members.get(entry.selector, ())):
            out.append(msgspec.structs.replace(entry, peer=identity, selector=0))
    return out


def expand(policy: ResolvedPolicy, members: Mapping[int, Collection[int]]) -> ResolvedPolicy:
    return msgspec.structs.replace(
        policy,
        ingress=expand_entries(policy.ingress, members),
        egress=expand_entries(policy.egress, members),
    )
