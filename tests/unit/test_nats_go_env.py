"""The Go runtime settings `membrane up` gives nats-server: its own unless the operator set them."""

from __future__ import annotations

import pytest

from membrane.servers import NATS_GO_ENV, nats_go_env


def test_the_collector_settings_unless_set_already(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NATS_GO_ENV:
        monkeypatch.delenv(name, raising=False)
    assert nats_go_env() == {"GOGC": "400", "GOMEMLIMIT": "1GiB"}
    monkeypatch.setenv("GOGC", "off")
    assert nats_go_env() == {"GOMEMLIMIT": "1GiB"}  # the environment's GOGC reaches it as is
