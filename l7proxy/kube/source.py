"""Kubernetes as the source of this node's endpoints and of policies.

``KubeSource`` keeps four ``ResourceWatch`` loops (``watch.py``) and what they
tell, in memory:

- the Pods scheduled on this node (field selector ``spec.nodeName=<node>``):
  ``endpoints()`` is the pods that have an IP, run in their own network namespace
  (not ``hostNetwork``) and have not finished, with their identity labels;
- Namespaces, for their labels, which enter each pod's identity labels;
- CiliumNetworkPolicies and CiliumClusterwideNetworkPolicies: each object is
  compiled when it arrives (``objects.compile_policy_object``). A bad one is
  logged, kept in ``policy_errors()`` and reported on the object's
  ``status.nodes.<node>`` (Cilium's ``ok``/``error`` fields), and **changes
  nothing**: a new bad object brings no policy, a bad update leaves the object's
  last good version in force. ``policies()`` is the union of the good ones.

``on_change(what)`` is called with ``"pods"`` or ``"policies"`` when a list or an
event changed what ``endpoints()`` or ``policies()`` return; the agent then
reconciles. Status writes are a merge patch of our node's entry only, so agents
on different nodes never overwrite each other's, and they are made only when
what we would say changed (our own write comes back as a MODIFIED event with
the same spec and is recognised as no change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from l7proxy.cluster.protect import Backoff
from l7proxy.kube.objects import (
    CCNP,
    CNP,
    Obj,
    Pod,
    compile_policy_object,
    endpoint_labels,
    meta,
    namespace_labels,
    node_status,
    object_key,
    pod_from,
    said_by,
    spec_stamp,
)
from l7proxy.kube.secrets import SecretFiles
from l7proxy.kube.watch import ResourceWatch
from l7proxy.policy.errors import PolicyError
from l7proxy.policy.model import Policy

log = logging.getLogger("l7proxy.kube")

GROUP, VERSION = "cilium.io", "v2"
SECRET = "Secret"
# Where policy secrets are read from in cluster mode (Cilium's is ``cilium-secrets``).
DEFAULT_SECRETS_NAMESPACE = "l7proxy-secrets"
PLURALS = {CNP: "ciliumnetworkpolicies", CCNP: "ciliumclusterwidenetworkpolicies"}


@dataclass(frozen=True, slots=True)
class KubeConfig:
    """``l7proxy run --k8s``: which node we are, and how to reach the API server
    (``kubeconfig``, or the pod's service account when None)."""

    node: str
    kubeconfig: Path | None = None
    timeout_seconds: int = 300  # each watch is opened again after this (the server ends it)
    sync_timeout: float = 30.0  # at start, how long to wait for the first lists
    backoff_base: float = 0.2
    backoff_cap: float = 30.0
    # The namespace whose Secrets become the TLS secrets directory's files.
    secrets_namespace: str = DEFAULT_SECRETS_NAMESPACE


@dataclass(frozen=True, slots=True)
class PodEndpoint:
    """A pod that should be an endpoint of this node."""

    name: str  # namespace/name
    labels: dict[str, str]
    ip: str


@dataclass
class PolicyObject:
    kind: str
    namespace: str
    name: str
    stamp: str  # spec_stamp of the version last judged
    policies: list[Policy] = field(default_factory=list)  # the last good version's
    error: str | None = None  # why the latest version was rejected
    reported: tuple[str, str | None] | None = None  # (stamp, error) written to status


async def api_client(kubeconfig: Path | None) -> client.ApiClient:
    """The official client, from ``kubeconfig`` or, without one, the pod's service
    account (in-cluster config)."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        await config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=configuration
        )
    else:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration)


class KubeSource:
    def __init__(
        self,
        api: client.ApiClient,
        node: str,
        *,
        on_change: Callable[[str], None] | None = None,
        timeout_seconds: int = 300,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
        secrets: SecretFiles | None = None,
    ):
        self.api = api
        # The Secrets of one namespace, written as the TLS secrets directory's files.
        self.secrets = secrets
        self.node = node
        self.on_change = on_change or (lambda what: None)
        self.pods: dict[str, Pod] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.objects: dict[str, PolicyObject] = {}
        self.revision = 0  # bumped whenever policies() changes
        self.status_writes = 0
        self.status_write_errors = 0
        self._pending_status: asyncio.Queue[str] = asyncio.Queue()
        self._backoff = (backoff_base, backoff_cap)
        self._tasks: list[asyncio.Task[None]] = []
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        self.custom = custom

        def make(kind: str, lister: Any, **kw: Any) -> ResourceWatch:
            return ResourceWatch(
                kind,
                lister,
                self,
                backoff=Backoff(base=backoff_base, cap=backoff_cap),
                timeout_seconds=timeout_seconds,
                **kw,
            )

        self.watches = [
            make(
                "Pod",
                core.list_pod_for_all_namespaces,
                params={"field_selector": f"spec.nodeName={node}"},
            ),
            make("Namespace", core.list_namespace),
            make(CNP, custom.list_cluster_custom_object, args=(GROUP, VERSION, PLURALS[CNP])),
            make(CCNP, custom.list_cluster_custom_object, args=(GROUP, VERSION, PLURALS[CCNP])),
        ]
        if secrets is not None:
            self.watches.append(
                make(SECRET, core.list_namespaced_secret, args=(secrets.namespace,))
            )

    # ------------------------------------------------------------------ life cycle

    async def start(self, *, timeout: float = 30.0) -> bool:
        """Start the watches; wait until each has listed once (or ``timeout``).
        Returns whether they all did; they keep trying either way."""
        self._tasks = [asyncio.create_task(w.run(), name=f"watch {w.kind}") for w in self.watches]
        self._tasks.append(asyncio.create_task(self._write_statuses(), name="policy status"))
        try:
            await asyncio.wait_for(asyncio.gather(*(w.synced() for w in self.watches)), timeout)
            return True
        except TimeoutError:
            log.warning("Kubernetes: not every list succeeded within %g s; still trying", timeout)
            return False

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    @property
    def synced(self) -> bool:
        return all(w.stats.synced_at is not None for w in self.watches)

    # ------------------------------------------------------------------ what we know

    def endpoints(self) -> list[PodEndpoint]:
        return [
            PodEndpoint(
                pod.key, endpoint_labels(pod, self.namespaces.get(pod.namespace, {})), pod.ip
            )
            for pod in sorted(self.pods.values(), key=lambda p: p.key)
            if pod.ip and not pod.host_network and not pod.finished and pod.node == self.node
        ]

    def policies(self) -> list[Policy]:
        return [p for key in sorted(self.objects) for p in self.objects[key].policies]

    def policy_errors(self) -> dict[str, str]:
        return {key: o.error for key, o in sorted(self.objects.items()) if o.error}

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "synced": self.synced,
            "pods": len(self.pods),
            "endpoints": len(self.endpoints()),
            "namespaces": len(self.namespaces),
            "policy_objects": len(self.objects),
            "policies": len(self.policies()),
            "policy_errors": self.policy_errors(),
            "policy_revision": self.revision,
            "status_writes": self.status_writes,
            "status_write_errors": self.status_write_errors,
            "watches": {w.kind: w.stats.as_dict() for w in self.watches},
        }

    # ------------------------------------------------------------------ the sink

    def replace(self, kind: str, objects: list[Obj]) -> None:
        if kind == SECRET:
            assert self.secrets is not None
            self._changed("secrets", self.secrets.replace(objects))
        elif kind == "Pod":
            before = self.endpoints()
            self.pods = {p.key: p for p in map(pod_from, objects)}
            self._changed("pods", before != self.endpoints())
        elif kind == "Namespace":
            before = self.endpoints()
            self.namespaces = {str(meta(o).get("name")): namespace_labels(o) for o in objects}
            self._changed("pods", before != self.endpoints())
        else:
            before_policies = self.policies()
            keys = set()
            for obj in objects:
                keys.add(object_key(kind, obj))
                self._judge(kind, obj)
            for key in [k for k, o in self.objects.items() if o.kind == kind and k not in keys]:
                del self.objects[key]
            self._policies_changed(before_policies)

    def apply(self, kind: str, event: str, obj: Obj) -> None:
        if kind == SECRET:
            assert self.secrets is not None
            self._changed("secrets", self.secrets.apply(event, obj))
        elif kind == "Pod":
            before = self.endpoints()
            pod = pod_from(obj)
            if event == "DELETED":
                self.pods.pop(pod.key, None)
            else:
                self.pods[pod.key] = pod
            self._changed("pods", before != self.endpoints())
        elif kind == "Namespace":
            before = self.endpoints()
            name = str(meta(obj).get("name"))
            if event == "DELETED":
                self.namespaces.pop(name, None)
            else:
                self.namespaces[name] = namespace_labels(obj)
            self._changed("pods", before != self.endpoints())
        else:
            before_policies = self.policies()
            if event == "DELETED":
                self.objects.pop(object_key(kind, obj), None)
            else:
                self._judge(kind, obj)
            self._policies_changed(before_policies)

    def _changed(self, what: str, changed: bool) -> None:
        if changed:
            self.on_change(what)

    def _policies_changed(self, before: list[Policy]) -> None:
        if self.policies() != before:
            self.revision += 1
            self.on_change("policies")

    def _judge(self, kind: str, obj: Obj) -> None:
        key, stamp = object_key(kind, obj), spec_stamp(obj)
        m = meta(obj)
        current = self.objects.get(key)
        if current is not None and current.stamp == stamp:
            return  # our own status write, or a change of nothing we read
        if current is None:
            current = self.objects[key] = PolicyObject(
                kind, str(m.get("namespace") or ""), str(m.get("name")), stamp
            )
        current.stamp = stamp
        try:
            current.policies = compile_policy_object(kind, obj)
            current.error = None
        except PolicyError as err:
            current.error = str(err)
            log.error(
                "policy %s rejected, %s: %s",
                key,
                "its last good version stays in force" if current.policies else "nothing changes",
                err,
            )
        if said_by(obj, self.node) == (current.error is None, current.error):
            current.reported = (stamp, current.error)  # an agent restart writes nothing
        else:
            self._pending_status.put_nowait(key)

    # ------------------------------------------------------------------ status writes

    async def _write_statuses(self) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            key = await self._pending_status.get()
            obj = self.objects.get(key)
            if obj is None or obj.reported == (obj.stamp, obj.error):
                continue
            try:
                await self._write_status(obj)
                obj.reported = (obj.stamp, obj.error)
                self.status_writes += 1
                backoff.reset()
            except ApiException as e:
                if e.status == 404:
                    continue  # deleted meanwhile
                self.status_write_errors += 1
                log.warning("status of %s not written (%s %s); retrying", key, e.status, e.reason)
                await asyncio.sleep(backoff.next())
                self._pending_status.put_nowait(key)
            except (OSError, TimeoutError) as e:
                self.status_write_errors += 1
                log.warning("status of %s not written (%s); retrying", key, e)
                await asyncio.sleep(backoff.next())
                self._pending_status.put_nowait(key)

    async def _write_status(self, obj: PolicyObject) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = node_status(obj.error is None, obj.error, self.revision, now)
        body: Mapping[str, Any] = {"status": {"nodes": {self.node: entry}}}
        # The client's default for a dict body is a JSON patch; ours is a merge patch.
        merge: dict[str, Any] = {"_content_type": "application/merge-patch+json"}
        if obj.kind == CNP:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, obj.namespace, PLURALS[CNP], obj.name, body, **merge
            )
        else:
            await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, PLURALS[CCNP], obj.name, body, **merge
            )
