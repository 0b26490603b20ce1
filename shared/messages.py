"""Payloads on the bus: typed, versioned msgspec structs, JSON on the wire.

Field names are the wire names. A consumer ignores fields it does not know, so adding an
optional field is compatible; renaming or retyping one needs a new ``v``.
"""

from __future__ import annotations

import msgspec

SCHEMA_VERSION = 1


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every payload."""

    v: int = SCHEMA_VERSION


class ErrorBody(Message):
    """The body of every error reply; ``field`` points at the input that was wrong."""

    code: str
    message: str
    field: str | None = None


class Empty(Message):
    pass


# --- identities -------------------------------------------------------------------------------


class Identity(Message):
    """A security identity: a number and the canonical labels it stands for."""

    id: int
    labels: list[str]
    kind: str  # "reserved" | "cluster" | "local"


class AllocateRequest(Message):
    labels: list[str]
    # who holds the reference: a node name for endpoints, "cli" for manual allocations
    owner: str = "cli"
    # 0: the reference lives until released; else it lapses unless the owner heartbeats
    lease_seconds: float = 0
    # the same id on a retry returns the first result instead of taking a second reference
    request_id: str = ""


class AllocateReply(Message):
    identity: Identity
    new: bool


class ReleaseRequest(Message):
    id: int
    owner: str = "cli"
    request_id: str = ""


class ReleaseReply(Message):
    id: int
    # references left cluster-wide; at 0 the identity is scheduled for garbage collection
    references: int


class GetRequest(Message):
    id: int


class ListReply(Message):
    identities: list[Identity]


class HeartbeatRequest(Message):
    """Renews an owner's lease; references of an owner whose lease lapses are dropped."""

    owner: str
    ttl_seconds: float


class HeartbeatReply(Message):
    owner: str
    expires_at: float


# --- cluster-pool IPAM --------------------------------------------------------------------------


class PodCIDRRequest(Message):
    node: str


class PodCIDR(Message):
    node: str
    cidr: str


class PodCIDRList(Message):
    allocations: list[PodCIDR]
