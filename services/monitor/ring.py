"""The most recent enriched flows of one replica, in arrival order, bounded."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

from shared.flow_api import EnrichedFlow


class FlowRing:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._flows: collections.deque[EnrichedFlow] = collections.deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._flows)

    def extend(self, flows: Iterable[EnrichedFlow]) -> None:
        self._flows.extend(flows)

    @property
    def oldest(self) -> float:
        return self._flows[0].time if self._flows else 0.0

    def query(
        self, test: Callable[[EnrichedFlow], bool], *, last: int = 0, since: float = 0.0
    ) -> list[EnrichedFlow]:
        """Matching flows, oldest first; the newest ``last`` of them when ``last`` > 0.

        Walks from the newest end, so ``--last 20`` costs as many flows as it takes to find 20.
        """
        found: list[EnrichedFlow] = []
        for flow in reversed(self._flows):
            if since and flow.time < since:
                # flows arrive roughly in time order (per node); a batch late by more than a
                # second is rare enough to read as older
                if flow.time < since - 1.0:
                    break
                continue
            if test(flow):
                found.append(flow)
                if last and len(found) >= last:
                    break
        found.reverse()
        return found
