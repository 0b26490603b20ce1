"""The private parts of nats.py that shared/kv_watch.py and shared/bus.py rely on.

nats-py is pinned to one minor version (pyproject.toml) because of them; when an upgrade
renames or reshapes one, these fail first and name it, instead of a watch that hangs.
"""

from __future__ import annotations

import importlib.metadata
import inspect

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

PINNED_MINOR = "2.16"


def test_nats_py_is_the_pinned_minor_version() -> None:
    version = importlib.metadata.version("nats-py")
    assert version.startswith(PINNED_MINOR + "."), (
        f"nats-py {version}: kv_watch.py and bus.py use private attributes checked against "
        f"{PINNED_MINOR}; re-check them (this file) before moving the pin"
    )


def test_key_value_keeps_its_stream_prefix_and_context() -> None:
    nc = Client()
    js = JetStreamContext(nc)
    kv = KeyValue(name="b", stream="KV_b", pre="$KV.b.", js=js, direct=False)
    assert kv._js is js  # kv_watch: subscribe, stream_info, delete_consumer
    assert kv._stream == "KV_b"
    assert kv._pre == "$KV.b."
    assert js._nc is nc  # kv_watch: is_connected before deleting a consumer


def test_push_subscription_names_its_stream_and_consumer() -> None:
    init = inspect.getsource(JetStreamContext.PushSubscription.__init__)
    assert "self._stream = stream" in init
    assert "self._consumer = consumer" in init


def test_client_flushes_its_pending_buffer_on_request() -> None:
    flush = Client._flush_pending
    assert inspect.iscoroutinefunction(flush)
    assert "force_flush" in inspect.signature(flush).parameters  # bus.flush_connection


def test_ack_subject_token_positions() -> None:
    # kv_watch._sequence_and_pending reads the 12-token form of the ack subject by these
    assert (Msg.Ack.StreamSeq, Msg.Ack.NumPending) == (7, 10)


def test_ordered_consumer_can_be_made_again_from_a_sequence() -> None:
    # kv_watch._restart: subscription._sub._jsi, its _sseq, _js and reset_ordered_consumer
    init = inspect.getsource(JetStreamContext.PushSubscription.__init__)
    assert "self._sub = sub" in init
    jsi = inspect.getsource(JetStreamContext._JSI.__init__)
    assert "self._sseq = 0" in jsi and "self._js = js" in jsi
    reset = JetStreamContext._JSI.reset_ordered_consumer
    assert inspect.iscoroutinefunction(reset)
    assert list(inspect.signature(reset).parameters) == ["self", "sseq"]
    assert "sub._jsi = JetStreamContext._JSI(" in inspect.getsource(JetStreamContext.subscribe_bind)
