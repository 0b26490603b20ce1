"""Prometheus helpers: one /metrics HTTP endpoint per process, bounded label sets."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Serve /metrics on ``host:port`` in a background thread; returns the bound port.

    Port 0 binds any free port, which is what replicas started side by side want.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])
