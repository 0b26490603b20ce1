"""One browser's live stream: enriched flows in, a small batch out every tick.

The page never falls behind the cluster: whatever the rate, a tick sends the exact change of the
connection count per edge (aggregated here; negative when a connection counted as forwarded
where it left its pod turns out dropped where it arrived) and at most ``sample`` of the newest
flows for the list; when flows were left out of the list, the batch says so (``sampled``,
``skipped``) and the page shows it. Decoding and counting cost a few microseconds per flow,
so 5,000 flows/s is a few percent of a core.
"""

from __future__ import annotations

import collections
from typing import Any

from services.ui.views import box_kind, flow_rows
from shared.flow_api import EnrichedFlow, FlowPeer
from shared.flow_groups import (
    CONNECTION_S,
    ConnectionKey,
    connection_key,
    is_connection,
    outranks,
    workload,
)

SAMPLE = 50  # flows per tick in the list (4 ticks a second: 200 flows/s shown at most)
RATE_WINDOW_S = 1.0
RECENT_MAX = 50_000  # connections remembered to count each once (a few seconds at 5,000/s)

EdgeKey = tuple[str, str, str, str, str]  # source, destination, verdict, their box kinds


class LiveView:
    def __init__(self, namespace: str = "", sample: int = SAMPLE) -> None:
        self.namespace = namespace
        self.flows: collections.deque[EnrichedFlow] = collections.deque(maxlen=sample)
        self.edges: collections.Counter[EdgeKey] = collections.Counter()
        self.offered = 0
        self.history: collections.deque[tuple[float, int]] = collections.deque()
        self._names: dict[tuple[str, str, int, str], str] = {}
        # connections counted lately: their event so far and the edge it was counted on
        self.recent: collections.OrderedDict[ConnectionKey, tuple[EnrichedFlow, EdgeKey]] = (
            collections.OrderedDict()
        )

    def _workload(self, peer: FlowPeer) -> str:
        key = (peer.namespace, peer.pod, peer.identity, "" if peer.pod else peer.ip)
        found = self._names.get(key)
        if found is None:
            if len(self._names) > 100_000:  # pods churn: bound the memo
                self._names.clear()
            found = self._names[key] = workload(peer)
        return found

    def offer(self, flow: EnrichedFlow) -> None:
        ns = self.namespace
        if ns and flow.source.namespace != ns and flow.destination.namespace != ns:
            return
        if not is_connection(flow):
            return  # replies and non-policy events: not what the map and list show
        s, d = flow.source, flow.destination
        key = (
            self._workload(s),
            self._workload(d),
            flow.verdict,
            box_kind(s.identity),
            box_kind(d.identity),
        )
        # one count per connection (shared.flow_groups.connections): a later event with the
        # outcome (the drop after the trace where it left its pod) moves the count over
        conn = connection_key(flow)
        seen = self.recent.get(conn)
        if seen is not None and abs(flow.time - seen[0].time) <= CONNECTION_S:
            if not outranks(flow, seen[0]):
                return
            self.edges[seen[1]] -= 1
        else:
            self.offered += 1
        self.recent[conn] = (flow, key)
        self.recent.move_to_end(conn)
        while len(self.recent) > RECENT_MAX:
            self.recent.popitem(last=False)
        self.edges[key] += 1
        self.flows.append(flow)

    def take(self, now: float, monitor_up: bool) -> dict[str, Any]:
        """The batch of one tick; ``monitor_up``: whether any monitor replica answers (else
        the page must not present what it shows as live)."""
        self.history.append((now, self.offered))
        while self.history and self.history[0][0] < now - RATE_WINDOW_S:
            self.history.popleft()
        rate = sum(n for _, n in self.history) / RATE_WINDOW_S
        skipped = self.offered - len(self.flows)
        batch = {
            "time": now,
            "monitor": monitor_up,
            "rate": rate,
            "skipped": skipped,
            "sampled": skipped > 0,
            "edges": [
                {
                    "source": src,
                    "destination": dst,
                    "verdict": verdict,
                    "source_kind": src_kind,
                    "destination_kind": dst_kind,
                    "count": count,
                }
                for (src, dst, verdict, src_kind, dst_kind), count in self.edges.items()
                if count
            ],
            "flows": flow_rows(self.flows),
        }
        self.flows.clear()
        self.edges.clear()
        self.offered = 0
        return batch
