"""The error hierarchy every service and client speaks.

An error carries a stable machine-readable ``code``, a message for a person and, when a user's
input caused it, the ``field`` path that was wrong. Retryable errors (the system is busy or a
dependency is down) are kept apart from permanent ones (the request itself is wrong), so that a
caller knows whether trying again can help.
"""

from __future__ import annotations

from typing import ClassVar


class MembraneError(Exception):
    """Base of all errors that cross a service boundary."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field:
            return f"{self.field}: {self.message}"
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r})"


class InvalidArgument(MembraneError):
    """The request is malformed or violates a rule; the same request will fail again."""

    code = "invalid_argument"


class NotFound(MembraneError):
    code = "not_found"


class AlreadyExists(MembraneError):
    code = "already_exists"


class PermissionDenied(MembraneError):
    """The credential's role may not do this (nats-server refused it); the same credential
    will be refused again."""

    code = "permission_denied"


class ResourceExhausted(MembraneError):
    """A finite range (identities, pod CIDRs, ...) has no free element left."""

    code = "resource_exhausted"


class Unavailable(MembraneError):
    """A dependency (Redis, NATS, a service) did not answer in time; try again later."""

    code = "unavailable"
    retryable = True


class DeadlineExceeded(MembraneError):
    code = "deadline_exceeded"
    retryable = True


class Internal(MembraneError):
    """A bug or an unexpected state on the server; the message says what happened."""

    code = "internal"


_BY_CODE: dict[str, type[MembraneError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def from_code(code: str, message: str, field: str | None = None) -> MembraneError:
    """Rebuild the typed error a server sent, so callers can ``except Unavailable``."""
    cls = _BY_CODE.get(code, Internal)
    return cls(message, field=field)
