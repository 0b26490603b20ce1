"""The error hierarchy and the bus's pure helpers: payload codec and URL redaction."""

from __future__ import annotations

import msgspec
import pytest

from shared import errors
from shared.bus import decode, encode, redact
from shared.errors import (
    AlreadyExists,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MembraneError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    from_code,
)
from shared.messages import (
    SCHEMA_VERSION,
    AllocateReply,
    AllocateRequest,
    Empty,
    ErrorBody,
    Identity,
    ListReply,
    ReleaseRequest,
)

ALL_ERRORS: list[type[MembraneError]] = [
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Internal,
]

# --- errors ---------------------------------------------------------------------------------------


def test_codes_are_distinct_and_stable() -> None:
    assert [cls.code for cls in ALL_ERRORS] == [
        "invalid_argument",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "unavailable",
        "deadline_exceeded",
        "internal",
    ]


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_from_code_round_trip(cls: type[MembraneError]) -> None:
    original = cls("something went wrong", field="spec.x")
    rebuilt = from_code(original.code, original.message, original.field)
    assert type(rebuilt) is cls
    assert rebuilt.message == "something went wrong"
    assert rebuilt.field == "spec.x"
    assert rebuilt.retryable is cls.retryable
    assert str(rebuilt) == str(original)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_from_code_without_field(cls: type[MembraneError]) -> None:
    rebuilt = from_code(cls.code, "oops")
    assert type(rebuilt) is cls
    assert rebuilt.field is None
    assert str(rebuilt) == "oops"


@pytest.mark.parametrize("code", ["", "bogus", "INVALID_ARGUMENT", "404"])
def test_unknown_code_is_internal(code: str) -> None:
    rebuilt = from_code(code, "from a newer server", "f")
    assert type(rebuilt) is Internal
    assert rebuilt.message == "from a newer server"
    assert rebuilt.field == "f"


def test_every_concrete_error_class_has_a_code() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, MembraneError) and obj is not MembraneError
    }
    assert defined == set(ALL_ERRORS)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_retryable_flags(cls: type[MembraneError]) -> None:
    assert cls.retryable is (cls in (Unavailable, DeadlineExceeded))
    assert issubclass(cls, MembraneError)
    assert issubclass(cls, Exception)


def test_str_and_repr() -> None:
    err = InvalidArgument("must be a list", field="spec.ports")
    assert str(err) == "spec.ports: must be a list"
    assert repr(err) == "InvalidArgument('must be a list', field='spec.ports')"
    assert str(NotFound("no such identity")) == "no such identity"
    assert repr(Unavailable("down")) == "Unavailable('down', field=None)"


def test_errors_are_catchable_by_base() -> None:
    with pytest.raises(MembraneError) as info:
        raise from_code("unavailable", "redis is away")
    assert isinstance(info.value, Unavailable)
    assert info.value.retryable


# --- decode / encode ------------------------------------------------------------------------------


def test_decode_valid_payload() -> None:
    req = decode(
        b'{"labels": ["k8s:app=web"], "owner": "node-1", "lease_seconds": 30}', AllocateRequest
    )
    assert req == AllocateRequest(labels=["k8s:app=web"], owner="node-1", lease_seconds=30)
    assert req.v == SCHEMA_VERSION


def test_decode_fills_defaults() -> None:
    req = decode(b'{"labels": []}', AllocateRequest)
    assert req.owner == "cli"
    assert req.lease_seconds == 0
    assert req.v == SCHEMA_VERSION


@pytest.mark.parametrize("data", [b"", b"{}"])
def test_decode_empty_payload_into_defaults(data: bytes) -> None:
    assert decode(data, Empty) == Empty()
    assert decode(data, Empty).v == SCHEMA_VERSION


def test_decode_ignores_unknown_fields() -> None:
    req = decode(b'{"id": 300, "owner": "n", "added_in_v2": {"x": 1}}', ReleaseRequest)
    assert req == ReleaseRequest(id=300, owner="n")


def test_decode_nested() -> None:
    reply = decode(
        b'{"identity": {"id": 256, "labels": ["k8s:app=web"], "kind": "cluster"}, "new": true}',
        AllocateReply,
    )
    assert reply.identity == Identity(id=256, labels=["k8s:app=web"], kind="cluster")
    assert reply.new is True


@pytest.mark.parametrize(
    ("data", "type_", "field"),
    [
        (b'{"labels": 5}', AllocateRequest, "labels"),
        (b'{"labels": "k8s:app=web"}', AllocateRequest, "labels"),
        (b'{"labels": ["a", 5]}', AllocateRequest, "labels[1]"),
        (b'{"labels": [], "owner": 7}', AllocateRequest, "owner"),
        (b'{"labels": [], "lease_seconds": "30"}', AllocateRequest, "lease_seconds"),
        (b'{"id": "300"}', ReleaseRequest, "id"),
        (b'{"id": 1.5}', ReleaseRequest, "id"),
        (b'{"v": "1"}', Empty, "v"),
        (
            b'{"identity": {"id": "x", "labels": [], "kind": "c"}, "new": true}',
            AllocateReply,
            "identity.id",
        ),
        (
            b'{"identities": [{"id": 1, "labels": [], "kind": "r"}, {"id": 2}]}',
            ListReply,
            "identities[1]",
        ),
    ],
)
def test_decode_wrong_types_name_the_json_path(
    data: bytes, type_: type[msgspec.Struct], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(data, type_)  # type: ignore[type-var]
    assert info.value.field == field
    assert info.value.message.startswith(f"malformed {type_.__name__}: ")
    assert " - at " not in info.value.message


def test_decode_labels_5_message() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(b'{"labels": 5}', AllocateRequest)
    assert str(info.value) == "labels: malformed AllocateRequest: Expected `array`, got `int`"


def test_decode_missing_required_field() -> None:
    with pytest.raises(InvalidArgument, match="missing required field `labels`"):
        decode(b"", AllocateRequest)


@pytest.mark.parametrize("data", [b"{", b"not json", b'{"labels": [}', b"\xff\xfe", b"{} {}"])
def test_decode_invalid_json(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^malformed AllocateRequest: ") as info:
        decode(data, AllocateRequest)
    assert info.value.field is None


@pytest.mark.parametrize("data", [b"[]", b"5", b'"x"', b"null"])
def test_decode_non_object(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="Expected `object`"):
        decode(data, AllocateRequest)


@pytest.mark.parametrize(
    "message",
    [
        Empty(),
        AllocateRequest(labels=["k8s:app=web", "reserved:host"], owner="node-a", lease_seconds=2.5),
        AllocateReply(
            identity=Identity(id=16777217, labels=["cidr:10.0.0.0/8"], kind="local"), new=False
        ),
        ErrorBody(code="not_found", message="no identity 300", field="id"),
        ErrorBody(code="internal", message="boom"),
        ListReply(identities=[]),
    ],
)
def test_encode_round_trip(message: msgspec.Struct) -> None:
    data = encode(message)  # type: ignore[arg-type]
    assert isinstance(data, bytes)
    assert decode(data, type(message)) == message  # type: ignore[type-var]


def test_encode_uses_wire_names() -> None:
    data = encode(AllocateRequest(labels=["k8s:a=b"]))
    assert msgspec.json.decode(data) == {
        "v": SCHEMA_VERSION,
        "labels": ["k8s:a=b"],
        "owner": "cli",
        "lease_seconds": 0,
        "request_id": "",
    }


# --- redact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://alice:s3cret@nats.example:4222", "nats://alice:***@nats.example:4222"),
        ("nats://alice:s3cret@nats.example", "nats://alice:***@nats.example"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://default:s3cret@redis:6379/2", "redis://default:***@redis:6379/2"),
        (
            "rediss://u:s3cret@redis:6380/0?ssl_cert_reqs=none",
            "rediss://u:***@redis:6380/0?ssl_cert_reqs=none",
        ),
        (
            "nats://a:s3cret@h1:4222,nats://b:t0p@h2:4223",
            "nats://a:***@h1:4222,nats://b:***@h2:4223",
        ),
        ("nats://h1:4222,nats://a:s3cret@h2:4222", "nats://h1:4222,nats://a:***@h2:4222"),
    ],
)
def test_redact_hides_passwords(url: str, expected: str) -> None:
    redacted = redact(url)
    assert redacted == expected
    assert "s3cret" not in redacted
    assert "t0p" not in redacted


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222",
        "nats://nats.example:4222,nats://nats2.example:4222",
        "redis://127.0.0.1:6379/0",
        "redis://redis.example/3?socket_timeout=2",
        "redis://user@redis.example:6379/0",
        "nats://[::1]:4222",
    ],
)
def test_redact_leaves_password_less_urls_unchanged(url: str) -> None:
    assert redact(url) == url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("unix://:s3cret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
    ],
)
def test_redact_keeps_the_host_as_written(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_redact_leaves_a_unix_socket_url_unchanged() -> None:
    assert redact("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_redact_never_raises_on_a_bad_port() -> None:
    redacted = redact("nats://alice:s3cret@nats.example:http")
    assert "s3cret" not in redacted
