"""The CNI plugin: environment and configuration checks, error documents, and the agent calls.

The agent is a real unix-socket server speaking ``shared.agent_api`` (our own protocol), with
in-memory endpoints, so nothing here needs root or a running cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import agent_api, cni
from shared.agent_api import AddEndpoint, EndpointRef
from shared.cni import CNIError, Code, Invocation, NetworkConfig
from shared.errors import AlreadyExists, Internal, MembraneError, NotFound, Unavailable
from shared.messages import Endpoint, Message

REPO = Path(__file__).resolve().parents[2]
CONTAINER = "5f1c2a9be0d34c1f8e7a6b5c4d3e2f10"
NETNS = "/var/run/netns/cni-1234"


# --- a small agent ------------------------------------------------------------------------------


class FakeAgent:
    """Answers endpoint.add/get/delete like the datapath agent, from memory."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}  # by container id
        self.requests: list[tuple[str, Message]] = []
        self.fail_with: MembraneError | None = None

    def handlers(self) -> dict[str, agent_api.Handler]:
        return {"endpoint.add": self._add, "endpoint.get": self._get, "endpoint.delete": self._del}

    async def _add(self, body: bytes) -> Message:
        req = agent_api.decode(body, AddEndpoint)
        self.requests.append(("endpoint.add", req))
        if self.fail_with is not None:
            raise self.fail_with
        existing = self.endpoints.get(req.container_id)
        if existing is not None:
            return existing
        endpoint = Endpoint(
            namespace=req.namespace,
            name=req.name,
            node="node-1",
            ip=f"10.244.1.{len(self.endpoints) + 2}",
            identity=300,
            labels=req.labels,
            netns=req.netns,
            ifname=req.ifname,
            host_ifname="lxc0123456789a",
            host_ifindex=42,
            mac="0a:58:0a:f4:01:02",
            container_id=req.container_id,
            owner=req.owner,
        )
        self.endpoints[req.container_id] = endpoint
        return endpoint

    def _find(self, ref: EndpointRef) -> Endpoint:
        if self.fail_with is not None:
            raise self.fail_with
        endpoint = self.endpoints.get(ref.container_id)
        if endpoint is None:
            raise NotFound(f"no pod with container id {ref.container_id} on node node-1")
        return endpoint

    async def _get(self, body: bytes) -> Message:
        ref = agent_api.decode(body, EndpointRef)
        self.requests.append(("endpoint.get", ref))
        return self._find(ref)

    async def _del(self, body: bytes) -> Message:
        ref = agent_api.decode(body, EndpointRef)
        self.requests.append(("endpoint.delete", ref))
        return self.endpoints.pop(self._find(ref).container_id)


@contextlib.contextmanager
def serving(agent: FakeAgent, socket: Path) -> Iterator[None]:
    """Serve ``agent`` on ``socket`` from a thread, so the plugin's own asyncio.run can call it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        agent_api.serve(socket, agent.handlers()), loop
    ).result(5)

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="cni", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(short_dir: Path) -> Iterator[tuple[FakeAgent, Path]]:
    fake = FakeAgent()
    socket = short_dir / "agent.sock"
    with serving(fake, socket):
        yield fake, socket


# --- helpers -----------------------------------------------------------------------------------


def env_for(command: str, **overrides: str | None) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": CONTAINER,
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def config(socket: Path | str = "/nonexistent/agent.sock", **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "membrane",
        "type": "membrane-cni",
        "agentSocket": str(socket),
        **extra,
    }


def run(env: dict[str, str], conf: Any) -> tuple[int, dict[str, Any] | None]:
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    return cni.run(env, lambda: data)


def run_plugin(env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """The plugin as a runtime executes it: a process, env vars, JSON on stdin."""
    full = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "shared.cni"],
        input=stdin,
        env=full,
        capture_output=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def error_of(result: tuple[int, dict[str, Any] | None]) -> dict[str, Any]:
    status, doc = result
    assert status != 0
    assert doc is not None
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}
    assert isinstance(doc["msg"], str) and doc["msg"]
    return doc


# --- VERSION -----------------------------------------------------------------------------------


def test_version_needs_nothing_but_the_command() -> None:
    proc = run_plugin({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


def test_version_does_not_read_stdin() -> None:
    def unread() -> bytes:
        raise AssertionError("VERSION read stdin")

    assert cni.run({"CNI_COMMAND": "VERSION"}, unread) == (0, cni.version_info())


# --- the environment ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_NETNS"),
        ("ADD", "CNI_IFNAME"),
        ("CHECK", "CNI_CONTAINERID"),
        ("CHECK", "CNI_NETNS"),
        ("CHECK", "CNI_IFNAME"),
        ("DEL", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME"),
    ],
)
def test_a_missing_variable_is_error_4_naming_it(command: str, variable: str) -> None:
    doc = error_of(run(env_for(command, **{variable: None}), config()))
    assert doc["code"] == 4
    assert variable in doc["msg"]
    assert doc["cniVersion"] == "1.0.0"


def test_del_needs_no_network_namespace(agent: tuple[FakeAgent, Path]) -> None:
    fake, socket = agent
    assert run(env_for("DEL", CNI_NETNS=None), config(socket)) == (0, None)
    assert fake.requests == [("endpoint.delete", EndpointRef(container_id=CONTAINER))]


@pytest.mark.parametrize(
    "overrides",
    [
        {"CNI_COMMAND": None},
        {"CNI_COMMAND": ""},
        {"CNI_COMMAND": "FROB"},
        {"CNI_COMMAND": "add"},
        {"CNI_COMMAND": "STATUS"},  # CNI 1.1, which this plugin does not claim
        {"CNI_CONTAINERID": "-starts-with-dash"},
        {"CNI_CONTAINERID": "has space"},
        {"CNI_CONTAINERID": "abc\n"},
        {"CNI_IFNAME": "."},
        {"CNI_IFNAME": ".."},
        {"CNI_IFNAME": "sixteen-chars-xx"},
        {"CNI_IFNAME": "eth/0"},
        {"CNI_IFNAME": "eth:0"},
        {"CNI_IFNAME": "eth 0"},
        {"CNI_ARGS": "K8S_POD_NAME"},
        {"CNI_ARGS": "=value"},
        {"CNI_ARGS": "K8S_POD_NAME=web;FOO=bar"},
        {"CNI_ARGS": "IgnoreUnknown=maybe;FOO=bar"},
        {"CNI_ARGS": "K8S_POD_NAMESPACE=Not_A_Label;K8S_POD_NAME=web"},
        {"CNI_ARGS": "K8S_POD_NAME=Web_0"},
    ],
)
def test_an_invalid_environment_is_error_4(overrides: dict[str, str | None]) -> None:
    assert error_of(run(env_for("ADD", **overrides), config()))["code"] == 4


def test_an_unknown_command_lists_the_supported_ones() -> None:
    doc = error_of(run(env_for("FROB"), config()))
    assert doc["msg"] == "unknown CNI_COMMAND 'FROB'"
    assert "ADD, DEL, CHECK, VERSION" in doc["details"]


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("", {}),
        (
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
            {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-0"},
        ),
        ("K8S_POD_NAME=web-0;", {"K8S_POD_NAME": "web-0"}),
        ("K8S_POD_UID=", {"K8S_POD_UID": ""}),
        ("IgnoreUnknown=1;FOO=bar", {"IgnoreUnknown": "1", "FOO": "bar"}),
        ("IgnoreUnknown=true;FOO=a=b", {"IgnoreUnknown": "true", "FOO": "a=b"}),
        (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-abcde;"
            "K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=8b6b1f3e-1111-2222-3333-444455556666",
            {
                "IgnoreUnknown": "1",
                "K8S_POD_NAMESPACE": "kube-system",
                "K8S_POD_NAME": "coredns-5d78c9869d-abcde",
                "K8S_POD_INFRA_CONTAINER_ID": "0123abcd",
                "K8S_POD_UID": "8b6b1f3e-1111-2222-3333-444455556666",
            },
        ),
    ],
)
def test_cni_args_parse(raw: str, parsed: dict[str, str]) -> None:
    assert cni.parse_cni_args(raw) == parsed


@pytest.mark.parametrize("raw", ["FOO=bar", "IgnoreUnknown=0;FOO=bar", "IgnoreUnknown=false;X=1"])
def test_unknown_cni_args_are_refused_unless_ignored(raw: str) -> None:
    with pytest.raises(CNIError) as caught:
        cni.parse_cni_args(raw)
    assert caught.value.code == Code.INVALID_ENVIRONMENT
    assert "unknown key" in caught.value.msg


def test_the_pod_comes_from_the_kubernetes_args_or_the_container_id() -> None:
    k8s = Invocation(
        "ADD", CONTAINER, NETNS, "eth0", {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-0"}
    )
    assert cni.pod_of(k8s) == ("shop", "web-0")
    bare = Invocation("ADD", CONTAINER, NETNS, "eth0", {})
    assert cni.pod_of(bare) == ("default", CONTAINER)


@pytest.mark.parametrize(
    ("container_id", "name"),
    [
        (CONTAINER, CONTAINER),
        ("My_Container.ID", "my-container.id"),
        ("a._b-.c", "a.b.c"),
        ("x" * 300, "x" * 253),
        ("a" * 252 + "_b", "a" * 252),
    ],
)
def test_a_container_id_becomes_a_valid_pod_name(container_id: str, name: str) -> None:
    assert cni.name_from_container_id(container_id) == name


# --- the network configuration -----------------------------------------------------------------


def test_stdin_that_is_not_json_is_error_6() -> None:
    doc = error_of(run(env_for("ADD"), b"{not json"))
    assert doc["code"] == 6
    doc = error_of(run(env_for("ADD"), b"\xff\xfe"))
    assert doc["code"] == 6


@pytest.mark.parametrize(
    "conf",
    [
        [],
        "membrane",
        {"name": "membrane", "type": "membrane-cni"},
        {"cniVersion": 1, "name": "membrane", "type": "membrane-cni"},
        {"cniVersion": "1.0.0", "type": "membrane-cni"},
        {"cniVersion": "1.0.0", "name": "", "type": "membrane-cni"},
        {"cniVersion": "1.0.0", "name": "bad name", "type": "membrane-cni"},
        {"cniVersion": "1.0.0", "name": "membrane"},
        {"cniVersion": "1.0.0", "name": "membrane", "type": 3},
        config(agentSocket=5),
        config(node=["n"]),
        config(args=[]),
        config(args={"labels": ["app=web"]}),
        config(args={"labels": {"app": 1}}),
        config(args={"cni": "labels"}),
        config(args={"cni": {"labels": [{"key": "app"}]}}),
        config(prevResult=[]),
    ],
)
def test_an_invalid_configuration_is_error_7(conf: Any) -> None:
    assert error_of(run(env_for("ADD"), conf))["code"] == 7


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "1.1.0", "2.0.0", "latest"])
def test_an_unsupported_version_is_error_1(version: str) -> None:
    doc = error_of(run(env_for("ADD"), config(cniVersion=version)))
    assert doc["code"] == 1
    assert version in doc["msg"]
    assert doc["cniVersion"] == "1.0.0"


def test_check_needs_version_0_4_0() -> None:
    doc = error_of(run(env_for("CHECK"), config(cniVersion="0.3.1")))
    assert doc == {
        "cniVersion": "0.3.1",
        "code": 1,
        "msg": "CHECK is not defined for CNI version 0.3.1",
        "details": "CHECK needs cniVersion 0.4.0 or later",
    }


def test_ipam_is_unsupported_and_error_2_names_it() -> None:
    doc = error_of(run(env_for("ADD"), config(ipam={"type": "host-local"})))
    assert doc["code"] == 2
    assert doc["msg"] == 'unsupported field ipam: {"type": "host-local"}'


def test_labels_come_from_args_in_either_form() -> None:
    as_object = cni.parse_config(json.dumps(config(args={"labels": {"app": "web"}})).encode())
    assert as_object.labels == {"app": "web"}
    conventions = {
        "cni": {"labels": [{"key": "app", "value": "db"}, {"key": "tier", "value": "1"}]}
    }
    as_list = cni.parse_config(json.dumps(config(args=conventions)).encode())
    assert as_list.labels == {"app": "db", "tier": "1"}
    both = {"labels": {"app": "web", "team": "a"}, "cni": {"labels": {"app": "db"}}}
    assert cni.parse_config(json.dumps(config(args=both)).encode()).labels == {
        "app": "db",
        "team": "a",
    }


def test_the_socket_is_the_config_then_the_environment_then_the_node() -> None:
    conf = NetworkConfig(cni_version="1.0.0", name="n", type="membrane-cni")
    env = {"MEMBRANE_AGENT_SOCKET": "/env/agent.sock", "MEMBRANE_NODE": "node-env"}
    with_socket = NetworkConfig("1.0.0", "n", "membrane-cni", agent_socket="/conf/agent.sock")
    assert cni.agent_socket(with_socket, env) == Path("/conf/agent.sock")
    assert cni.agent_socket(conf, env) == Path("/env/agent.sock")
    assert cni.agent_socket(conf, {"MEMBRANE_NODE": "node-env"}) == agent_api.default_socket(
        "node-env"
    )
    with_node = NetworkConfig("1.0.0", "n", "membrane-cni", node="node-conf")
    assert cni.agent_socket(with_node, {"MEMBRANE_NODE": "node-env"}) == (
        agent_api.default_socket("node-conf")
    )
    assert cni.agent_socket(conf, {}) == agent_api.default_socket(os.uname().nodename.lower())


# --- the agent ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_no_agent_is_error_11_naming_the_socket(short_dir: Path, command: str) -> None:
    socket = short_dir / "absent.sock"
    doc = error_of(run(env_for(command), config(socket)))
    assert doc["code"] == 11
    assert str(socket) in doc["msg"]


def test_no_agent_as_a_process_prints_only_the_error_on_stdout(short_dir: Path) -> None:
    socket = short_dir / "absent.sock"
    env = {**env_for("ADD"), "MEMBRANE_LOG_LEVEL": "debug"}
    proc = run_plugin(env, json.dumps(config(socket)).encode())
    assert proc.returncode != 0
    doc = json.loads(proc.stdout)  # exactly one JSON document: logs went to stderr
    assert doc["code"] == 11
    assert doc["cniVersion"] == "1.0.0"
    assert str(socket) in doc["msg"]
    assert b"cni command failed" in proc.stderr


def test_add_prints_the_result_in_the_spec_shape(agent: tuple[FakeAgent, Path]) -> None:
    fake, socket = agent
    conf = config(socket, args={"labels": {"app": "web"}})
    proc = run_plugin(env_for("ADD"), json.dumps(conf).encode())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "lxc0123456789a"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:02", "sandbox": NETNS},
        ],
        "ips": [{"address": "10.244.1.2/32", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    assert fake.requests == [
        (
            "endpoint.add",
            AddEndpoint(
                namespace="shop",
                name="web-0",
                labels={"app": "web"},
                netns=NETNS,
                ifname="eth0",
                container_id=CONTAINER,
                owner="cni",
            ),
        )
    ]


def test_add_in_an_older_version_gives_ips_a_version(agent: tuple[FakeAgent, Path]) -> None:
    _, socket = agent
    status, result = run(env_for("ADD"), config(socket, cniVersion="0.4.0"))
    assert status == 0 and result is not None
    assert result["cniVersion"] == "0.4.0"
    assert result["ips"] == [{"address": "10.244.1.2/32", "interface": 1, "version": "4"}]


def test_add_outside_kubernetes_names_the_pod_after_the_container(
    agent: tuple[FakeAgent, Path],
) -> None:
    fake, socket = agent
    status, _ = run(env_for("ADD", CNI_ARGS=None, CNI_CONTAINERID="Abc_1"), config(socket))
    assert status == 0
    (_, request), *_ = fake.requests
    assert isinstance(request, AddEndpoint)
    assert (request.namespace, request.name) == ("default", "abc-1")


def test_a_retried_add_returns_the_same_result(agent: tuple[FakeAgent, Path]) -> None:
    _, socket = agent
    first = run(env_for("ADD"), config(socket))
    assert first[0] == 0
    assert run(env_for("ADD"), config(socket)) == first


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (AlreadyExists("pod shop/web-0 already exists on node node-1", field="name"), 7),
        (Internal("boom"), 5),
        (Unavailable("the identity service did not answer"), 11),
    ],
)
def test_agent_errors_map_to_cni_codes(
    agent: tuple[FakeAgent, Path], error: MembraneError, code: int
) -> None:
    fake, socket = agent
    fake.fail_with = error
    doc = error_of(run(env_for("ADD"), config(socket)))
    assert doc["code"] == code
    assert error.message in doc["msg"]


def test_del_is_success_when_the_agent_knows_no_such_container(
    agent: tuple[FakeAgent, Path],
) -> None:
    fake, socket = agent
    proc = run_plugin(env_for("DEL"), json.dumps(config(socket)).encode())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == b""
    assert fake.requests == [("endpoint.delete", EndpointRef(container_id=CONTAINER))]


def test_del_removes_what_add_made_and_can_be_repeated(agent: tuple[FakeAgent, Path]) -> None:
    fake, socket = agent
    status, result = run(env_for("ADD"), config(socket))
    assert status == 0
    conf = config(socket, prevResult=result)
    assert run(env_for("DEL"), conf) == (0, None)
    assert fake.endpoints == {}
    assert run(env_for("DEL"), conf) == (0, None)


def test_del_reports_an_unreachable_agent(agent: tuple[FakeAgent, Path]) -> None:
    fake, socket = agent
    fake.fail_with = Unavailable("busy")
    assert error_of(run(env_for("DEL"), config(socket)))["code"] == 11


def test_check_passes_for_what_add_made(agent: tuple[FakeAgent, Path]) -> None:
    _, socket = agent
    status, result = run(env_for("ADD"), config(socket))
    assert status == 0
    assert run(env_for("CHECK"), config(socket, prevResult=result)) == (0, None)
    assert run(env_for("CHECK"), config(socket)) == (0, None)  # prevResult is optional here


def test_check_of_an_unknown_container_is_error_3(agent: tuple[FakeAgent, Path]) -> None:
    _, socket = agent
    doc = error_of(run(env_for("CHECK"), config(socket)))
    assert doc["code"] == 3
    assert CONTAINER in doc["msg"]


@pytest.mark.parametrize(
    ("overrides", "prev_address", "problem"),
    [
        ({}, "10.244.1.99/32", "address 10.244.1.2 is not in prevResult (10.244.1.99)"),
        ({"CNI_NETNS": "/var/run/netns/other"}, None, "network namespace"),
        ({"CNI_IFNAME": "net1"}, None, "interface is eth0, not net1"),
        ({"CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"}, None, "not shop/web-1"),
    ],
)
def test_check_finds_a_mismatch(
    agent: tuple[FakeAgent, Path],
    overrides: dict[str, str],
    prev_address: str | None,
    problem: str,
) -> None:
    _, socket = agent
    status, result = run(env_for("ADD"), config(socket))
    assert status == 0 and result is not None
    if prev_address is not None:
        result["ips"][0]["address"] = prev_address
    doc = error_of(run(env_for("CHECK", **overrides), config(socket, prevResult=result)))
    assert doc["code"] == 100
    assert problem in doc["details"]


@pytest.mark.parametrize(
    "ips", ["10.0.0.1", [{"address": "nope"}], [{"address": 167772161}], ["x"]]
)
def test_check_refuses_a_malformed_prev_result(agent: tuple[FakeAgent, Path], ips: Any) -> None:
    _, socket = agent
    assert run(env_for("ADD"), config(socket))[0] == 0
    doc = error_of(run(env_for("CHECK"), config(socket, prevResult={"ips": ips})))
    assert doc["code"] == 7


def test_paths_to_one_namespace_file_are_the_same_namespace(tmp_path: Path) -> None:
    target = tmp_path / "ns"
    target.touch()
    link = tmp_path / "link"
    link.symlink_to(target)
    other = tmp_path / "other"
    other.touch()
    assert cni.same_netns(str(target), str(link))
    assert not cni.same_netns(str(target), str(other))
    assert not cni.same_netns("/nonexistent/a", "/nonexistent/b")
