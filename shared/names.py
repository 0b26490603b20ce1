"""Kubernetes object-name rules (namespaces are DNS labels, pods DNS subdomains)."""

from __future__ import annotations

import re

from shared.errors import InvalidArgument

# the patterns alone, for readers with messages of their own (length limits not included)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # port names; no "--" either


def validate_dns_label(value: str, field: str) -> None:
    if not value or len(value) > 63 or not DNS_LABEL.match(value):
        raise InvalidArgument(
            f"{value!r} is not a valid name: at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            field=field,
        )


def validate_dns_subdomain(value: str, field: str) -> None:
    if not value or len(value) > 253 or not DNS_SUBDOMAIN.match(value):
        raise InvalidArgument(
            f"{value!r} is not a valid name: at most 253 lowercase letters, digits, '-' and "
            "'.', each dot-separated part starting and ending with a letter or digit",
            field=field,
        )


# ObjectMeta's fields: what a manifest reader accepts under `metadata`
OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
