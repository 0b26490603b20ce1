"""The selector cache: selector -> the identities whose ``k8s`` labels it matches.

Work follows the change, not the cluster, through two inverted indexes:

- every selector is filed under the label terms it *requires*: one ``In`` requirement (each of
  its values, as ``(key, value)``) or else one ``Exists`` (as ``(key, None)``). A new identity
  is evaluated only against the selectors filed under one of its own labels, so a selector
  requiring ``app=web`` never sees an identity without that label. A selector with only
  ``NotIn``/``DoesNotExist`` terms (or none) requires nothing and is evaluated for every new
  identity: the fallback set.
- every identity is filed under its labels the same way, so a new selector is evaluated only
  against the identities that carry its indexed term (all of them for a fallback selector).

The indexed term is chosen to be selective: an ``In`` before an ``Exists``, a pod label before
the namespace (many pods share a namespace), fewer values first. A selector that also pins a
single namespace (every namespaced policy's selectors do) is filed under the namespace *and*
the label together, so that ``app=web`` pods of one namespace never meet the ``app=web``
selectors of every other namespace: work stays with the change as unrelated namespaces grow.
Likewise a selector requiring one value of a namespace *label* (a NetworkPolicy peer with
``namespaceSelector: {team: a}`` and ``podSelector: {app: web}``) is filed under that namespace
label and the pod label together.

Reserved identities take part with their labels (``reserved:...``, no ``k8s`` label), so only
fallback selectors (e.g. a lone ``NotIn``) can match them, as in Cilium.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.policy.model import Selector
from shared.labels import NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, LabelSet

# (scope, key, value) for a label with that value, (scope, key, None) for "has the key"; the
# scope is "" when the term holds anywhere, a namespace name, or "<namespace label>=<value>"
# (namespace names hold no "=")
Term = tuple[str, str, str | None]


def _is_namespace_key(key: str) -> bool:
    return key == NAMESPACE_LABEL or key.startswith(NAMESPACE_LABELS_PREFIX)


def index_terms(selector: Selector) -> tuple[Term, ...] | None:
    """The terms a selector is filed under (an identity must carry one), None: fallback."""
    ins = [req for req in selector.requirements if req.operator == "In"]
    pinned = [r for r in ins if r.key == NAMESPACE_LABEL and len(r.values) == 1]
    namespace_labels = sorted(
        (r.key, next(iter(r.values)))
        for r in ins
        if r.key.startswith(NAMESPACE_LABELS_PREFIX) and len(r.values) == 1
    )
    if pinned:
        scope = next(iter(pinned[0].values))
    elif namespace_labels:
        scope = "=".join(namespace_labels[0])
    else:
        scope = ""
    pod = [r for r in ins if not _is_namespace_key(r.key)]
    if pod:
        best = min(pod, key=lambda r: (len(r.values), r.key))
        return tuple((scope, best.key, value) for value in sorted(best.values))
    exists = [
        r for r in selector.requirements if r.operator == "Exists" and not _is_namespace_key(r.key)
    ]
    if exists:
        return ((scope, min(r.key for r in exists), None),)
    namespace = scope if pinned else ""
    labels = [r for r in ins if r.key != NAMESPACE_LABEL]
    if labels:  # namespace labels only
        best = min(labels, key=lambda r: (len(r.values), r.key))
        return tuple((namespace, best.key, value) for value in sorted(best.values))
    if ins:  # only the namespace itself is required
        best = min(ins, key=lambda r: len(r.values))
        return tuple(("", best.key, value) for value in sorted(best.values))
    if any(r.operator == "Exists" and r.key == NAMESPACE_LABEL for r in selector.requirements):
        return (("", NAMESPACE_LABEL, None),)
    return None


def _identity_terms(k8s: dict[str, str]) -> Iterable[Term]:
    namespace = k8s.get(NAMESPACE_LABEL, "")
    scopes = [
        f"{key}={value}" for key, value in k8s.items() if key.startswith(NAMESPACE_LABELS_PREFIX)
    ]
    for key, value in k8s.items():
        yield ("", key, value)
        yield ("", key, None)
        if namespace:
            yield (namespace, key, value)
            yield (namespace, key, None)
        if not _is_namespace_key(key):
            for scope in scopes:
                yield (scope, key, value)
                yield (scope, key, None)


class SelectorCache:
    """Reference-counted selectors and their matching identities, maintained incrementally."""

    def __init__(self) -> None:
        self._labels: dict[int, LabelSet] = {}
        self._k8s: dict[int, dict[str, str]] = {}
        self._identities_by_term: dict[Term, set[int]] = {}
        self._refs: dict[Selector, int] = {}
        self._matches: dict[Selector, set[int]] = {}
        self._selectors_by_term: dict[Term, set[Selector]] = {}
        self._fallback: set[Selector] = set()
        self._of_identity: dict[int, set[Selector]] = {}
        self.evaluations = 0  # selector-against-identity evaluations, for tests and metrics

    def __len__(self) -> int:
        return len(self._refs)

    # --- identities ----------------------------------------------------------------------------

    def labels(self, identity: int) -> LabelSet | None:
        return self._labels.get(identity)

    def identities(self) -> Iterable[int]:
        return self._labels.keys()

    def add_identity(self, identity: int, labels: LabelSet) -> set[Selector]:
        """Files a new identity (remove it first to relabel); returns the selectors matching it."""
        if identity in self._labels:
            raise ValueError(f"identity {identity} is already known")
        k8s = labels.k8s_map()
        self._labels[identity] = labels
        self._k8s[identity] = k8s
        candidates = set(self._fallback)
        for term in _identity_terms(k8s):
            self._identities_by_term.setdefault(term, set()).add(identity)
            candidates.update(self._selectors_by_term.get(term, ()))
        matched: set[Selector] = set()
        for selector in candidates:
            self.evaluations += 1
            if selector.matches(k8s):
                matched.add(selector)
                self._matches[selector].add(identity)
        self._of_identity[identity] = matched
        return set(matched)

    def remove_identity(self, identity: int) -> set[Selector]:
        """Forgets an identity; returns the selectors that matched it (no evaluation needed)."""
        if identity not in self._labels:
            return set()
        del self._labels[identity]
        for term in _identity_terms(self._k8s.pop(identity)):
            holders = self._identities_by_term[term]
            holders.discard(identity)
            if not holders:
                del self._identities_by_term[term]
        matched = self._of_identity.pop(identity)
        for selector in matched:
            self._matches[selector].discard(identity)
        return matched

    # --- selectors -----------------------------------------------------------------------------

    def acquire(self, selector: Selector) -> None:
        """Takes a reference; the first one evaluates the selector against its candidates."""
        count = self._refs.get(selector, 0)
        self._refs[selector] = count + 1
        if count:
            return
        terms = index_terms(selector)
        candidates: Iterable[int]
        if terms is None:
            self._fallback.add(selector)
            candidates = list(self._labels)
        else:
            found: set[int] = set()
            for term in terms:
                self._selectors_by_term.setdefault(term, set()).add(selector)
                found.update(self._identities_by_term.get(term, ()))
            candidates = found
        matched: set[int] = set()
        for identity in candidates:
            self.evaluations += 1
            if selector.matches(self._k8s[identity]):
                matched.add(identity)
                self._of_identity[identity].add(selector)
        self._matches[selector] = matched

    def release(self, selector: Selector) -> None:
        count = self._refs[selector] - 1
        if count:
            self._refs[selector] = count
            return
        del self._refs[selector]
        terms = index_terms(selector)
        if terms is None:
            self._fallback.discard(selector)
        else:
            for term in terms:
                filed = self._selectors_by_term[term]
                filed.discard(selector)
                if not filed:
                    del self._selectors_by_term[term]
        for identity in self._matches.pop(selector):
            self._of_identity[identity].discard(selector)

    def matches(self, selector: Selector) -> set[int]:
        """The identities a cached selector matches (the cache's own set: do not modify)."""
        return self._matches[selector]

    def selectors_of(self, identity: int) -> set[Selector]:
        """The cached selectors that match an identity (the cache's own set: do not modify)."""
        return self._of_identity.get(identity, set())
