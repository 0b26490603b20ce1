"""v1/Service, discovery.k8s.io/v1 EndpointSlice and API-mode frontends, parsed and validated.

Pure logic: no NATS, no Redis. A document either parses completely or raises
:class:`InvalidArgument` naming the field, so that the service can validate a whole request
before it changes anything.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from shared import protocols
from shared.errors import InvalidArgument
from shared.names import DNS_1035_LABEL, DNS_LABEL, IANA_SVC_NAME

PROTOCOLS = tuple(protocols.PORT_PROTOCOLS)
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' default for sessionAffinity ClientIP
MAX_AFFINITY_TIMEOUT = 86400
# four decimal octets 0-255 without leading zeros (ASCII digits only)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def ipv4_int(address: str) -> int:
    """A dotted quad (checked already) as an integer, without ipaddress's slower parsing."""
    return int.from_bytes(socket.inet_aton(address), "big")


def ipv4_text(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    target_port: int | str  # a number, or the name of a container port
    node_port: int = 0


@dataclass(frozen=True)
class ServiceSpec:
    namespace: str
    name: str
    cluster_ip: str  # "" = allocate from the service CIDR
    ports: tuple[ServicePort, ...]
    selector: dict[str, str] | None  # None: backends come from EndpointSlices
    affinity_timeout: int = 0  # 0: no session affinity
    node_port: bool = False


@dataclass(frozen=True)
class SliceEndpoint:
    ip: str
    ready: bool = True
    terminating: bool = False


@dataclass(frozen=True)
class SlicePort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class EndpointSliceSpec:
    namespace: str
    name: str
    service: str  # the kubernetes.io/service-name label
    endpoints: tuple[SliceEndpoint, ...]
    ports: tuple[SlicePort, ...]


@dataclass(frozen=True)
class ApiFrontend:
    ip: str
    port: int
    protocol: str


@dataclass(frozen=True)
class ApiService:
    namespace: str
    name: str
    frontends: tuple[ApiFrontend, ...]
    backends: tuple[tuple[str, int], ...]
    affinity_timeout: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _map(parent: Mapping[str, Any], key: str, path: str, required: bool = False) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        if required:
            raise InvalidArgument("is required", field=f"{path}{key}")
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"must be a mapping, got {_type(value)}", field=f"{path}{key}")
    return dict(value)


def _list(parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"must be a list, got {_type(value)}", field=f"{path}{key}")
    return value


def _str(parent: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
    value = parent.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidArgument(f"must be a string, got {_type(value)}", field=f"{path}{key}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"must be an integer, got {_type(value)}", field=where)
    return value


def check_port(value: Any, where: str) -> int:
    port = _int(value, where)
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"port {port} is out of range 1-65535", field=where)
    return port


def check_protocol(value: Any, where: str) -> str:
    if value is None:
        return "TCP"
    if value not in PROTOCOLS:
        raise InvalidArgument(
            f"protocol {value!r} is not one of {', '.join(PROTOCOLS)}", field=where
        )
    return str(value)


def check_ipv4(value: Any, where: str) -> str:
    """Dotted-quad IPv4 in canonical form (no leading zeros), as Kubernetes accepts it."""
    if not isinstance(value, str):
        raise InvalidArgument(f"must be an IPv4 address, got {_type(value)}", field=where)
    if _IPV4_RE.fullmatch(value) is None:
        raise InvalidArgument(f"{value!r} is not a valid IPv4 address", field=where)
    return value


def _meta(doc: Mapping[str, Any]) -> tuple[str, str]:
    meta = _map(doc, "metadata", "", required=True)
    name = _str(meta, "name", "metadata.")
    if not name:
        raise InvalidArgument("is required", field="metadata.name")
    namespace = _str(meta, "namespace", "metadata.", "default") or "default"
    if not DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise InvalidArgument(f"{namespace!r} is not a DNS label", field="metadata.namespace")
    return namespace, name


def parse_service(doc: Mapping[str, Any], service_cidr: IPv4Network | None = None) -> ServiceSpec:
    namespace, name = _meta(doc)
    if not DNS_1035_LABEL.match(name) or len(name) > 63:
        raise InvalidArgument(
            f"{name!r} must be a DNS-1035 label (lowercase letters, digits and '-', starting "
            "with a letter)",
            field="metadata.name",
        )
    spec = _map(doc, "spec", "", required=True)
    kind = _str(spec, "type", "spec.", "ClusterIP")
    if kind not in ("ClusterIP", "NodePort"):
        raise InvalidArgument(
            f"type {kind!r} is not supported (ClusterIP or NodePort)", field="spec.type"
        )
    cluster_ip = _cluster_ip(spec, service_cidr)
    raw_ports = _list(spec, "ports", "spec.")
    if not raw_ports:
        raise InvalidArgument("a service needs at least one port", field="spec.ports")
    ports: list[ServicePort] = []
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    for i, raw in enumerate(raw_ports):
        port = _service_port(raw, f"spec.ports[{i}]", kind, several=len(raw_ports) > 1)
        where = f"spec.ports[{i}]"
        if port.name:
            if port.name in seen_names:
                raise InvalidArgument(f"duplicate port name {port.name!r}", field=f"{where}.name")
            seen_names.add(port.name)
        if (port.port, port.protocol) in seen_ports:
            raise InvalidArgument(
                f"duplicate port {port.port}/{port.protocol}", field=f"{where}.port"
            )
        seen_ports.add((port.port, port.protocol))
        ports.append(port)
    selector: dict[str, str] | None = None
    if spec.get("selector") is not None:
        raw_selector = _map(spec, "selector", "spec.")
        selector = {}
        for key, value in raw_selector.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidArgument(
                    "keys and values must be strings", field=f"spec.selector.{key}"
                )
            selector[key] = value
    return ServiceSpec(
        namespace=namespace,
        name=name,
        cluster_ip=cluster_ip,
        ports=tuple(ports),
        selector=selector,
        affinity_timeout=_affinity_timeout(spec),
        node_port=kind == "NodePort",
    )


def _cluster_ip(spec: Mapping[str, Any], service_cidr: IPv4Network | None) -> str:
    cluster_ip = _str(spec, "clusterIP", "spec.")
    if cluster_ip.lower() == "none":
        raise InvalidArgument(
            "headless services (clusterIP: None) are not supported", field="spec.clusterIP"
        )
    if cluster_ip:
        cluster_ip = check_ipv4(cluster_ip, "spec.clusterIP")
        if service_cidr is not None and not (
            int(service_cidr.network_address)
            <= ipv4_int(cluster_ip)
            <= int(service_cidr.broadcast_address)
        ):
            raise InvalidArgument(
                f"{cluster_ip} is not in the service CIDR {service_cidr}", field="spec.clusterIP"
            )
    return cluster_ip


def _service_port(raw: Any, where: str, kind: str, *, several: bool) -> ServicePort:
    """One entry of ``spec.ports`` (its uniqueness among the others is the caller's)."""
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"must be a mapping, got {_type(raw)}", field=where)
    port = check_port(raw.get("port"), f"{where}.port")
    protocol = check_protocol(raw.get("protocol"), f"{where}.protocol")
    port_name = _str(raw, "name", f"{where}.")
    if several and not port_name:
        raise InvalidArgument("is required when a service has several ports", field=f"{where}.name")
    if port_name and (not IANA_SVC_NAME.match(port_name) or len(port_name) > 63):
        raise InvalidArgument(f"{port_name!r} is not a valid port name", field=f"{where}.name")
    target: int | str = port
    raw_target = raw.get("targetPort")
    if isinstance(raw_target, str):
        if raw_target.isdigit():
            target = check_port(int(raw_target), f"{where}.targetPort")
        elif not IANA_SVC_NAME.match(raw_target) or len(raw_target) > 15:
            raise InvalidArgument(
                f"{raw_target!r} is neither a port number nor a port name",
                field=f"{where}.targetPort",
            )
        else:
            target = raw_target
    elif raw_target is not None:
        target = check_port(raw_target, f"{where}.targetPort")
    node_port = 0
    if raw.get("nodePort") is not None:
        if kind != "NodePort":
            raise InvalidArgument(
                "only a NodePort service has node ports", field=f"{where}.nodePort"
            )
        node_port = _int(raw["nodePort"], f"{where}.nodePort")
        low, high = protocols.NODE_PORT_RANGE
        if not low <= node_port <= high:
            raise InvalidArgument(
                f"node port {node_port} is out of range {low}-{high}", field=f"{where}.nodePort"
            )
    return ServicePort(port_name, port, protocol, target, node_port)


def _affinity_timeout(spec: Mapping[str, Any]) -> int:
    """``sessionAffinity: ClientIP``'s timeout in seconds; 0 without session affinity."""
    affinity = _str(spec, "sessionAffinity", "spec.", "None")
    if affinity == "None":
        return 0
    if affinity != "ClientIP":
        raise InvalidArgument(f"{affinity!r} is not None or ClientIP", field="spec.sessionAffinity")
    config = _map(
        _map(spec, "sessionAffinityConfig", "spec."), "clientIP", "spec.sessionAffinityConfig."
    )
    raw_timeout = config.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    timeout = _int(raw_timeout, "spec.sessionAffinityConfig.clientIP.timeoutSeconds")
    if not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise InvalidArgument(
            f"must be between 1 and {MAX_AFFINITY_TIMEOUT}",
            field="spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        )
    return timeout


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def parse_endpoint_slice(doc: Mapping[str, Any]) -> EndpointSliceSpec:
    namespace, name = _meta(doc)
    labels = _map(_map(doc, "metadata", ""), "labels", "metadata.")
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise InvalidArgument(
            f"an EndpointSlice names its service in the label {SERVICE_NAME_LABEL}",
            field=f"metadata.labels.{SERVICE_NAME_LABEL}",
        )
    address_type = doc.get("addressType")
    if address_type != "IPv4":
        raise InvalidArgument(f"only IPv4 is supported, got {address_type!r}", field="addressType")
    endpoints: list[SliceEndpoint] = []
    for i, raw in enumerate(_list(doc, "endpoints", "")):
        where = f"endpoints[{i}]"
        if not isinstance(raw, Mapping):
            raise InvalidArgument(f"must be a mapping, got {_type(raw)}", field=where)
        addresses = _list(raw, "addresses", f"{where}.")
        if len(addresses) != 1:
            raise InvalidArgument("must hold exactly one address", field=f"{where}.addresses")
        ip = check_ipv4(addresses[0], f"{where}.addresses[0]")
        conditions = _map(raw, "conditions", f"{where}.")
        ready = conditions.get("ready", True)
        terminating = conditions.get("terminating", False)
        if not isinstance(ready, bool) or not isinstance(terminating, bool):
            raise InvalidArgument("conditions are true or false", field=f"{where}.conditions")
        endpoints.append(SliceEndpoint(ip, ready and not terminating, terminating))
    ports: list[SlicePort] = []
    for i, raw in enumerate(_list(doc, "ports", "")):
        where = f"ports[{i}]"
        if not isinstance(raw, Mapping):
            raise InvalidArgument(f"must be a mapping, got {_type(raw)}", field=where)
        ports.append(
            SlicePort(
                _str(raw, "name", f"{where}."),
                check_port(raw.get("port"), f"{where}.port"),
                check_protocol(raw.get("protocol"), f"{where}.protocol"),
            )
        )
    return EndpointSliceSpec(namespace, name, service, tuple(endpoints), tuple(ports))


def parse_frontend(text: str, where: str) -> ApiFrontend:
    """``IP:PORT/PROTO`` (PROTO defaults to TCP)."""
    address, _, proto = text.partition("/")
    ip, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"{text!r} is not IP:PORT/PROTO", field=where)
    return ApiFrontend(
        check_ipv4(ip, where),
        check_port(int(port), where),
        check_protocol(proto.upper() or "TCP", where),
    )


def parse_backend(text: str, where: str) -> tuple[str, int]:
    ip, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"{text!r} is not IP:PORT", field=where)
    return check_ipv4(ip, where), check_port(int(port), where)


def parse_api(
    namespace: str, name: str, frontends: list[str], backends: list[str], affinity_timeout: int
) -> ApiService:
    if not DNS_1035_LABEL.match(name) or len(name) > 63:
        raise InvalidArgument(f"{name!r} must be a DNS-1035 label", field="name")
    if not frontends:
        raise InvalidArgument("give at least one --frontend IP:PORT/PROTO", field="frontends")
    parsed = tuple(parse_frontend(f, f"frontends[{i}]") for i, f in enumerate(frontends))
    if len(set(parsed)) != len(parsed):
        raise InvalidArgument("a frontend is given twice", field="frontends")
    ends = tuple(parse_backend(b, f"backends[{i}]") for i, b in enumerate(backends))
    if len(set(ends)) != len(ends):
        raise InvalidArgument("a backend is given twice", field="backends")
    if not 0 <= affinity_timeout <= MAX_AFFINITY_TIMEOUT:
        raise InvalidArgument(
            f"must be between 0 and {MAX_AFFINITY_TIMEOUT}", field="affinity_timeout"
        )
    return ApiService(namespace, name, parsed, ends, affinity_timeout)
