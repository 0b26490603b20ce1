"""membrane on Kubernetes (k8s/): the bus's users and TLS, as ``membrane up`` has them locally.

Least privilege: nats-server knows one user per role that a workload of k8s/ runs as, each with
its role's permissions (shared/roles.py), plus the administrator (the CLI, through a
port-forward), one read-only ``subscriber`` for an external system, and the servers' own
cluster routes. k8s/nats.yaml carries that ``authorization`` block as ``nats_authorization``
renders it (tests/unit/test_k8s_manifests.py keeps the two equal): the passwords are
``$NATS_PASSWORD_<USER>`` variables, which nats-server reads from its environment, filled from
the nats-auth Secret. The per-node roles (datapath, proxy) are one user each for every node
(``*`` in place of the node's token): nats-server's static users cannot be made per node as
the DaemonSet's nodes come and go (on Kubernetes an agent can write any node's keys; readers
still believe each node only for its pod CIDR, shared/ipcache_guard.py). docs/kubernetes.md
says so.

TLS: NATS (clients and cluster routes) and Redis take only TLS, with certificates signed by a
CA of the installation; every client verifies the server by the CA mounted from the
membrane-ca Secret. The CA's key stays where ``membrane k8s secrets`` ran (``--ca-dir``), never
in the cluster: running it again with the same directory renews the certificates under the
same CA, and new passwords.

Nothing secret is in git: ``membrane k8s secrets | kubectl apply -f -`` makes the Secrets.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import yaml

from membrane import tls
from shared import roles

NAMESPACE = "membrane"
# the NATS users of a Kubernetes install, each the name of its role (shared/roles.py)
USERS = (
    "admin",
    "identity",
    "policy",
    "lb",
    "monitor",
    "k8s-bridge",
    "datapath",
    "proxy",
    "subscriber",
)
ANY_NODE = "*"  # the per-node roles' node token: every node
ROUTES_USER = "routes"  # the servers' cluster routes (k8s/nats.yaml)
NATS_REPLICAS = 3  # k8s/nats.yaml's StatefulSet
# where the workloads mount the membrane-ca Secret, and the servers their certificates
CA_FILE = "/etc/membrane/ca/ca.crt"


def password_env(user: str) -> str:
    """The variable holding ``user``'s password in the nats-server and service containers."""
    return "NATS_PASSWORD_" + user.upper().replace("-", "_")


def nats_authorization() -> str:
    """The ``authorization`` block of k8s/nats.yaml's nats.conf (indented as it is there)."""
    out = ["authorization {", "  users: ["]
    for user in USERS:
        permissions = roles.permissions(user, ANY_NODE).render(user)
        # JSON is nats-server configuration; a quoted '$' stays literal, the unquoted password
        # variable is looked up in the environment
        body = json.dumps(permissions, indent=2).replace("\n", "\n      ")
        out.append(f'    {{user: "{user}", password: ${password_env(user)},')
        out.append(f"      permissions: {body}}}")
    out += ["  ]", "}"]
    return "\n".join(out)


def password() -> str:
    """256 random bits in hex (they go into URLs unescaped) after a letter: nats-server parses
    a variable's value from the environment as configuration, and a value that starts with a
    digit is read as a number followed by junk (the server does not start)."""
    return "p" + secrets.token_hex(32)


def _service_names(service: str, namespace: str, domain: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc"] + (
        [f"{service}.{namespace}.svc.{domain}"] if domain else []
    )


def nats_names(namespace: str, domain: str, replicas: int) -> list[str]:
    """What clients dial (the nats Service) and the routes (each server's headless name)."""
    names = _service_names("nats", namespace, domain)
    for i in range(replicas):
        names += _service_names(f"nats-{i}.nats-headless", namespace, domain)
    return names


def _secret(name: str, part: str, data: dict[str, str], kind: str = "Opaque") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": part, "app.kubernetes.io/part-of": "membrane"},
        },
        "type": kind,
        "stringData": data,
    }


def _server_secret(server: str, ca: Path, ca_key: Path, names: list[str]) -> dict[str, Any]:
    key = tls.new_key()
    cert = tls.sign(ca, ca_key, key, [f"DNS:{n}" for n in names])
    return _secret(
        f"{server}-tls",
        server,
        {"tls.crt": cert.decode(), "tls.key": key.decode(), "ca.crt": ca.read_text()},
        "kubernetes.io/tls",
    )


def generate(
    ca_dir: Path, *, domain: str = "cluster.local", nats_replicas: int = NATS_REPLICAS
) -> list[dict[str, Any]]:
    """The Secrets k8s/ uses: nats-auth (a password per user: hex, it goes into URLs
    unescaped), redis-auth, membrane-ca (the CA certificate clients verify with), nats-tls and
    redis-tls (each server's certificate and key)."""
    ca_key = tls.ensure_ca(ca_dir, "membrane Kubernetes CA")
    ca = tls.paths(ca_dir).ca
    passwords = {user: password() for user in (*USERS, ROUTES_USER)}
    return [
        _secret("nats-auth", "nats", passwords),
        _secret("redis-auth", "redis", {"password": password()}),
        _secret("membrane-ca", "membrane", {"ca.crt": ca.read_text()}),
        _server_secret("nats", ca, ca_key, nats_names(NAMESPACE, domain, nats_replicas)),
        _server_secret("redis", ca, ca_key, _service_names("redis", NAMESPACE, domain)),
    ]


def render(documents: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


if __name__ == "__main__":  # the block k8s/nats.yaml carries
    print(nats_authorization())
