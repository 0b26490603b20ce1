"""k8s/nats.yaml's and k8s/redis.yaml's server configuration as real nats-server and
redis-server run it, with the Secrets `membrane k8s secrets` makes: each workload's user has
its role's rights and no more, and both servers take only TLS verified by the installation's CA.

The configuration is the ConfigMaps' text; only what a pod's mounts and network give it is
changed (paths of the mounted Secrets and of the data volume, loopback addresses and free
ports). The whole configuration passes ``nats-server -t``; the server then runs without its
``cluster`` block (JetStream in a cluster wants the other servers' routes; the routes' TLS
uses the same files and the same CA)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
import redis.exceptions
import yaml
from nats.errors import NoServersError

from membrane import k8s_secrets
from membrane.servers import LOOPBACK, free_port, require_binary, terminate, wait_for_port
from shared.bus import flush_connection

K8S = Path(__file__).resolve().parents[2] / "k8s"


def _config_map(file: str, name: str, key: str) -> str:
    for doc in yaml.safe_load_all((K8S / file).read_text()):
        if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
            return str(doc["data"][key])
    raise AssertionError(f"no ConfigMap {name} in k8s/{file}")


def _mount(secret: dict[str, str], directory: Path) -> Path:
    """A Secret as the kubelet mounts it: one file per key."""
    directory.mkdir(mode=0o700)
    for key, value in secret.items():
        (directory / key).write_text(value)
    return directory


@dataclass
class Installed:
    nats_port: int
    redis_port: int
    ca: Path
    passwords: dict[str, str]
    redis_password: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("k8s")
    secrets = {d["metadata"]["name"]: d["stringData"] for d in k8s_secrets.generate(tmp / "ca")}
    nats_tls = _mount(secrets["nats-tls"], tmp / "nats-tls")
    redis_tls = _mount(secrets["redis-tls"], tmp / "redis-tls")
    ca = _mount(secrets["membrane-ca"], tmp / "membrane-ca") / "ca.crt"
    nats_port, redis_port = free_port(), free_port()
    replacements = {
        "/etc/nats-tls": str(nats_tls),
        "store_dir: /data": f"store_dir: {tmp / 'js'}",
        "/var/run/nats/nats.pid": str(tmp / "nats.pid"),
        "listen: 0.0.0.0:4222": f"listen: {LOOPBACK}:{nats_port}",
        "http: 0.0.0.0:8222": f"http: {LOOPBACK}:{free_port()}",
        "listen: 0.0.0.0:6222": f"listen: {LOOPBACK}:{free_port()}",
    }
    conf = _config_map("nats.yaml", "nats-config", "nats.conf")
    for old, new in replacements.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    env = {
        **os.environ,
        "POD_NAME": "nats-0",
        **{k8s_secrets.password_env(u): p for u, p in secrets["nats-auth"].items()},
    }
    (tmp / "full.conf").write_text(conf)
    checked = subprocess.run(
        [require_binary("nats-server"), "-t", "-c", str(tmp / "full.conf")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    cluster = conf.index("\ncluster {")
    end = conf.index("\n}\n", cluster) + 3
    (tmp / "nats.conf").write_text(conf[:cluster] + conf[end:])
    redis_conf = _config_map("redis.yaml", "redis-config", "redis.conf")
    for old, new in {
        "bind * -::*": f"bind {LOOPBACK}",
        "tls-port 6379": f"tls-port {redis_port}",
        "/etc/redis-tls": str(redis_tls),
        "dir /data": f"dir {tmp}",
    }.items():
        assert old in redis_conf, old
        redis_conf = redis_conf.replace(old, new)
    (tmp / "redis.conf").write_text(redis_conf)
    redis_password = secrets["redis-auth"]["password"]
    procs = [
        subprocess.Popen(
            [require_binary("nats-server"), "-c", str(tmp / "nats.conf")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "nats.log").open("wb"),
        ),
        subprocess.Popen(
            [
                require_binary("redis-server"),
                str(tmp / "redis.conf"),
                "--requirepass",
                redis_password,
            ],
            stdout=(tmp / "redis.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        wait_for_port(LOOPBACK, nats_port, "nats-server", process=procs[0])
        wait_for_port(LOOPBACK, redis_port, "redis-server", process=procs[1])
        yield Installed(nats_port, redis_port, ca, secrets["nats-auth"], redis_password)
    finally:
        terminate(procs)


async def _connect(installed: Installed, user: str, **options: Any) -> nats.NATS:
    """A client as a workload connects: its role's user, TLS verified with membrane-ca, the
    server's name as the nats Service's (the certificate names no loopback address)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    defaults: dict[str, Any] = {
        "tls": ssl.create_default_context(cafile=str(installed.ca)),
        "tls_hostname": "nats",
        "user": user,
        "password": installed.passwords[user],
        "inbox_prefix": f"_INBOX.{user}",
        "error_cb": on_error,
        "allow_reconnect": False,
        "connect_timeout": 3,
    }
    nc = await nats.connect(f"tls://{LOOPBACK}:{installed.nats_port}", **{**defaults, **options})
    nc.test_errors = errors  # type: ignore[attr-defined]
    return nc


def _told(client: nats.NATS, error: str) -> bool:
    """Whether the server told ``client`` ``error`` (the client reports it on its own task)."""
    errors: list[Exception] = client.test_errors  # type: ignore[attr-defined]
    return any(error.lower() in str(e).lower() for e in errors)


async def _said(client: nats.NATS, error: str) -> None:
    """Until the server has told ``client`` ``error`` (at most 10 s)."""
    for _ in range(500):
        if _told(client, error):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {error!r} error: {client.test_errors}")  # type: ignore[attr-defined]


async def _publish_reaches(installed: Installed, user: str, subject: str) -> bool:
    """Whether a message ``user`` publishes on ``subject`` reaches the administrator: the
    message arrives, or the server tells the publisher it was not allowed. Whichever comes
    first decides; no wait of a fixed length stands for "not delivered"."""
    admin = await _connect(installed, "admin")
    publisher = await _connect(installed, user)
    try:
        sub = await admin.subscribe(subject)
        await flush_connection(admin)  # nats.py's flush may overtake the SUB/PUB
        await publisher.publish(subject, b"x")
        await flush_connection(publisher)  # nats.py's flush may overtake the SUB/PUB
        for _ in range(200):  # 10 s, for a loaded machine; either answer ends it at once
            try:
                await sub.next_msg(timeout=0.05)
                return True
            except nats.errors.TimeoutError:
                if _told(publisher, "Permissions Violation for Publish"):
                    return False
        raise AssertionError(f"{user} on {subject}: neither delivered nor refused in 10 s")
    finally:
        await publisher.close()
        await admin.close()


@pytest.mark.parametrize(
    ("user", "subject", "reaches"),
    [
        ("admin", "$KV.resolved.x", True),  # the control: the check can see a message
        ("monitor", "$KV.resolved.x", False),
        ("subscriber", "$KV.resolved.x", False),
        ("subscriber", "membrane.identity.allocate.node-a", False),
        ("subscriber", "$KV.ipcache.node-a.10_0_0_1", False),
        ("datapath", "$KV.policies.default.p", False),
        ("datapath", "$KV.ipcache.node-a.10_0_0_1", True),  # any node's (docs/kubernetes.md)
        ("monitor", "membrane.policy.apply", False),
        ("k8s-bridge", "$KV.pods.default.web", True),
        ("lb", "$KV.services.default.web", True),
    ],
)
async def test_each_user_has_its_roles_rights(
    installed: Installed, user: str, subject: str, reaches: bool
) -> None:
    assert await _publish_reaches(installed, user, subject) is reaches


async def test_a_subscriber_reads_events_only(installed: Installed) -> None:
    subscriber = await _connect(installed, "subscriber")
    admin = await _connect(installed, "admin")
    try:
        events = await subscriber.subscribe("membrane.events.flows.>")
        await subscriber.subscribe("membrane.policy.>")  # refused by the server
        await flush_connection(subscriber)  # nats.py's flush may overtake the SUB/PUB
        await admin.publish("membrane.events.flows.node-a", b"flow")
        await flush_connection(admin)  # nats.py's flush may overtake the SUB/PUB
        assert (await events.next_msg(timeout=2)).data == b"flow"
        await _said(subscriber, "Permissions Violation for Subscription")
    finally:
        await subscriber.close()
        await admin.close()


async def test_nats_takes_tls_verified_by_the_ca_only(installed: Installed) -> None:
    url = f"{LOOPBACK}:{installed.nats_port}"
    password = installed.passwords["monitor"]
    # plain text: the server requires TLS
    with pytest.raises((NoServersError, OSError, ssl.SSLError, nats.errors.Error)):
        await nats.connect(
            f"nats://monitor:{password}@{url}", allow_reconnect=False, connect_timeout=2
        )
    # TLS verified against the system's CAs, which do not know the installation's
    with pytest.raises((NoServersError, ssl.SSLError, nats.errors.Error)):
        await nats.connect(
            f"tls://monitor:{password}@{url}",
            tls=ssl.create_default_context(),
            tls_hostname="nats",
            allow_reconnect=False,
            connect_timeout=2,
        )
    # a wrong password
    with pytest.raises((NoServersError, nats.errors.Error)):
        await _connect(installed, "monitor", password="0" * 64)
    ok = await _connect(installed, "monitor")
    await ok.close()


def test_the_nats_certificate_names_the_service_and_every_server(installed: Installed) -> None:
    context = ssl.create_default_context(cafile=str(installed.ca))
    for name in ("nats", "nats.membrane.svc", "nats-2.nats-headless", "redis"):
        with socket.create_connection((LOOPBACK, installed.nats_port), timeout=3) as raw:
            raw.recv(4096)  # INFO comes first, in plain text; the handshake follows
            if name == "redis":
                with pytest.raises(ssl.SSLCertVerificationError):
                    context.wrap_socket(raw, server_hostname=name)
            else:
                context.wrap_socket(raw, server_hostname=name).close()


async def test_redis_takes_tls_verified_by_the_ca_only(installed: Installed) -> None:
    context = ssl.create_default_context(cafile=str(installed.ca))
    with socket.create_connection((LOOPBACK, installed.redis_port), timeout=3) as raw:
        context.wrap_socket(raw, server_hostname="redis").close()  # the name clients dial
    base = f":{installed.redis_password}@{LOOPBACK}:{installed.redis_port}/0"
    # the address is not in the certificate: the chain is checked here, the name above
    client = aioredis.Redis.from_url(
        f"rediss://{base}", ssl_ca_certs=str(installed.ca), ssl_check_hostname=False
    )
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    for url in (f"rediss://{base}", f"redis://{base}"):  # the system's CAs; plain text
        refused = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await refused.ping()
        finally:
            await refused.aclose()
