"""``policy diff`` at scale: 100,000 recorded flows and 1,000 policies, as the service runs it.

The cluster and policies are bench/policy.py's (10,000 identities, 50 per namespace; 1,000
policies of the mix: CNP, NetworkPolicy, CIDR, entities). 100,000 enriched flows between pods
of the same namespace (and some to world addresses) on a few ports, FORWARDED and DROPPED, are
counted into groups as each monitor replica does (``shared.flow_groups``), then replayed by
``services.policy.diff.diff`` with a candidate file: one document replacing a stored policy, one
new, and a default-deny-ingress NetworkPolicy in every tenth namespace. Times: grouping, and
the diff (the file applied to the resolver for the call, replay, put back).

    python bench/policy_diff.py [--flows 100000] [--policies 1000] [--identities 10000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.policy import PER_NAMESPACE, fill, make_identities, make_policy, parse_set
from services.policy.diff import diff
from services.policy.resolver import Resolver
from shared import flow_groups
from shared.flow_api import EnrichedFlow, FlowPeer
from shared.identities import CLUSTER_MIN, WORLD

GOAL_SECONDS = 2.0
PORTS = (80, 443, 5432, 6379, 8080)


def make_flows(
    count: int, identities: dict[int, list[str]], kinds: int, seed: int = 7
) -> list[EnrichedFlow]:
    """``count`` flows of ``kinds`` connection kinds (source, destination, port), repeated."""
    rng = random.Random(seed)
    numbers = sorted(identities)

    def peer(number: int, port: int) -> FlowPeer:
        labels = identities[number]
        ns = next(lab.split("=", 1)[1] for lab in labels if "pod.namespace=" in lab)
        pod = f"pod-{number}-{rng.randrange(3)}"
        return FlowPeer(namespace=ns, pod=pod, identity=number, labels=labels, port=port)

    connections = []
    for _ in range(kinds):
        src = rng.choice(numbers)
        base = CLUSTER_MIN + (src - CLUSTER_MIN) // PER_NAMESPACE * PER_NAMESPACE
        port = rng.choice(PORTS)
        if rng.random() < 0.05:
            address = f"203.0.{rng.randrange(4)}.{rng.randrange(256)}"
            destination = FlowPeer(ip=address, identity=WORLD, port=443)
        else:
            destination = peer(base + rng.randrange(PER_NAMESPACE), port)
        connections.append((peer(src, 0), destination, rng.random() < 0.3))
    flows = []
    for i in range(count):
        source, destination, dropped = rng.choice(connections)
        source = FlowPeer(**{**msgspec.structs.asdict(source), "port": 40_000 + i % 20_000})
        flows.append(
            EnrichedFlow(
                time=1_000.0 + i * 0.001,
                node="node-1",
                type="drop" if dropped else "trace",
                verdict="DROPPED" if dropped else "FORWARDED",
                drop_reason=133 if dropped else 0,
                protocol="TCP",
                source=source,
                destination=destination,
            )
        )
    return flows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--kinds", type=int, default=10_000, help="distinct connections")
    args = parser.parse_args()
    identities = make_identities(args.identities)
    namespaces = args.identities // PER_NAMESPACE
    stored = parse_set([make_policy(j, namespaces) for j in range(args.policies)])
    live = Resolver()
    fill(live, identities, stored.policies)
    # the file: a changed version of stored policy 0 (a different mix entry) and a new one
    replacement = make_policy(args.policies, namespaces)
    replacement["metadata"] = dict(stored.documents[0]["metadata"])
    # ... and default-deny ingress in a tenth of the namespaces: many identities, many changes
    lockdown = [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": f"ns-{n:03d}"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        }
        for n in range(0, namespaces, 10)
    ]
    documents = [replacement, make_policy(args.policies + 1, namespaces), *lockdown]
    candidate = parse_set(documents).policies
    flows = make_flows(args.flows, identities, args.kinds)

    started = time.perf_counter()
    groups = flow_groups.merge(flow_groups.group(flows))
    grouped = time.perf_counter()
    changes, affected = diff(live, candidate, groups, {})
    done = time.perf_counter()

    total = done - started
    met = "met" if total <= GOAL_SECONDS else "NOT met"
    print(f"policy diff: {args.flows:,} flows, {args.policies:,} policies,", end=" ")
    print(f"{args.identities:,} identities")
    print(f"  grouping (the monitor's part)  {grouped - started:6.3f} s -> {len(groups):,} groups")
    print(f"  diff (the policy service's)    {done - grouped:6.3f} s ->", end=" ")
    print(f"{len(affected):,} identities affected, {len(changes):,} groups change")
    print(f"  total                          {total:6.3f} s (goal <= {GOAL_SECONDS:g} s: {met})")


if __name__ == "__main__":
    main()
