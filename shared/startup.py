"""What every service's ``run()`` does the same way: logging, the bus, metrics, signals.

``membrane run <service>`` and the local cluster pass ``--log-level``/``--log-format`` (or
``MEMBRANE_LOG_*``) to every service; :func:`start` is where they take effect, before the
first line is logged, so each service honours them (tests/integration/test_log_flags.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from nats.js.kv import KeyValue

from shared import log, metrics
from shared.bus import Bus
from shared.config import CommonSettings
from shared.runtime import wait_for_shutdown


@dataclass
class Started:
    """A service process with its logging configured, its bus connected and metrics served."""

    name: str
    replica: str
    settings: CommonSettings
    bus: Bus
    log: Any  # structlog's bound logger
    metrics_port: int

    @property
    def metadata(self) -> dict[str, str]:
        """What the service's NATS micro endpoint announces about this replica."""
        return {
            "replica": self.replica,
            "metrics": f"{self.settings.metrics_host}:{self.metrics_port}",
        }

    async def kv(self, bucket: str, description: str) -> KeyValue:
        """A KV bucket, created with the configured number of copies if it is not there."""
        return await self.bus.kv(
            bucket, description=description, replicas=self.settings.kv_replicas
        )

    async def until_signalled(self, message: str = "shutting down") -> str:
        """Block until SIGTERM or SIGINT, log it, and return the signal's name."""
        signal_name = await wait_for_shutdown()
        self.log.info(message, signal=signal_name)
        return signal_name


def configure_logging(settings: CommonSettings, name: str, replica: str, **context: Any) -> Any:
    """The service's log flags in effect; its logger, with ``context`` bound."""
    log.configure(settings.log_level, settings.log_format, service=name, replica=replica)
    return log.get(name, **context)


async def start(
    settings: CommonSettings, name: str, *, replica: str = "", connection: str = "", **context: Any
) -> Started:
    """Configure logging, connect to NATS and serve /metrics, in that order.

    ``replica`` defaults to ``settings.replica``, else ``<name>-<pid>``; ``connection`` (the
    NATS connection name) to ``membrane-<name>``.
    """
    replica = replica or settings.replica or f"{name}-{os.getpid()}"
    logger = configure_logging(settings, name, replica, **context)
    bus, metrics_port = await attach(settings, connection or f"membrane-{name}")
    return Started(name, replica, settings, bus, logger, metrics_port)


async def attach(settings: CommonSettings, connection: str) -> tuple[Bus, int]:
    """Connect to NATS and serve /metrics: :func:`start` without the logging, for a service
    that tests also start in-process (the monitor), where logging is the test process's."""
    bus = await Bus.connect(settings.nats_url, connection)
    return bus, metrics.serve(settings.metrics_host, settings.metrics_port)
