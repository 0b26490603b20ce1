"""Cilium's Kafka rule fields (``toPorts[].rules.kafka[]``), compiled and matched.

Used twice, like ``l7_http``: the policy service compiles every rule at ``policy apply`` (a
field that does not check is an error naming it, and nothing of the document is applied), and
the L7 proxy matches each Kafka request against the compiled rules. Cilium's semantics
(``pkg/policy/api/kafka``, ``pkg/kafka/policy.go``):

- ``role`` (``produce`` | ``consume``, any case) expands to the API keys that operation needs;
  ``apiKey`` names one API (Cilium's names: ``produce``, ``fetch``, ``offsets`` ...); not both;
- ``apiVersion``: that version only (a decimal string, 0-32767); empty: any;
- ``clientID``: that client id exactly; empty: any;
- ``topic`` (at most 255 of ``a-zA-Z0-9._-``): every topic a request names must be allowed by
  some rule; a request whose API carries no topics is not restricted by it. A request of a
  topic API that names no topic (metadata of no topic) has nothing to restrict; one that asks
  for every topic (metadata with a null list) matches only rules without a topic.

An empty rule matches every request. A request is allowed when the rules together allow it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidArgument

# Cilium's names of the Kafka API keys (pkg/policy/api/kafka APIKeyMap)
API_KEYS: dict[str, int] = {
    "produce": 0,
    "fetch": 1,
    "offsets": 2,
    "metadata": 3,
    "leaderandisr": 4,
    "stopreplica": 5,
    "updatemetadata": 6,
    "controlledshutdown": 7,
    "offsetcommit": 8,
    "offsetfetch": 9,
    "findcoordinator": 10,
    "joingroup": 11,
    "heartbeat": 12,
    "leavegroup": 13,
    "syncgroup": 14,
    "describegroups": 15,
    "listgroups": 16,
    "saslhandshake": 17,
    "apiversions": 18,
    "createtopics": 19,
    "deletetopics": 20,
    "deleterecords": 21,
    "initproducerid": 22,
    "offsetforleaderepoch": 23,
    "addpartitionstotxn": 24,
    "addoffsetstotxn": 25,
    "endtxn": 26,
    "writetxnmarkers": 27,
    "txnoffsetcommit": 28,
    "describeacls": 29,
    "createacls": 30,
    "deleteacls": 31,
    "describeconfigs": 32,
    "alterconfigs": 33,
}
API_NAMES = {key: name for name, key in API_KEYS.items()}
ROLES: dict[str, frozenset[int]] = {
    "produce": frozenset((0, 3, 18)),
    "consume": frozenset((1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18)),
}
# the APIs whose requests name topics (Cilium's isTopicAPIKey)
TOPIC_APIS = frozenset((0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37))
MAX_TOPIC = 255
_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")
TOPIC_AUTHORIZATION_FAILED = 29


def api_name(key: int) -> str:
    return API_NAMES.get(key, str(key))


@dataclass(frozen=True)
class KafkaRequest:
    api_key: int
    api_version: int
    client_id: str
    topics: tuple[str, ...] | None  # None: every topic (metadata with a null list)


@dataclass(frozen=True)
class KafkaRule:
    api_keys: frozenset[int] = frozenset()  # empty: every API
    api_version: int = -1  # -1: every version
    client_id: str = ""
    topic: str = ""

    def admits(self, request: KafkaRequest) -> bool:
        """Everything but the topic matches."""
        return (
            (not self.api_keys or request.api_key in self.api_keys)
            and (self.api_version < 0 or request.api_version == self.api_version)
            and (not self.client_id or request.client_id == self.client_id)
        )


def allows(rules: Sequence[KafkaRule], request: KafkaRequest) -> int | None:
    """The index of the rule that allowed ``request`` (the last one its topics needed), or
    None: denied."""
    restricted = request.api_key in TOPIC_APIS
    wanted = set(request.topics or ())
    for index, rule in enumerate(rules):
        if not rule.admits(request):
            continue
        if not rule.topic or not restricted:
            return index
        if request.topics is None:
            continue  # every topic: only a rule without a topic allows that
        wanted.discard(rule.topic)
        if not wanted:
            return index
    return None


def _string(raw: Mapping[str, Any], key: str, field: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"must be a string, got {type(value).__name__}", field=field)
    return value


def compile_rule(raw: Mapping[str, Any], field: str) -> KafkaRule:
    """One ``rules.kafka[]`` entry; InvalidArgument names the field that does not check."""
    role = _string(raw, "role", f"{field}.role").lower()
    api_key = _string(raw, "apiKey", f"{field}.apiKey").lower()
    if role and api_key:
        raise InvalidArgument("role and apiKey cannot both be set (as in Cilium)", field=field)
    keys: frozenset[int] = frozenset()
    if role:
        if role not in ROLES:
            raise InvalidArgument(
                f"must be one of {', '.join(ROLES)}, got {raw['role']!r}", field=f"{field}.role"
            )
        keys = ROLES[role]
    elif api_key:
        if api_key not in API_KEYS:
            raise InvalidArgument(
                f"unknown Kafka API key {raw['apiKey']!r} (Cilium's names: produce, fetch,"
                " offsets, metadata, ...)",
                field=f"{field}.apiKey",
            )
        keys = frozenset((API_KEYS[api_key],))
    version_text = _string(raw, "apiVersion", f"{field}.apiVersion")
    version = -1
    if version_text:
        if not version_text.isdigit() or int(version_text) > 32767:
            raise InvalidArgument(
                f"must be a version number 0-32767, got {version_text!r}",
                field=f"{field}.apiVersion",
            )
        version = int(version_text)
    topic = _string(raw, "topic", f"{field}.topic")
    if topic and (len(topic) > MAX_TOPIC or not _TOPIC.fullmatch(topic)):
        raise InvalidArgument(
            f"must be a Kafka topic name (at most {MAX_TOPIC} of a-z A-Z 0-9 . _ -), got {topic!r}",
            field=f"{field}.topic",
        )
    client_id = _string(raw, "clientID", f"{field}.clientID")
    return KafkaRule(keys, version, client_id, topic)


def compile_rules(raw: Sequence[Mapping[str, Any]], field: str) -> tuple[KafkaRule, ...]:
    return tuple(compile_rule(rule, f"{field}[{i}]") for i, rule in enumerate(raw))
