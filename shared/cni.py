"""``membrane-cni``: a CNI 1.0.0 plugin that asks the node's datapath agent to wire a pod.

The container runtime runs this executable with ``CNI_*`` environment variables and the network
configuration as JSON on stdin. The plugin makes one request to the agent over its unix socket
(``shared.agent_api``) and prints the result, or an error, as JSON on stdout. Logs go to stderr
only: stdout carries nothing but the result.

- ``ADD``: ``endpoint.add``; prints the result (host veth, pod interface, the /32 address, a
  default route). A retried ADD with the same container id gets the same endpoint back.
- ``DEL``: ``endpoint.delete`` by container id. An endpoint the agent does not know counts as
  deleted, so DEL is idempotent; ``CNI_NETNS`` may be missing.
- ``CHECK``: ``endpoint.get`` by container id; the endpoint must match ``CNI_NETNS``,
  ``CNI_IFNAME``, the pod named in ``CNI_ARGS`` and the address in ``prevResult``.
- ``VERSION``: the supported spec versions; reads neither the environment nor stdin.

DEL and CHECK look the endpoint up by container id only, never by pod name: a late DEL of a
pod's previous sandbox must not remove the endpoint of its current one.

The agent's socket is the configuration's ``agentSocket``, else ``$MEMBRANE_AGENT_SOCKET``, else
the per-node default for the configuration's ``node``, ``$MEMBRANE_NODE`` or the host name.
Pod labels come from ``args.labels`` or ``args.cni.labels`` in the configuration (an object, or
the CNI conventions' list of ``{"key", "value"}``), since kubelet passes no labels.

Error codes (0-99 are the spec's well-known codes, 100+ this plugin's own):

====  ============================================================================================
1     the configuration's ``cniVersion`` is not supported (or too old for CHECK)
2     an unsupported field: ``ipam`` (the agent owns IPAM)
3     CHECK: the agent has no endpoint for the container
4     a ``CNI_*`` variable is missing or invalid, ``CNI_ARGS`` is malformed or has unknown keys
      (without ``IgnoreUnknown``), an unknown ``CNI_COMMAND``
5     I/O failure: stdin unreadable, socket not permitted, an unreadable reply, or the agent
      failed (internal error, no free address)
6     stdin is not JSON
7     the configuration is invalid (missing or mistyped field, bad ``prevResult``), or the agent
      rejected the request (invalid argument, pod already exists with another container id)
11    try again later: no agent at the socket, or it did not answer within 30 s
100   CHECK: the endpoint exists but differs from what the runtime expects (``details`` says how)
====  ============================================================================================
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from shared import agent_api, log
from shared.agent_api import AddEndpoint, EndpointRef
from shared.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    MembraneError,
    NotFound,
    Unavailable,
)
from shared.messages import Endpoint, Message
from shared.names import validate_dns_label, validate_dns_subdomain

SPEC_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
AGENT_TIMEOUT = 30.0
OWNER = "cni"
# keys of CNI_ARGS this plugin understands; others are an error unless IgnoreUnknown is true
KNOWN_ARGS = frozenset(
    {
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
    }
)

# container ids and network names: alphanumeric first, then alphanumerics, '_', '.', '-'
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IFNAMSIZ = 16  # including the trailing NUL

R = TypeVar("R")
JSON = dict[str, Any]


class Code(enum.IntEnum):
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODING_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11
    CHECK_MISMATCH = 100


class CNIError(Exception):
    """An error as the runtime sees it: a code, a short message and optional details."""

    def __init__(self, code: Code, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> JSON:
        doc: JSON = {"cniVersion": cni_version, "code": int(self.code), "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


# --- the environment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """The ``CNI_*`` environment of one run, validated for its command."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)


def parse_cni_args(raw: str) -> dict[str, str]:
    """``CNI_ARGS``: ``KEY=VALUE`` pairs separated by ';'."""
    args: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue  # an empty CNI_ARGS, or a trailing ';'
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(
                Code.INVALID_ENVIRONMENT,
                f"CNI_ARGS: {pair!r} is not KEY=VALUE",
                "CNI_ARGS holds KEY=VALUE pairs separated by ';'",
            )
        args[key] = value
    ignore = args.get("IgnoreUnknown", "false").lower()
    if ignore not in ("1", "true", "0", "false"):
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_ARGS: IgnoreUnknown={args['IgnoreUnknown']!r} is not a boolean",
            "use 1, true, 0 or false",
        )
    unknown = sorted(set(args) - KNOWN_ARGS)
    if unknown and ignore in ("0", "false"):
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_ARGS: unknown key(s) {', '.join(unknown)}",
            f"known keys: {', '.join(sorted(KNOWN_ARGS))}; IgnoreUnknown=1 ignores the others",
        )
    return args


def parse_invocation(env: Mapping[str, str]) -> Invocation:
    """Read and check the variables ``CNI_COMMAND`` needs (VERSION needs no other)."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(Code.INVALID_ENVIRONMENT, "CNI_COMMAND is not set", _commands_hint())
    if command not in COMMANDS:
        raise CNIError(
            Code.INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}", _commands_hint()
        )
    if command == "VERSION":
        return Invocation(command)
    container_id = _required(env, "CNI_CONTAINERID")
    if not _ID.fullmatch(container_id):
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID {container_id!r} is not a valid container id",
            "it starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    # DEL cleans up what it can without the namespace; ADD and CHECK need it
    netns = env.get("CNI_NETNS", "") if command == "DEL" else _required(env, "CNI_NETNS")
    ifname = _required(env, "CNI_IFNAME")
    if (
        len(ifname) >= _IFNAMSIZ
        or ifname in (".", "..")
        or any(c in "/:" or c.isspace() for c in ifname)
    ):
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_IFNAME {ifname!r} is not a valid interface name",
            "at most 15 characters, not '.' or '..', without '/', ':' or white space",
        )
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    return Invocation(command, container_id, netns, ifname, args)


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"{name} is not set",
            f"{env.get('CNI_COMMAND')} needs {name}; is this run by a CNI runtime?",
        )
    return value


def _commands_hint() -> str:
    return f"supported commands: {', '.join(COMMANDS)}"


# --- the network configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfig:
    cni_version: str
    name: str
    type: str
    agent_socket: str = ""
    node: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    prev_result: JSON | None = None


def parse_config(data: bytes) -> NetworkConfig:
    """Decode and validate the configuration the runtime wrote to stdin."""
    try:
        doc = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CNIError(
            Code.DECODING_FAILURE, "the network configuration on stdin is not JSON", str(exc)
        ) from exc
    if not isinstance(doc, dict):
        raise _invalid("the network configuration must be a JSON object")
    version = _string(doc, "cniVersion", required=True)
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            Code.INCOMPATIBLE_VERSION,
            f"CNI version {version} is not supported",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    name = _string(doc, "name", required=True)
    if not _ID.fullmatch(name):
        raise _invalid(
            f"network name {name!r} is invalid",
            "it starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    ipam = doc.get("ipam")
    if ipam:
        raise CNIError(
            Code.UNSUPPORTED_FIELD,
            f"unsupported field ipam: {json.dumps(ipam)}",
            "the membrane datapath agent allocates pod addresses; remove ipam",
        )
    prev_result = doc.get("prevResult")
    if prev_result is not None and not isinstance(prev_result, dict):
        raise _invalid("prevResult must be an object")
    return NetworkConfig(
        cni_version=version,
        name=name,
        type=_string(doc, "type", required=True),
        agent_socket=_string(doc, "agentSocket"),
        node=_string(doc, "node"),
        labels=_labels(doc.get("args")),
        prev_result=prev_result,
    )


def _string(doc: JSON, key: str, *, required: bool = False) -> str:
    value = doc.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _invalid(
            f"{key} must be a non-empty string" if required else f"{key} must be a string"
        )
    return value


def _labels(args: object) -> dict[str, str]:
    """Pod labels from ``args.labels`` and ``args.cni.labels`` (the latter wins)."""
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise _invalid("args must be an object")
    cni = args.get("cni")
    if cni is not None and not isinstance(cni, dict):
        raise _invalid("args.cni must be an object")
    labels = _label_set(args.get("labels"), "args.labels")
    if cni is not None:
        labels.update(_label_set(cni.get("labels"), "args.cni.labels"))
    return labels


def _label_set(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return dict(value)
    # the CNI conventions' form: [{"key": "app", "value": "web"}, ...]
    if isinstance(value, list) and all(
        isinstance(item, dict)
        and set(item) == {"key", "value"}
        and isinstance(item["key"], str)
        and isinstance(item["value"], str)
        for item in value
    ):
        return {item["key"]: item["value"] for item in value}
    raise _invalid(
        f"{where} must map label keys to string values",
        'as {"app": "web"} or [{"key": "app", "value": "web"}]',
    )


def _invalid(msg: str, details: str = "") -> CNIError:
    return CNIError(Code.INVALID_NETWORK_CONFIG, msg, details)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# --- talking to the agent ----------------------------------------------------------------------


def agent_socket(conf: NetworkConfig, env: Mapping[str, str]) -> Path:
    if conf.agent_socket:
        return Path(conf.agent_socket)
    if env.get("MEMBRANE_AGENT_SOCKET"):
        return Path(env["MEMBRANE_AGENT_SOCKET"])
    # Kubernetes node names are the lowercased host name
    node = conf.node or env.get("MEMBRANE_NODE") or os.uname().nodename.lower()
    return agent_api.default_socket(node)


def _call(socket: Path, op: str, body: Message, reply_type: type[R]) -> R:
    """One agent request; the agent's errors are re-raised as they came (MembraneError)."""
    try:
        return asyncio.run(agent_api.call(socket, op, body, reply_type, AGENT_TIMEOUT))
    except ConnectionError as exc:  # reset or broken pipe after the connection was accepted
        raise Unavailable(f"lost the connection to the datapath agent at {socket}: {exc}") from exc
    except PermissionError as exc:
        raise CNIError(
            Code.IO_FAILURE,
            f"no permission to use the datapath agent's socket {socket}",
            "the socket is private to root; the runtime must run plugins as root",
        ) from exc
    except OSError as exc:
        raise CNIError(
            Code.IO_FAILURE, f"cannot reach the datapath agent at {socket}: {exc}"
        ) from exc
    except msgspec.DecodeError as exc:
        raise CNIError(
            Code.IO_FAILURE,
            f"the datapath agent at {socket} sent a reply to {op} this plugin cannot read",
            str(exc),
        ) from exc


def _agent_error(exc: MembraneError, socket: Path) -> CNIError:
    if isinstance(exc, Unavailable | DeadlineExceeded):
        return CNIError(
            Code.TRY_AGAIN_LATER,
            exc.message,
            f"is the membrane datapath agent running on this node and listening on {socket}?",
        )
    if isinstance(exc, NotFound):
        return CNIError(Code.UNKNOWN_CONTAINER, str(exc))
    if isinstance(exc, InvalidArgument | AlreadyExists):
        return CNIError(Code.INVALID_NETWORK_CONFIG, str(exc), f"the agent answered {exc.code}")
    return CNIError(Code.IO_FAILURE, str(exc), f"the datapath agent at {socket} failed: {exc.code}")


# --- commands ----------------------------------------------------------------------------------


def version_info() -> JSON:
    return {"cniVersion": SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def pod_of(inv: Invocation) -> tuple[str, str]:
    """Namespace and name of the pod: from the Kubernetes CNI_ARGS, else the container id."""
    namespace = inv.args.get("K8S_POD_NAMESPACE") or "default"
    name = inv.args.get("K8S_POD_NAME") or name_from_container_id(inv.container_id)
    try:
        validate_dns_label(namespace, "K8S_POD_NAMESPACE")
        validate_dns_subdomain(name, "K8S_POD_NAME")
    except InvalidArgument as exc:
        raise CNIError(Code.INVALID_ENVIRONMENT, f"CNI_ARGS {exc}") from exc
    return namespace, name


def name_from_container_id(container_id: str) -> str:
    """A valid pod name (DNS subdomain) for a container outside Kubernetes."""
    parts = (part.strip("-") for part in container_id.lower().replace("_", "-").split("."))
    return ".".join(part for part in parts if part)[:253].rstrip("-.")


def add(inv: Invocation, conf: NetworkConfig, socket: Path) -> JSON:
    namespace, name = pod_of(inv)
    request = AddEndpoint(
        namespace=namespace,
        name=name,
        labels=conf.labels,
        netns=inv.netns,
        ifname=inv.ifname,
        container_id=inv.container_id,
        owner=OWNER,
    )
    try:
        endpoint = _call(socket, "endpoint.add", request, Endpoint)
    except MembraneError as exc:
        raise _agent_error(exc, socket) from exc
    return result_of(endpoint, inv, conf.cni_version)


def result_of(endpoint: Endpoint, inv: Invocation, cni_version: str) -> JSON:
    """The ADD result in the shape of ``cni_version`` (before 1.0.0, ips carry a version)."""
    interfaces: list[JSON] = []
    if endpoint.host_ifname:  # the host side of the veth; its MAC is not reported
        interfaces.append({"name": endpoint.host_ifname})
    pod: JSON = {"name": inv.ifname}
    if endpoint.mac:
        pod["mac"] = endpoint.mac
    pod["sandbox"] = inv.netns
    interfaces.append(pod)
    address = ipaddress.ip_address(endpoint.ip)
    ip: JSON = {"address": f"{address}/{address.max_prefixlen}", "interface": len(interfaces) - 1}
    if _version_tuple(cni_version) < (1, 0, 0):
        ip["version"] = str(address.version)
    default = "0.0.0.0/0" if address.version == 4 else "::/0"
    return {
        "cniVersion": cni_version,
        "interfaces": interfaces,
        "ips": [ip],
        "routes": [{"dst": default}],
        "dns": {},
    }


def delete(inv: Invocation, socket: Path) -> None:
    try:
        _call(socket, "endpoint.delete", EndpointRef(container_id=inv.container_id), Endpoint)
    except NotFound:
        log.get("cni").debug("nothing to delete", container_id=inv.container_id)
    except MembraneError as exc:
        raise _agent_error(exc, socket) from exc


def check(inv: Invocation, conf: NetworkConfig, socket: Path) -> None:
    if _version_tuple(conf.cni_version) < (0, 4, 0):
        raise CNIError(
            Code.INCOMPATIBLE_VERSION,
            f"CHECK is not defined for CNI version {conf.cni_version}",
            "CHECK needs cniVersion 0.4.0 or later",
        )
    try:
        endpoint = _call(
            socket, "endpoint.get", EndpointRef(container_id=inv.container_id), Endpoint
        )
    except NotFound as exc:
        raise CNIError(
            Code.UNKNOWN_CONTAINER,
            f"container {inv.container_id} has no endpoint on this node",
            str(exc),
        ) from exc
    except MembraneError as exc:
        raise _agent_error(exc, socket) from exc
    problems: list[str] = []
    if "K8S_POD_NAME" in inv.args:
        namespace, name = pod_of(inv)
        if (endpoint.namespace, endpoint.name) != (namespace, name):
            problems.append(
                f"it is pod {endpoint.namespace}/{endpoint.name}, not {namespace}/{name}"
            )
    if endpoint.ifname != inv.ifname:
        problems.append(f"its interface is {endpoint.ifname}, not {inv.ifname}")
    if not same_netns(endpoint.netns, inv.netns):
        problems.append(f"its network namespace is {endpoint.netns}, not {inv.netns}")
    if conf.prev_result is not None:
        addresses = _prev_addresses(conf.prev_result)
        if ipaddress.ip_address(endpoint.ip) not in addresses:
            listed = ", ".join(str(a) for a in addresses) or "none"
            problems.append(f"its address {endpoint.ip} is not in prevResult ({listed})")
    if problems:
        raise CNIError(
            Code.CHECK_MISMATCH,
            f"the endpoint of container {inv.container_id} is not as expected",
            "; ".join(problems),
        )


def same_netns(a: str, b: str) -> bool:
    """Whether two paths name one network namespace (e.g. /proc/PID/ns/net and a bind mount)."""
    if a == b:
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _prev_addresses(prev: JSON) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise _invalid("prevResult.ips must be a list")
    addresses = []
    for index, entry in enumerate(ips):
        raw = entry.get("address") if isinstance(entry, dict) else None
        try:
            addresses.append(ipaddress.ip_interface(raw if isinstance(raw, str) else "").ip)
        except ValueError as exc:
            raise _invalid(
                f"prevResult.ips[{index}].address {raw!r} is not an address/prefix"
            ) from exc
    return addresses


# --- entry point -------------------------------------------------------------------------------


def run(env: Mapping[str, str], read_stdin: Callable[[], bytes]) -> tuple[int, JSON | None]:
    """One plugin run: the exit status and the document for stdout (None: print nothing)."""
    cni_version = SPEC_VERSION
    logger = log.get("cni", command=env.get("CNI_COMMAND", ""))
    try:
        inv = parse_invocation(env)
        if inv.command == "VERSION":
            return 0, version_info()
        logger = logger.bind(container_id=inv.container_id)
        try:
            data = read_stdin()
        except OSError as exc:
            raise CNIError(
                Code.IO_FAILURE, f"cannot read the network configuration: {exc}"
            ) from exc
        conf = parse_config(data)
        cni_version = conf.cni_version
        socket = agent_socket(conf, env)
        if inv.command == "ADD":
            return 0, add(inv, conf, socket)
        if inv.command == "DEL":
            delete(inv, socket)
        else:
            check(inv, conf, socket)
        return 0, None
    except CNIError as exc:
        logger.warning("cni command failed", code=int(exc.code), msg=exc.msg, details=exc.details)
        return 1, exc.to_json(cni_version)
    except Exception as exc:  # a bug: the runtime still gets an error document, not a traceback
        logger.exception("cni plugin crashed")
        error = CNIError(Code.IO_FAILURE, f"membrane-cni failed: {exc!r}")
        return 1, error.to_json(cni_version)


def main() -> int:
    log.configure(level=os.environ.get("MEMBRANE_LOG_LEVEL", "warning"), fmt="json")
    status, document = run(os.environ, sys.stdin.buffer.read)
    if document is not None:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
