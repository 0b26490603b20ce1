"""Requests to the monitor: flow history from every replica's ring and the history stream.

The code is in :mod:`shared.recorded_flows`, which the UI service uses too.
"""

from __future__ import annotations

from shared.recorded_flows import QUERY_TIMEOUT_S as QUERY_TIMEOUT_S
from shared.recorded_flows import flow_key as flow_key
from shared.recorded_flows import query as query
