"""The local cluster's NATS users: one per role, kept in ``credentials.json`` (mode 0600).

``membrane up`` makes a user for each service replica's role (identity, policy, lb, monitor,
one datapath agent per node) and the administrator the CLI uses; ``membrane credentials
create --role subscriber NAME`` adds one for an external system. nats-server is configured
with every user and its role's permissions (shared/roles.py) and reloads on a change.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
import urllib.parse

import msgspec

from membrane import tls
from membrane.servers import NatsServer, write_secret
from membrane.state import ClusterInfo, StateDir
from shared import roles
from shared.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable

ADMIN_USER = "membrane"  # the CLI's; its password is ClusterInfo.nats_password


class Credential(msgspec.Struct, kw_only=True):
    name: str
    role: str
    password: str
    node: str = ""
    created: float = 0.0
    builtin: bool = False  # made by `up` for a service; `revoke` leaves it alone


def load(state: StateDir) -> dict[str, Credential]:
    try:
        raw = (state.root / "credentials.json").read_bytes()
    except FileNotFoundError:
        return {}
    return {c.name: c for c in msgspec.json.decode(raw, type=list[Credential])}


def save(state: StateDir, creds: dict[str, Credential]) -> None:
    ordered = sorted(creds.values(), key=lambda c: c.name)
    write_secret(state.root / "credentials.json", msgspec.json.format(msgspec.json.encode(ordered)))


def service_user(role: str, node: str = "") -> str:
    return f"{role}-{node}" if node else role


def ensure_builtin(state: StateDir, wanted: list[tuple[str, str]]) -> dict[str, Credential]:
    """A credential for each (role, node) the cluster runs, keeping existing passwords; the
    services of an earlier run that this one does not start (nodes gone) lose theirs."""
    creds = load(state)
    names = {service_user(role, node) for role, node in wanted}
    for name in [n for n, c in creds.items() if c.builtin and n not in names]:
        del creds[name]
    for role, node in wanted:
        name = service_user(role, node)
        if name not in creds:
            creds[name] = Credential(
                name=name,
                role=role,
                node=node,
                password=secrets.token_urlsafe(18),
                created=time.time(),
                builtin=True,
            )
    save(state, creds)
    return creds


def nats_users(creds: dict[str, Credential]) -> list[tuple[str, str, roles.Permissions]]:
    return [(c.name, c.password, roles.permissions(c.role, c.node)) for c in creds.values()]


def url_for(info: ClusterInfo, cred: Credential) -> str:
    """``nats_url`` of the cluster with this credential's user and password."""
    parsed = urllib.parse.urlsplit(info.nats_url)
    host = parsed.hostname or ""
    user, password = (urllib.parse.quote(v, safe="") for v in (cred.name, cred.password))
    query = f"?{parsed.query}" if parsed.query else ""  # with TLS: the CA (servers.py)
    return f"{parsed.scheme}://{user}:{password}@{host}:{parsed.port}{query}"


def create(state: StateDir, role: str, name: str, node: str = "") -> Credential:
    roles.check_user_name(name)
    roles.permissions(role, node)  # the role exists (and has its node)
    creds = load(state)
    if name in creds or name == ADMIN_USER:
        raise AlreadyExists(f"a credential named {name!r} exists", field="name")
    cred = Credential(
        name=name, role=role, node=node, password=secrets.token_urlsafe(18), created=time.time()
    )
    creds[name] = cred
    save(state, creds)
    reload(state)
    return cred


def revoke(state: StateDir, name: str) -> Credential:
    creds = load(state)
    cred = creds.get(name)
    if cred is None:
        raise NotFound(f"no credential named {name!r}", field="name")
    if cred.builtin:
        raise InvalidArgument(
            f"{name!r} is the credential of a service of the cluster; it goes with `down`",
            field="name",
        )
    del creds[name]
    save(state, creds)
    reload(state)
    return cred


def server(state: StateDir, info: ClusterInfo, host: str) -> NatsServer:
    """The cluster's nats-server, with every user of the credentials file."""
    return NatsServer(
        state.root / "nats",
        port=info.nats_port,
        password=info.nats_password,
        host=host,
        users=nats_users(load(state)),
        tls=tls.paths(state.root / "tls") if info.tls else None,
    )


def reload(state: StateDir) -> None:
    """Rewrite nats.conf and make the running nats-server read it (SIGHUP); a removed user's
    connections are closed by the server."""
    info = state.read_cluster()
    if info is None or info.nats_external:
        raise Unavailable("no local cluster with its own NATS in this state directory")
    host = urllib.parse.urlsplit(info.nats_url).hostname or ""
    server(state, info, host).write_config()
    running = [p for p in state.processes() if p.name == "nats-server" and p.running]
    for process in running:
        os.kill(process.pid, signal.SIGHUP)
