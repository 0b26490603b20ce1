"""A small gRPC service and its client (grpcio, raw bytes: no generated code), run in pods.

    grpcapp.py serve PORT                    -> prints "ready", serves until killed
    grpcapp.py call HOST PORT METHOD[:SIZE]...
        one channel (one HTTP/2 connection), the calls one after the other; a JSON line each:
        {"method", "code", "size"}: the status code's name and the size of the answer
    grpcapp.py session HOST PORT             -> prints "ready", then the same for each METHOD[:SIZE]
        read from stdin, a line each, all on one channel (one HTTP/2 connection)

Service ``empire.DeathStar``: ``RequestLanding`` (answers "Ship landed"), ``ExhaustPort``
(answers "exploded"), ``Echo`` (answers its request, for big messages both ways).
"""

from __future__ import annotations

import json
import sys
from concurrent import futures

import grpc

SERVICE = "empire.DeathStar"
MAX_MESSAGE = 64 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def _landing(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"Ship landed"


def _exhaust(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"exploded"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def serve(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    handlers = {
        "RequestLanding": grpc.unary_unary_rpc_method_handler(_landing),
        "ExhaustPort": grpc.unary_unary_rpc_method_handler(_exhaust),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def _call(channel: grpc.Channel, spec: str) -> None:
    method, _, size = spec.partition(":")
    stub = channel.unary_unary(f"/{SERVICE}/{method}")
    payload = bytes(i % 251 for i in range(int(size or 0)))
    try:
        answer = stub(payload, timeout=20)
        ok = method != "Echo" or answer == payload
        out = {"method": method, "code": "OK" if ok else "CORRUPT", "size": len(answer)}
    except grpc.RpcError as exc:
        out = {"method": method, "code": exc.code().name, "size": 0}
    print(json.dumps(out), flush=True)


def call(host: str, port: str, calls: list[str]) -> None:
    with grpc.insecure_channel(f"{host}:{port}", options=OPTIONS) as channel:
        for spec in calls:
            _call(channel, spec)


def session(host: str, port: str) -> None:
    with grpc.insecure_channel(f"{host}:{port}", options=OPTIONS) as channel:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip():
                _call(channel, line.strip())


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "serve":
        serve(int(args[0]))
    elif command == "session":
        session(args[0], args[1])
    else:
        call(args[0], args[1], args[2:])
