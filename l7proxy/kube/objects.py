"""Kubernetes objects as the agent needs them: pure functions on the API's JSON.

- ``Pod``: what makes a pod an endpoint here (namespace, name, IP, labels, node);
- ``endpoint_labels``: a pod's identity labels, with its namespace and the
  namespace's labels, as Cilium builds them (``l7proxy/policy/namespaces.py``);
- ``compile_policy_object``: a CNP or CCNP object → policies, validated by the one
  loader (``l7proxy/policy/load.py``) and scoped to its namespace as Cilium does;
- ``node_status``: the ``status.nodes.<node>`` entry Cilium writes on a policy object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from l7proxy.policy.load import load_document
from l7proxy.policy.model import Policy
from l7proxy.policy.namespaces import (
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL,
    scoped,
)

Obj = Mapping[str, Any]

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
# The metadata the policy loader reads; the rest (uid, resourceVersion,
# managedFields…) is the API server's.
_POLICY_METADATA = ("name", "namespace", "labels", "annotations")


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str | None  # None until the CNI gave it one
    labels: tuple[tuple[str, str], ...]
    service_account: str
    host_network: bool
    finished: bool  # Succeeded or Failed: its IP may already be someone else's

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def meta(obj: Obj) -> Mapping[str, Any]:
    m = obj.get("metadata") or {}
    return m if isinstance(m, Mapping) else {}


def pod_from(obj: Obj) -> Pod:
    m, spec, status = meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    return Pod(
        namespace=str(m.get("namespace") or "default"),
        name=str(m.get("name") or ""),
        uid=str(m.get("uid") or ""),
        node=str(spec.get("nodeName") or ""),
        ip=str(status["podIP"]) if status.get("podIP") else None,
        labels=tuple(sorted((str(k), str(v)) for k, v in (m.get("labels") or {}).items())),
        service_account=str(spec.get("serviceAccountName") or "default"),
        host_network=bool(spec.get("hostNetwork")),
        finished=status.get("phase") in ("Succeeded", "Failed"),
    )


def namespace_labels(obj: Obj) -> dict[str, str]:
    return {str(k): str(v) for k, v in (meta(obj).get("labels") or {}).items()}


def endpoint_labels(pod: Pod, ns_labels: Mapping[str, str]) -> dict[str, str]:
    """The pod's labels, its namespace, its namespace's labels and its service account."""
    labels = dict(pod.labels)
    labels[NAMESPACE_LABEL] = pod.namespace
    labels[SERVICE_ACCOUNT_LABEL] = pod.service_account
    for key, value in ns_labels.items():
        labels[NAMESPACE_LABELS_PREFIX + key] = value
    return labels


def object_key(kind: str, obj: Obj) -> str:
    m = meta(obj)
    return (
        f"{kind}/{m.get('namespace')}/{m.get('name')}" if kind == CNP else f"{kind}/{m.get('name')}"
    )


def spec_stamp(obj: Obj) -> str:
    """What a policy object says, without what the API server or our status adds:
    our own status writes come back as MODIFIED events and must not count as changes."""
    m = meta(obj)
    return json.dumps(
        [obj.get("spec"), obj.get("specs"), m.get("labels"), m.get("annotations")],
        sort_keys=True,
        default=str,
    )


def compile_policy_object(kind: str, obj: Obj) -> list[Policy]:
    """A CNP/CCNP object → its policies. Raises ``PolicyError`` naming the object,
    the path in it and the reason."""
    m = meta(obj)
    doc = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    doc["apiVersion"] = obj.get("apiVersion", "cilium.io/v2")
    doc["kind"] = kind
    doc["metadata"] = {k: m[k] for k in _POLICY_METADATA if k in m}
    if kind == CCNP:
        doc["metadata"].pop("namespace", None)
    source = f"k8s {object_key(kind, obj)}"
    return [scoped(p) for p in load_document(doc, source=source)]


def node_status(ok: bool, error: str | None, revision: int, now: str) -> dict[str, Any]:
    """Cilium's ``CiliumNetworkPolicyNodeStatus``. ``error: None`` removes an old error
    under a merge patch."""
    return {
        "ok": ok,
        "error": error,
        "enforcing": ok,
        "localPolicyRevision": revision,
        "lastUpdated": now,
    }


def said_by(obj: Obj, node: str) -> tuple[bool, str | None] | None:
    """(ok, error) of ``node``'s entry in the object's status, None without one."""
    entry = ((obj.get("status") or {}).get("nodes") or {}).get(node)
    if not isinstance(entry, Mapping):
        return None
    return bool(entry.get("ok")), (str(entry["error"]) if entry.get("error") else None)
