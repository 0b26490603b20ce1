"""What a service's ``services`` record holds, computed from plain data: no NATS, no Redis.

:func:`desired` turns a spec (a Service with a selector or EndpointSlices, or an API-driven
service) and the pods or slices it selects into frontends and backends; :func:`owners` names
the frontend and backend ids they need (allocated by the caller, in Redis); :func:`record`
builds the record once they are known; :func:`changed` says whether it differs from the one
published, with the revision that goes with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping

import msgspec

from services.lb.model import ApiService, EndpointSliceSpec, ServiceSpec
from shared import maglev
from shared.messages import Endpoint, LBBackend, LBFrontend, LBService

Spec = ServiceSpec | ApiService
# (ip, port, terminating)
Backend = tuple[str, int, bool]
# (ip, port, protocol, node port?, backends)
Frontend = tuple[str, int, str, bool, list[Backend]]


@dataclasses.dataclass
class Desired:
    """A service's frontends and backends before ids are attached."""

    key: str
    spec: Spec
    frontends: list[Frontend]
    algorithm: str


def frontend_owner(ip: str, port: int, protocol: str) -> str:
    return f"{ip}:{port}/{protocol}"


def desired(
    key: str,
    spec: Spec,
    algorithm: str,
    pods: Collection[Endpoint],
    slices: Collection[EndpointSliceSpec],
) -> Desired:
    """``spec``'s frontends (its cluster IP and node ports per port) with their backends:
    the ``pods`` its selector matches, or the endpoints of its ``slices``."""
    if isinstance(spec, ApiService):
        api_backends = [(ip, port, False) for ip, port in spec.backends]
        frontends = [(f.ip, f.port, f.protocol, False, api_backends) for f in spec.frontends]
        return Desired(key, spec, frontends, algorithm)
    frontends = []
    for port in spec.ports:
        backends = _backends(spec, port.name, port.protocol, port.target_port, pods, slices)
        frontends.append((spec.cluster_ip, port.port, port.protocol, False, backends))
        if port.node_port:
            frontends.append(("0.0.0.0", port.node_port, port.protocol, True, backends))
    return Desired(key, spec, frontends, algorithm)


def _backends(
    spec: ServiceSpec,
    port_name: str,
    protocol: str,
    target: int | str,
    pods: Collection[Endpoint],
    slices: Collection[EndpointSliceSpec],
) -> list[Backend]:
    found: list[Backend] = []
    if spec.selector is not None:
        if not spec.selector:
            return found  # an empty selector selects nothing for a Service
        for pod in pods:
            if pod.namespace != spec.namespace or not pod.ip:
                continue
            if any(pod.labels.get(k) != v for k, v in spec.selector.items()):
                continue
            if isinstance(target, int):
                found.append((pod.ip, target, False))
                continue
            for cp in pod.ports:  # a named targetPort: the pod's port of that name
                if cp.name == target and cp.protocol == protocol:
                    found.append((pod.ip, cp.port, False))
                    break
    else:
        for s in slices:
            for sp in s.ports:
                if sp.name != port_name or sp.protocol != protocol:
                    continue
                for e in s.endpoints:
                    if e.ready or e.terminating:
                        found.append((e.ip, sp.port, e.terminating))
    return sorted(set(found))


def owners(wanted: Iterable[Desired]) -> tuple[list[str], list[str]]:
    """The frontend and backend id owners ``wanted`` needs, each list sorted."""
    wanted = list(wanted)
    fronts = {
        frontend_owner(ip, port, proto) for d in wanted for ip, port, proto, _, _ in d.frontends
    }
    backs = {
        frontend_owner(bip, bport, proto)
        for d in wanted
        for _, _, proto, _, backends in d.frontends
        for bip, bport, _ in backends
    }
    return sorted(fronts), sorted(backs)


def record(
    d: Desired,
    front_ids: Mapping[str, int],
    back_ids: Mapping[str, int],
    *,
    seed: int,
    maglev_max: int,
) -> LBService:
    """The record of ``d`` with its ids (revision 0: :func:`changed` sets it). The Maglev
    table size follows the backend count of its largest frontend (terminating backends
    counted, so that a rolling update does not resize it), at most ``maglev_max``."""
    backends = max((len(f[4]) for f in d.frontends), default=0)
    return LBService(
        namespace=d.spec.namespace,
        name=d.spec.name,
        frontends=[
            LBFrontend(
                id=front_ids[frontend_owner(ip, port, proto)],
                ip=ip,
                port=port,
                protocol=proto,
                node_port=node_port,
                backends=[
                    LBBackend(
                        id=back_ids[frontend_owner(bip, bport, proto)],
                        ip=bip,
                        port=bport,
                        terminating=terminating,
                    )
                    for bip, bport, terminating in backends
                ],
            )
            for ip, port, proto, node_port, backends in d.frontends
        ],
        algorithm=d.algorithm,
        maglev_seed=seed,
        maglev_size=maglev.size_for(backends, maglev_max),
        affinity_timeout=d.spec.affinity_timeout,
        source="api" if isinstance(d.spec, ApiService) else "kubernetes",
    )


def changed(old: LBService | None, new: LBService) -> LBService | None:
    """``new`` with the next revision, or None when it is ``old`` (revision aside)."""
    if old is not None and msgspec.structs.replace(old, revision=0) == new:
        return None
    return msgspec.structs.replace(new, revision=(old.revision if old else 0) + 1)
