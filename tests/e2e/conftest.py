"""The module-scoped ``cluster`` fixture: one `membrane up` per test module, purged after."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.state import StateDir
from tests.e2e.cluster import Cluster, free_octet


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    state = tmp_path_factory.mktemp("cluster") / "state"
    name = "t" + secrets.token_hex(3)
    octet = free_octet()
    c = Cluster(state=state, name=name, nats_url="")
    c.run(
        "up",
        "--name",
        name,
        "--nodes",
        "2",
        "--identity-replicas",
        "1",
        "--underlay-cidr",
        f"172.31.{octet}.0/24",
        "--cluster-cidr",
        f"10.{octet}.0.0/16",
        "--service-cidr",
        f"10.{octet + 1}.0.0/16",
        timeout=180,
    )
    info = StateDir(state).read_cluster()
    assert info is not None
    c.nats_url = info.nats_url
    try:
        yield c
    finally:
        down = c.run("down", "--purge", check=False, timeout=120)
        leftovers = [p.name for p in Path("/run/netns").glob(f"{name}*")]
        pins = list(Path("/sys/fs/bpf/membrane").glob(f"{name}*"))
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert down.returncode == 0, down.stderr
        assert not leftovers, leftovers
        assert not pins, pins
        assert f"{name}-" not in links
