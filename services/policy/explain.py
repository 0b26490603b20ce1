"""What the datapath would decide for a new connection, and why, from the resolved policy.

It uses the datapath's own data and code: each side's ResolvedPolicy compiled by
``shared.policy_map.compile_endpoint`` and looked up by its ``verdict()``, the
Python model of ``policy_check`` in ``bpf/datapath.c``. Named ports are resolved the way the
datapath resolves them: against the container ports of the endpoint whose policy it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.policy.model import PROTO_ICMP, PROTO_ICMPV6, PROTOCOL_NAMES, Policy, PolicySpec
from shared.messages import ContainerPort
from shared.policy_map import EGRESS, INGRESS, compile_endpoint, verdict
from shared.reasons import POLICY_DENIED, POLICY_DENY, REASONS

if TYPE_CHECKING:
    from services.policy.resolver import Resolver

ALLOW = "allow"
DENY = "deny"
DROP = "drop (no rule allows)"
NOT_ENFORCED = "not enforced"
AUDIT = "audit (would be dropped; allowed and reported)"
PROXY = "proxy (L7 rules decide each request)"
_ENDPOINT = 1  # any endpoint number: the compiled entries of one endpoint are looked up alone


def service_text(protocol: int, port: int) -> str:
    """``80/TCP``, ``any/UDP``, ``ICMP type 8``."""
    name = PROTOCOL_NAMES.get(protocol, str(protocol))
    if protocol in (PROTO_ICMP, PROTO_ICMPV6):
        return f"{name} type {port}"
    return f"{port or 'any'}/{name}"


@dataclass(frozen=True)
class SideVerdict:
    """One direction: the egress of the source or the ingress of the destination."""

    direction: str  # "egress" | "ingress"
    subject: int  # whose policy decides
    peer: int  # the other side
    verdict: str  # ALLOW | PROXY | DENY | DROP | NOT_ENFORCED | AUDIT
    rule_id: int = 0  # the deciding rule (0: none, or the allow-all next to deny-only rules)
    rule: str = ""  # its name
    selected_by: tuple[str, ...] = ()  # the policies (and specs) selecting the subject
    reason: str = ""  # the human sentence

    @property
    def allowed(self) -> bool:
        return self.verdict in (ALLOW, PROXY, NOT_ENFORCED, AUDIT)

    @property
    def drop_reason(self) -> int:
        """Cilium's drop reason code, 0 when allowed."""
        if self.verdict == DENY:
            return POLICY_DENY
        return POLICY_DENIED if self.verdict == DROP else 0


@dataclass(frozen=True)
class Explanation:
    src: int
    dst: int
    protocol: int
    port: int
    egress: SideVerdict
    ingress: SideVerdict

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    def lines(self) -> list[str]:
        service = service_text(self.protocol, self.port)
        outcome = "ALLOWED" if self.allowed else "DROPPED"
        out = [f"identity {self.src} -> identity {self.dst} on {service}: {outcome}"]
        for side in (self.egress, self.ingress):
            code = side.drop_reason
            reason = f" ({code} {REASONS.get(code, '')})" if code else ""
            out.append(f"  {side.direction} of identity {side.subject}: {side.verdict}{reason}")
            out.append(f"    {side.reason}")
        return out


def explain(
    resolver: Resolver,
    src: int,
    dst: int,
    protocol: int,
    port: int,
    *,
    src_ports: Sequence[ContainerPort] = (),
    dst_ports: Sequence[ContainerPort] = (),
    src_ip: str = "",
    dst_ip: str = "",
) -> Explanation:
    """The verdict for a new connection ``src -> dst``: the egress of src, the ingress of dst.

    With the pods' addresses, rules that match pod addresses (ipBlock) are evaluated as the
    datapath does, through each address's slot (``Resolver.address_identity``)."""
    dst_address = resolver.address_identity(dst_ip, dst)
    src_address = resolver.address_identity(src_ip, src)
    return Explanation(
        src=src,
        dst=dst,
        protocol=protocol,
        port=port,
        egress=_side(
            resolver, "egress", src, (dst, dst_address), protocol, port, src_ports, dst_ports
        ),
        ingress=_side(
            resolver, "ingress", dst, (src, src_address), protocol, port, dst_ports, src_ports
        ),
    )


def _spec_name(policy: Policy, spec: PolicySpec) -> str:
    kind = "" if policy.kind.namespaced else " (cluster-wide)"
    where = f" {spec.path}" if len(policy.specs) > 1 else ""
    audit = " (audit mode)" if policy.audit else ""
    return f"{policy.key}{kind}{where}{audit}"


def _side(
    resolver: Resolver,
    direction: str,
    subject: int,
    peer_and_address: tuple[int, int],
    protocol: int,
    port: int,
    ports: Sequence[ContainerPort],
    peer_ports: Sequence[ContainerPort],
) -> SideVerdict:
    """``ports``: the subject's container ports, ``peer_ports`` the peer's (named ports resolve
    against the destination: the subject's for ingress, the peer's for egress);
    ``peer_and_address``: the peer's identity and its address's slot (0: none)."""
    peer, address = peer_and_address
    resolved = resolver.expanded(subject, peer=peer, address=address)
    selecting = resolver.selecting(subject)
    in_audit = resolved is not None and (
        resolved.ingress_audit if direction == "ingress" else resolved.egress_audit
    )
    enforcing = tuple(
        _spec_name(policy, spec)
        for policy, spec in selecting
        if policy.audit == in_audit
        and (spec.enforces_ingress if direction == "ingress" else spec.enforces_egress)
    )
    names = tuple(_spec_name(policy, spec) for policy, spec in selecting)
    enforced = resolved is not None and (
        resolved.ingress_enforced if direction == "ingress" else resolved.egress_enforced
    )
    if resolved is None or not enforced:
        if names:
            who = f"{_join(names)} {_verb(names)} identity {subject}"
            why = f"{who} but none enforces {direction}"
        else:
            why = f"no policy selects identity {subject} for {direction}"
        return SideVerdict(direction, subject, peer, NOT_ENFORCED, selected_by=names, reason=why)
    entries = compile_endpoint(_ENDPOINT, resolved, ports, {peer: peer_ports})
    code = INGRESS if direction == "ingress" else EGRESS
    decision, rule_id = verdict(entries, _ENDPOINT, code, peer, protocol, port, address)
    rule = resolved.rules.get(rule_id, "") or resolver.rule_name(rule_id)
    if enforcing:
        head = f"{_join(enforcing)} {_verb(enforcing)} identity {subject} for {direction}"
    else:
        head = (
            f"no policy enforces {direction} on identity {subject}, but deny rules apply"
            f" ({_join(names)})"
        )
    outcome, tail = _decided(decision, in_audit, rule_id, rule, peer, service_text(protocol, port))
    if outcome == DROP:
        rule_id, rule = 0, ""
    # an AUDIT or DROP names only the policies enforcing the direction, which may be none
    selected_by = enforcing if outcome in (AUDIT, DROP) else enforcing or names
    return SideVerdict(
        direction, subject, peer, outcome, rule_id, rule, selected_by, f"{head}; {tail}"
    )


def _decided(
    decision: str, in_audit: bool, rule_id: int, rule: str, peer: int, service: str
) -> tuple[str, str]:
    """The verdict of an enforcing side, from the datapath's decision, and why."""
    if decision == "proxy":
        return PROXY, (
            f"{rule} allows identity {peer} on {service} with L7 rules: the connection goes to"
            " the node's L7 proxy, which checks every request (dropped when no proxy takes it)"
        )
    if in_audit and decision != "allow":
        would = (
            f"{rule} would deny identity {peer} on {service}"
            if decision == "deny"
            else f"no rule would allow identity {peer} on {service}"
        )
        return AUDIT, f"{would}; audit mode lets it through and reports it (verdict AUDIT)"
    if decision == "deny":
        return DENY, f"{rule} denies identity {peer} on {service} (deny wins over any allow)"
    if decision == "allow":
        return ALLOW, (
            f"{rule} allows identity {peer} on {service}"
            if rule_id
            else f"no deny rule matches identity {peer} on {service}"
        )
    return DROP, f"no rule allows identity {peer} on {service}"


def _verb(names: tuple[str, ...]) -> str:
    return "selects" if len(names) == 1 else "select"


def _join(names: tuple[str, ...]) -> str:
    return ", ".join(names)
