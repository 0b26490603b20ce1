"""structlog setup: JSON lines in production, a readable console on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(level: str = "info", fmt: str = "auto", **context: Any) -> None:
    """Configure structlog (and stdlib logging, for libraries) once per process.

    ``context`` is bound to every line, e.g. ``service="identity"``, ``node="node-1"``.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # one write per line, the newline with it: processes sharing one log file (the proxy's
        # leader and workers) never run two lines together (print wrote the newline apart)
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)


def get(name: str | None = None, **context: Any) -> Any:
    # get_logger stays lazy, so module-level loggers pick up configure() called later
    return structlog.get_logger(name, **context)
