"""Kubernetes objects into membrane, through the path ``membrane apply -f`` takes.

An object is read by ``shared.manifests`` (the validation ``apply -f`` does) and applied or
deleted by ``shared.apply`` (the requests ``apply -f`` makes: policy and lb documents to their
services, namespaces to the ``namespaces`` bucket). There is no second model of the objects
here. Two kinds differ, because in a cluster the kubelet owns pods:

- a Pod is not created (the kubelet and the CNI plugin wire it): its labels, service account
  and node go to the ``pods`` bucket, where the node's agent takes its identity from;
- a deleted Namespace only leaves the ``namespaces`` bucket (its pods are the kubelet's to
  delete, which Kubernetes does before the namespace goes).

Nodes are watched, counted and otherwise left alone: membrane's nodes register themselves.

An object that does not validate is reported where ``kubectl describe`` shows it: a Warning
Event on the object, plus the log and ``membrane_k8s_rejected_total``. It is not retried
until it changes.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import msgspec
from prometheus_client import Counter

from services.k8s.kubeclient import (
    NAMESPACES,
    NODES,
    PODS,
    ApiError,
    ConnectionLost,
    Kind,
    KubeClient,
)
from shared import apply, log, manifests, subjects
from shared.bus import Bus
from shared.errors import InvalidArgument
from shared.manifests import PodDoc, RoutedDoc
from shared.messages import PodRecord

Obj = dict[str, Any]

REJECTED = Counter("membrane_k8s_rejected_total", "Objects membrane refused, by kind", ["kind"])
COMPONENT = "membrane-k8s-bridge"


def source_of(kind: Kind, obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    where = f"{meta.get('namespace')}/" if meta.get("namespace") else ""
    return f"k8s {kind.kind} {where}{meta.get('name', '')}"


class Sink:
    def __init__(self, bus: Bus, kube: KubeClient) -> None:
        self.bus = bus
        self.kube = kube
        self.rejected = 0
        self.log = log.get("k8s")

    async def upsert(self, kind: Kind, obj: Obj) -> None:
        if kind == NODES:
            return
        source = source_of(kind, obj)
        try:
            # the JSON text of the object is a YAML document: the reader `apply -f` uses
            docs = manifests.load(json.dumps(obj), source)
            if kind == PODS:
                (pod,) = docs
                assert isinstance(pod, PodDoc)
                await self._put_pod(pod, obj)
            else:
                await apply.apply_documents(self.bus, docs, source)
        except InvalidArgument as exc:
            await self._reject(kind, obj, exc)
            raise

    async def delete(self, kind: Kind, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        if kind == NODES:
            return
        if kind == PODS:
            kv = await self.bus.kv(subjects.KV_PODS)
            await kv.delete(subjects.pod_key(str(meta.get("namespace", "")), name))
        elif kind == NAMESPACES:
            await apply.delete_namespace_record(self.bus, name)
        else:
            try:
                (doc,) = manifests.load(json.dumps(obj), source_of(kind, obj))
            except InvalidArgument:
                return  # never applied: nothing of it to delete
            assert isinstance(doc, RoutedDoc)
            await apply.delete_routed(self.bus, doc)

    async def _put_pod(self, pod: PodDoc, obj: Obj) -> None:
        record = PodRecord(
            namespace=pod.namespace,
            name=pod.name,
            labels=dict(pod.labels),
            service_account=pod.service_account,
            node=pod.node_name,
            uid=str((obj.get("metadata") or {}).get("uid", "")),
        )
        kv = await self.bus.kv(subjects.KV_PODS)
        await kv.put(subjects.pod_key(pod.namespace, pod.name), msgspec.json.encode(record))

    async def _reject(self, kind: Kind, obj: Obj, exc: InvalidArgument) -> None:
        REJECTED.labels(kind.kind).inc()
        self.rejected += 1
        meta = obj.get("metadata") or {}
        self.log.warning("object refused", object=source_of(kind, obj), error=str(exc))
        namespace = str(meta.get("namespace") or "default")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name', 'object')}.{secrets.token_hex(8)}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", kind.api_version),
                "kind": kind.kind,
                "name": meta.get("name", ""),
                "namespace": meta.get("namespace") or "",
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": "Rejected",
            "message": str(exc)[:1024],
            "type": "Warning",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.kube.create_event(namespace, event)
        except (ApiError, ConnectionLost) as error:
            # the refusal is still in the log and the metric
            self.log.warning("event not recorded", error=str(error))
