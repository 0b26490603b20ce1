"""The module-scoped ``cluster`` fixture: one `membrane up` per test module, purged after."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Cluster, down_leaving_nothing, free_octet, up


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A module may set ``CLUSTER_ENV`` (settings for every process of its cluster)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    state = tmp_path_factory.mktemp("cluster") / "state"
    extra = dict(getattr(request.module, "CLUSTER_ENV", {}))
    c = Cluster(state=state, name="t" + secrets.token_hex(3), nats_url="", extra_env=extra)
    up(c, free_octet())
    try:
        yield c
    finally:
        down_leaving_nothing(c)
