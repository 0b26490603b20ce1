"""The agent's CNI conflist: written whole, what the plugin needs, removed without a trace."""

from __future__ import annotations

import json
from pathlib import Path

from services.datapath import cni_conf
from shared import cni


def test_written_atomically_and_removed(tmp_path: Path) -> None:
    directory = tmp_path / "net.d"
    socket = Path("/run/membrane/node-1/agent.sock")
    path = cni_conf.write(directory, socket)
    assert path.name == "05-membrane.conflist"
    assert sorted(p.name for p in directory.iterdir()) == [path.name]  # no temporary left
    document = json.loads(path.read_text())
    assert document["cniVersion"] in cni.SUPPORTED_VERSIONS
    (plugin,) = document["plugins"]
    assert plugin == {"type": "membrane-cni", "agentSocket": str(socket)}
    # what the plugin reads from it
    conf = cni.parse_config(json.dumps({**plugin, "cniVersion": "1.0.0", "name": "x"}).encode())
    assert conf.agent_socket == str(socket)
    cni_conf.write(directory, socket)  # again: replaced in place
    cni_conf.remove(directory)
    cni_conf.remove(directory)  # already gone: fine
    assert list(directory.iterdir()) == []
