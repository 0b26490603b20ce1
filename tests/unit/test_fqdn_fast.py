"""The agent's DNS fast path (services/datapath/fqdn_fast.py) on plain dicts, and its socket."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import msgspec
import pytest

from services.datapath.fqdn_fast import REQUESTS, FQDNFast
from services.datapath.ipcache_sync import IPCacheSync
from services.datapath.maps import EndpointInfo, IPCacheValue
from services.datapath.policy_sync import LocalEndpoint, PolicySync
from shared import agent_api, identities
from shared.agent_api import FQDNLearn, FQDNLearnReply
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.fqdn import parse
from shared.messages import (
    Endpoint,
    FQDNAddress,
    FQDNName,
    IPCacheEntry,
    PolicyEntry,
    ResolvedPolicy,
)
from shared.peer_sets import expand
from shared.policy_map import PolicyKey, PolicyValue, compile_endpoint

POD, OTHER_NODES_POD = "10.0.1.4", "10.0.2.4"
SET = 77  # the toFQDNs peer set of matchName api.example.com
NOW = 1000.0
ADDR = "198.51.100.20"
NET = IPv4Network(f"{ADDR}/32")
NUMBER = identities.LOCAL_BASE | identities.cidr_slot(NET)


class Node:
    def __init__(self) -> None:
        self.policy_map: dict[PolicyKey, PolicyValue] = {}
        self.ipcache_map: dict[IPv4Network, IPCacheValue] = {}
        endpoint_map = {7: EndpointInfo(300, IPv4Address(POD), 0)}
        self.policy = PolicySync(self.policy_map, endpoint_map)
        self.ipcache = IPCacheSync(self.ipcache_map)
        self.fast = FQDNFast(self.policy, self.ipcache)
        self.endpoints = {
            "default.client": Endpoint("default", "client", "n1", POD, 300, {}, host_ifindex=7)
        }
        entry = PolicyEntry(selector=SET, protocol=6, port=80)
        self.policy.set_resolved(
            300, ResolvedPolicy(identity=300, revision=1, egress_enforced=True, egress=[entry])
        )
        self.policy.upsert_endpoint(LocalEndpoint(7, 300))
        self.set_members(())

    def set_members(self, members: tuple[int, ...]) -> None:
        self.policy.set_peer_set(SET, members)
        self.fast.on_peer_set(SET, parse({"matchName": "api.example.com"}, "f"), frozenset(members))

    def policy_service_ipcache(self, number: int, address: str = ADDR) -> None:
        key = f"_policy.{address}/32"
        self.ipcache.apply(key, IPCacheEntry(cidr=f"{address}/32", identity=number, node=""))
        self.fast.on_ipcache(IPv4Network(f"{address}/32"))

    def allowed(self, number: int = NUMBER) -> bool:
        return any(k.endpoint == 7 and k.identity == number for k in self.policy_map)

    def learn(
        self, *addresses: str, name: str = "api.example.com", ttl: float = 60
    ) -> FQDNLearnReply:
        found = [FQDNAddress(a, NOW + ttl, 1.0) for a in addresses]
        return self.fast.learn(FQDNLearn(POD, [FQDNName(name, found)]), self.endpoints, NOW)


def test_learned_addresses_are_in_the_maps_when_learn_returns() -> None:
    node = Node()
    assert node.learn(ADDR) == FQDNLearnReply(installed=[ADDR])
    assert node.ipcache_map[NET] == IPCacheValue(NUMBER)
    assert node.allowed()
    # a name no toFQDNs selector of the pod's policy matches: nothing to do, nothing done
    assert node.learn("198.51.100.30", name="evil.example.org") == FQDNLearnReply()
    assert IPv4Network("198.51.100.30/32") not in node.ipcache_map


def test_the_cluster_path_neither_fights_nor_keeps_what_it_removes() -> None:
    node = Node()
    node.learn(ADDR)
    node.set_members((999,))  # an update of the set that does not have the address yet
    assert node.allowed(), "the policy service's older view removed the fast path's entry"
    node.policy_service_ipcache(NUMBER)
    node.set_members((999, NUMBER))  # confirmed: the fast path's copy goes, the maps stay
    assert node.fast.learned == {} and node.policy.learned == {} and node.ipcache.learned == {}
    assert node.allowed() and node.ipcache_map[NET] == IPCacheValue(NUMBER)
    node.set_members((999,))  # the name expired: the policy service takes it out
    node.ipcache.apply(f"_policy.{ADDR}/32", None)
    node.fast.on_ipcache(NET)
    assert not node.allowed() and NET not in node.ipcache_map


def test_what_the_cluster_path_never_confirms_goes_at_its_expiry() -> None:
    node = Node()
    node.learn(ADDR, ttl=5)
    assert node.fast.expire(NOW + 5) == 0  # the grace (1 s) is not over
    assert node.fast.expire(NOW + 6.5) == 1
    assert not node.allowed() and NET not in node.ipcache_map


def test_the_policy_services_number_wins() -> None:
    node = Node()
    node.learn(ADDR)
    other = identities.LOCAL_BASE | 12345
    node.policy_service_ipcache(other)
    assert node.ipcache_map[NET] == IPCacheValue(other) and not node.allowed(NUMBER)
    # and a number another network holds is not taken: left to the cluster path
    node2 = Node()
    node2.ipcache.apply("_policy.203.0.113.0/24",
                        IPCacheEntry(cidr="203.0.113.0/24", identity=NUMBER, node=""))  # fmt: skip
    assert node2.learn(ADDR) == FQDNLearnReply(pending=[ADDR])
    assert not node2.allowed()


def test_a_forgotten_address_leaves_the_fast_path() -> None:
    node = Node()
    node.learn(ADDR)
    node.learn(ADDR, ttl=-10)  # expires and grace in the past: fqdn cache clean
    assert not node.allowed() and NET not in node.ipcache_map


@pytest.mark.parametrize(
    ("endpoint_ip", "names", "error", "field"),
    [
        (OTHER_NODES_POD, [], NotFound, "endpoint_ip"),  # another node's pod: nothing here
        ("nope", [], InvalidArgument, "endpoint_ip"),
        (POD, [FQDNName("bad name!", [])], InvalidArgument, "names[0].name"),
        (
            POD,
            [FQDNName("a.io", [FQDNAddress("1.2.3", NOW + 9)])],
            InvalidArgument,
            "names[0].addresses[0]",
        ),
        (
            POD,
            [FQDNName("a.io", [FQDNAddress("127.0.0.1", NOW + 9)])],
            InvalidArgument,
            "names[0].addresses[0]",
        ),
        (
            POD,
            [FQDNName("a.io", [FQDNAddress(ADDR, float("nan"))])],
            InvalidArgument,
            "names[0].addresses[0]",
        ),
        (
            POD,
            [FQDNName("a.io", [FQDNAddress(ADDR, NOW + 1e9)])],
            InvalidArgument,
            "names[0].addresses[0]",
        ),
        (POD, [FQDNName("a.io", [])] * 65, InvalidArgument, "names"),
    ],
)
def test_bad_requests_change_nothing(
    endpoint_ip: str, names: list[FQDNName], error: type[Exception], field: str
) -> None:
    node = Node()
    before = (dict(node.policy_map), dict(node.ipcache_map))
    good = FQDNName("api.example.com", [FQDNAddress(ADDR, NOW + 60)])
    with pytest.raises(error) as raised:
        node.fast.learn(FQDNLearn(endpoint_ip, [good, *names]), node.endpoints, NOW)
    # the good name comes first: the bad one is names[1]
    assert raised.value.field == field.replace("names[0]", "names[1]")  # type: ignore[attr-defined]
    assert (node.policy_map, node.ipcache_map) == before


def test_the_socket_answers_junk_with_an_error_counts_it_and_goes_on(tmp_path: Path) -> None:
    node = Node()

    async def learn(body: bytes) -> FQDNLearnReply:
        return node.fast.learn(agent_api.decode(body, FQDNLearn), node.endpoints, NOW)

    def errors(code: str) -> float:
        return REQUESTS.labels(code)._value.get()  # type: ignore[attr-defined,no-any-return]

    async def scenario() -> None:
        sock = tmp_path / "fqdn.sock"
        server = await agent_api.serve(
            sock, {"fqdn.learn": learn}, lambda code: REQUESTS.labels(code).inc()
        )
        try:
            before = errors("invalid_argument"), errors("not_found")
            for line in (b"junk\n", b'{"op": "endpoint.add"}\n',
                         b'{"op": "fqdn.learn", "body": {"endpoint_ip": 5}}\n'):  # fmt: skip
                reader, writer = await asyncio.open_unix_connection(sock)
                writer.write(line)
                reply = json.loads(await reader.readline())
                writer.close()
                assert reply["error"]["code"] == "invalid_argument", reply
            with pytest.raises(NotFound):  # a pod of another node: refused
                await agent_api.call(sock, "fqdn.learn", FQDNLearn(OTHER_NODES_POD, []),
                                     FQDNLearnReply, 2)  # fmt: skip
            assert (errors("invalid_argument"), errors("not_found")) == (
                before[0] + 3,
                before[1] + 1,
            )
            request = FQDNLearn(POD, [FQDNName("api.example.com", [FQDNAddress(ADDR, NOW + 60)])])
            reply = await agent_api.call(sock, "fqdn.learn", request, FQDNLearnReply, 2)
            assert reply.installed == [ADDR] and node.allowed()  # still serving
        finally:
            server.close()

    asyncio.run(scenario())


def test_a_set_member_at_a_time_rewrites_only_its_entries_and_ends_as_a_full_compile() -> None:
    # PolicySync recompiles only the peer that came or went (a toFQDNs set grows an address at
    # a time); the result must be what compiling the endpoint whole gives, deny entries and
    # any-peer entries (which merge into each peer's slot) included
    node = Node()
    entries = [
        PolicyEntry(selector=SET, protocol=6, port=80),
        PolicyEntry(selector=SET, protocol=6, port=443, end_port=445),
        PolicyEntry(selector=SET, protocol=17, rule_id=4),
        PolicyEntry(peer=0, protocol=17, port=53, rule_id=5),  # inside the one above
        PolicyEntry(selector=78, protocol=6, port=80, deny=True),
    ]
    node.policy.set_resolved(
        300, ResolvedPolicy(identity=300, revision=2, egress_enforced=True, egress=entries)
    )
    node.policy.set_peer_set(78, (identities.LOCAL_BASE | 3,))
    a, b, c = (identities.LOCAL_BASE | n for n in (1, 2, 3))
    for members in ((a,), (a, b), (a, b, c), (b, c), (c,), ()):
        node.set_members(members)
        resolved = node.policy.resolved[300]
        full = compile_endpoint(7, expand(resolved, node.policy.members), ())
        assert node.policy_map == full, members


def test_the_proxy_asks_the_agent_again_for_an_address_another_name_brought(
    tmp_path: Path,
) -> None:
    # an address answered for a name no toFQDNs selector matches needs nothing; the same
    # address answered later for a name one does match must still go to the agent
    from services.proxy.fqdn_cache import FQDNCaches
    from services.proxy.fqdn_publish import FQDNPublisher
    from services.proxy.view import View

    asked: list[list[str]] = []

    async def learn(body: bytes) -> FQDNLearnReply:
        request = agent_api.decode(body, FQDNLearn)
        asked.append([n.name for n in request.names])
        selected = [a.ip for n in request.names if n.name == "api.example.com" for a in n.addresses]
        return FQDNLearnReply(installed=selected)

    async def scenario() -> None:
        sock = tmp_path / "fqdn.sock"
        server = await agent_api.serve(sock, {"fqdn.learn": learn})
        publisher = FQDNPublisher(
            None,  # type: ignore[arg-type]  # the bucket writer is not started here
            View("n1"),
            FQDNCaches("n1", 0, 1.0, 50),
            2.0,
            sock,
        )
        try:
            assert await publisher.learn(POD, 300, {"other.example.org": ([ADDR], 60)})
            assert await publisher.learn(POD, 300, {"other.example.org": ([ADDR], 60)})
            assert await publisher.learn(POD, 300, {"api.example.com": ([ADDR], 60)})
            assert await publisher.learn(POD, 300, {"api.example.com": ([ADDR], 60)})
        finally:
            server.close()
        assert asked == [["other.example.org"], ["api.example.com"]]

    asyncio.run(scenario())


def test_one_connection_carries_many_requests_answered_in_order(tmp_path: Path) -> None:
    # the proxy's Channel: requests in flight together on one connection, each reply to its
    # own request (the agent answers in order), a late reply to a timed-out request dropped,
    # a closed connection failing what is in flight and the next call connecting again
    connections = 0
    release = asyncio.Event()

    async def echo(body: bytes) -> FQDNLearnReply:
        request = agent_api.decode(body, FQDNLearn)
        if request.endpoint_ip == "10.0.0.99":
            await release.wait()  # a slow request: the ones after it wait (in order)
        return FQDNLearnReply(installed=[request.endpoint_ip])

    async def scenario() -> None:
        nonlocal connections
        sock = tmp_path / "fqdn.sock"
        server = await agent_api.serve(sock, {"fqdn.learn": echo})
        channel = agent_api.Channel(sock)

        async def ask(ip: str, timeout: float = 2.0) -> list[str]:
            reply = await channel.call("fqdn.learn", FQDNLearn(ip, []), FQDNLearnReply, timeout)
            return reply.installed

        try:
            ips = [f"10.0.0.{n}" for n in range(1, 21)]
            assert await asyncio.gather(*(ask(ip) for ip in ips)) == [[ip] for ip in ips]
            first = channel._writer
            with pytest.raises(Unavailable, match="in time"):
                await ask("10.0.0.99", timeout=0.05)
            later = asyncio.ensure_future(ask("10.0.0.30"))
            await asyncio.sleep(0.05)
            assert not later.done()  # behind the slow one
            release.set()
            assert await later == ["10.0.0.30"]  # not the timed-out request's reply
            assert channel._writer is first  # all on one connection
            server.close()
            await server.wait_closed()
            first.close()  # the agent goes away (a restart): in flight fails, then reconnects
            await asyncio.sleep(0.05)
            with pytest.raises(Unavailable):
                await ask("10.0.0.31")
            server = await agent_api.serve(sock, {"fqdn.learn": echo})
            assert await ask("10.0.0.32") == ["10.0.0.32"]
            assert channel._writer is not first
        finally:
            channel.close()
            server.close()

    asyncio.run(scenario())


def test_the_bucket_write_waits_until_the_answer_is_released(tmp_path: Path) -> None:
    # the fqdn bucket write is the cluster-wide path's work: with the agent's acknowledgement
    # it comes after the answer is released, never while the answer waits; without the agent
    # the answer waits for the cluster path, which needs the write at once
    from services.proxy.fqdn_cache import FQDNCaches
    from services.proxy.fqdn_publish import FQDNPublisher
    from services.proxy.view import View

    puts: list[str] = []
    seen_by_agent: list[list[str]] = []

    class Bucket:
        async def put(self, key: str, value: bytes) -> None:
            puts.append(key)

    async def learn(body: bytes) -> FQDNLearnReply:
        seen_by_agent.append(list(puts))
        await asyncio.sleep(0.02)  # the agent's map writes, time for a writer to run
        request = agent_api.decode(body, FQDNLearn)
        return FQDNLearnReply(installed=[a.ip for n in request.names for a in n.addresses])

    async def scenario() -> None:
        sock = tmp_path / "fqdn.sock"
        server = await agent_api.serve(sock, {"fqdn.learn": learn})
        caches = FQDNCaches("n1", 0, 1.0, 50)
        fast = FQDNPublisher(Bucket(), View("n1"), caches, 2.0, sock)  # type: ignore[arg-type]
        waiting = View("n1")  # the pod's policy names a toFQDNs set the address is not in
        entry = PolicyEntry(selector=SET, protocol=6, port=80)
        waiting.set_resolved("300", msgspec.json.encode(ResolvedPolicy(300, 1, egress=[entry])))
        no_agent = tmp_path / "none"
        slow = FQDNPublisher(Bucket(), waiting, caches, 0.1, no_agent)  # type: ignore[arg-type]
        slow.fqdn_sets[SET] = parse({"matchName": "api.example.com"}, "f")
        writers = [asyncio.ensure_future(p.write_caches()) for p in (fast, slow)]
        try:
            assert await fast.learn(POD, 300, {"api.example.com": ([ADDR], 60)})
            assert seen_by_agent == [[]] and puts == []  # released before any write
            await asyncio.sleep(0.01)
            assert puts == ["n1.10.0.1.4"]  # then written
            # no agent: the answer waits for the cluster path (here, in vain: SERVFAIL),
            # whose bucket write goes out meanwhile
            assert not await slow.learn(POD, 300, {"api.example.com": (["198.51.100.21"], 60)})
            assert puts == ["n1.10.0.1.4"] * 2
        finally:
            for writer in writers:
                writer.cancel()
            fast.agent.close()  # type: ignore[union-attr]
            server.close()

    asyncio.run(scenario())
