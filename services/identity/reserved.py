"""Reserved identities, with Cilium's numbers and names."""

from __future__ import annotations

from shared import identities
from shared.labels import SOURCE_RESERVED, Label, LabelSet

# the numbers live in shared (every service needs them); naming them here keeps this module the
# identity service's one view of them
RESERVED = identities.RESERVED
BY_ID = identities.BY_ID
CLUSTER_MIN = identities.CLUSTER_MIN
CLUSTER_MAX = identities.CLUSTER_MAX
LOCAL_BASE = identities.LOCAL_BASE


def labels_of(number: int) -> LabelSet:
    return LabelSet([Label(SOURCE_RESERVED, BY_ID[number])])


def kind_of(number: int) -> str:
    if number < CLUSTER_MIN:  # 1-255 is Cilium's reserved range, named or not
        return "reserved"
    if number >= LOCAL_BASE:
        return "local"
    return "cluster"
