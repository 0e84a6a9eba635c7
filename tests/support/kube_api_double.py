"""A **test double** of the Kubernetes API server: just enough of it for the official
client (``kubernetes_asyncio``) to work unchanged against it. It is not a Kubernetes.

No kube-apiserver can be installed on this machine (not in Debian, not on PyPI or npm),
so this stands in for one, built the way the real one stores objects: in a real etcd
(the one of ``tests/support/etcd.py``), one key per object, with etcd's mod revision as
the object's ``resourceVersion`` and the store's revision as a list's. So history,
watches from a revision and ``410 Gone`` after a compaction are etcd's, not simulated.

    async with running_kube_api(etcd, prefix="t1") as api:
        api.url                       # http://127.0.0.1:PORT, bearer token api.token
        api.write_kubeconfig(path)    # what ``l7proxy run --k8s --kubeconfig`` reads
        await api.compact()           # etcd compaction: old resourceVersions are gone
        api.drop_watches()            # every open watch ends (an API server restart)
        api.refusing = True           # every request gets 503 (an API server outage)

Served, for ``pods`` and ``namespaces`` (core v1), ``ciliumnetworkpolicies``
(namespaced) and ``ciliumclusterwidenetworkpolicies`` (``cilium.io/v2``):
- get, list (``resourceVersion`` in the list's metadata; ``resourceVersionMatch=Exact``
  reads at that revision and answers 410 if it was compacted), create (409 if it
  exists), update (409 on a stale ``metadata.resourceVersion``), delete;
- ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and
  ``fieldSelector`` (``=``, ``==``, ``!=`` on any dotted field, e.g. ``spec.nodeName``,
  ``metadata.name``), on lists and watches;
- ``watch=true``: JSON lines of ADDED / MODIFIED / DELETED, from ``resourceVersion``
  (events after it), or from now after ADDED for every current object when none is
  given; an object that stops matching the selectors arrives as DELETED, one that
  starts as ADDED (as the real server does); BOOKMARK lines every ``bookmark_every``
  seconds with ``allowWatchBookmarks``; ``timeoutSeconds`` ends the stream; a
  compacted start revision is an ERROR event with a 410 ``Expired`` Status;
- the ``/status`` subresource of the two Cilium kinds: PUT (only ``status`` is taken)
  and PATCH with ``application/merge-patch+json`` (RFC 7386); their main resource's
  PUT keeps the stored status and bumps ``metadata.generation`` when the spec changes.

Left out, deliberately: admission, defaulting and validation (a CNP's spec is stored as
sent, which is how tests put bad policies in), namespaces' existence checks, pods'
status subresource (a pod's ``status.podIP`` is stored as created), ``generateName``,
pagination (``limit``/``continue``), protobuf, and every other resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from l7proxy.cluster.kv import (
    Delete,
    Etcd,
    KeyValue,
    KvCompacted,
    KvError,
    KvUnavailable,
    Put,
    Txn,
    absent,
    unchanged_since,
)
from tests.support.etcd import EtcdServer, free_port

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = {
    (r.group, r.version, r.plural): r
    for r in (
        Resource("", "v1", "pods", "Pod", True, False),
        Resource("", "v1", "namespaces", "Namespace", False, False),
        Resource("", "v1", "secrets", "Secret", True, False),
        Resource("cilium.io", "v2", "ciliumnetworkpolicies", "CiliumNetworkPolicy", True, True),
        Resource(
            "cilium.io",
            "v2",
            "ciliumclusterwidenetworkpolicies",
            "CiliumClusterwideNetworkPolicy",
            False,
            True,
        ),
    )
}


class ApiError(Exception):
    """Answered as a ``Status`` object with ``code``."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


# ----------------------------------------------------------------------- selectors


Match = Callable[[Obj], bool]


def _split_terms(text: str) -> list[str]:
    """Commas separate terms, except inside ``in (a,b)``."""
    terms, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    terms.append(current.strip())
    return [t for t in terms if t]


_SET_TERM = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)$")


def label_selector(text: str) -> Match:
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_terms(text):
        if m := _SET_TERM.match(term):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}
            if op == "in":
                tests.append(lambda ls, k=key, vs=values: ls.get(k) in vs)
            else:
                tests.append(lambda ls, k=key, vs=values: ls.get(k) not in vs)
        elif "!=" in term:
            key, value = (p.strip() for p in term.split("!=", 1))
            tests.append(lambda ls, k=key, v=value: ls.get(k) != v)
        elif "=" in term:
            key, value = (p.strip() for p in term.replace("==", "=").split("=", 1))
            tests.append(lambda ls, k=key, v=value: ls.get(k) == v)
        elif term.startswith("!"):
            absent_key = term[1:].strip()
            tests.append(lambda ls, k=absent_key: k not in ls)
        elif re.fullmatch(r"[A-Za-z0-9_./-]+", term):
            tests.append(lambda ls, k=term: k in ls)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")

    def match(obj: Obj) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(t(labels) for t in tests)

    return match


def _field(obj: Obj, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


def field_selector(text: str) -> Match:
    tests: list[Match] = []
    for term in _split_terms(text):
        if "!=" in term:
            path, value = (p.strip() for p in term.split("!=", 1))
            tests.append(lambda o, p=path, v=value: _field(o, p) != v)
        elif "=" in term:
            path, value = (p.strip() for p in term.replace("==", "=").split("=", 1))
            tests.append(lambda o, p=path, v=value: _field(o, p) == v)
        else:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
    return lambda obj: all(t(obj) for t in tests)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# ----------------------------------------------------------------------- the server


@dataclass
class Where:
    """What a request's path names."""

    resource: Resource
    namespace: str  # "" = every namespace (lists), or a cluster-scoped resource
    name: str  # "" = the collection
    status: bool  # the /status subresource


class KubeApiDouble:
    def __init__(
        self,
        etcd: EtcdServer,
        prefix: str,
        *,
        bookmark_every: float = 1.0,
        host: str = "127.0.0.1",
    ):
        self.etcd_server = etcd
        self.prefix = prefix.strip("/")
        self.bookmark_every = bookmark_every
        self.host = host
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.refusing = False
        self.kv = Etcd(etcd.host, etcd.port, rate=0, timeout=5.0)
        self.requests: list[tuple[str, str]] = []  # (method, path?query), in order
        self._watches: set[asyncio.Event] = set()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- life cycle

    async def start(self) -> None:
        await self.kv.connect()
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/api/{version}/{tail:.*}", self._handle)
        app.router.add_route("*", "/apis/{group}/{version}/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.kv.close()

    def drop_watches(self) -> None:
        """End every open watch stream, as an API server restart does."""
        for ended in self._watches:
            ended.set()

    async def compact(self) -> int:
        """Compact etcd's history up to now; returns that revision."""
        _, revision = await self.kv.list_prefix(self._key_prefix(), keys_only=True)
        await self.kv.compact(revision)
        return revision

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": self.token}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "agent"}}],
            "current-context": "double",
        }
        path.write_text(json.dumps(config))
        return path

    # -- keys

    def _key_prefix(self) -> bytes:
        return f"/{self.prefix}/registry/".encode()

    def _key(self, r: Resource, namespace: str, name: str) -> bytes:
        group = r.group or "core"
        scope = f"{namespace}/" if r.namespaced and namespace else ""
        return f"/{self.prefix}/registry/{group}/{r.plural}/{scope}{name}".encode()

    def _collection(self, r: Resource, namespace: str) -> bytes:
        group = r.group or "core"
        scope = f"{namespace}/" if r.namespaced and namespace else ""
        return f"/{self.prefix}/registry/{group}/{r.plural}/{scope}".encode()

    def _decode(self, r: Resource, kv: KeyValue, revision: int | None = None) -> Obj:
        obj: Obj = json.loads(kv.value)
        obj["apiVersion"], obj["kind"] = r.api_version, r.kind
        obj.setdefault("metadata", {})["resourceVersion"] = str(revision or kv.mod_revision)
        return obj

    # -- HTTP

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        try:
            if self.refusing:
                raise ApiError(503, "ServiceUnavailable", "the test refuses every request")
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)
        except KvUnavailable as e:
            return web.json_response(
                ApiError(503, "ServiceUnavailable", str(e)).status(), status=503
            )

    def _where(self, request: web.Request) -> Where:
        group = request.match_info.get("group", "")
        version = request.match_info["version"]
        parts = [p for p in request.match_info["tail"].split("/") if p]
        namespace = ""
        if (
            len(parts) >= 3
            and parts[0] == "namespaces"
            and (group, version, parts[2]) in RESOURCES
            and RESOURCES[(group, version, parts[2])].namespaced
        ):
            namespace, parts = parts[1], parts[2:]
        if not parts or (group, version, parts[0]) not in RESOURCES:
            raise ApiError(404, "NotFound", f"the server could not find {request.path}")
        resource = RESOURCES[(group, version, parts[0])]
        if len(parts) > 3 or (len(parts) == 3 and parts[2] != "status"):
            raise ApiError(404, "NotFound", f"the server could not find {request.path}")
        if resource.namespaced and len(parts) > 1 and not namespace:
            raise ApiError(404, "NotFound", f"{resource.plural} are namespaced")
        status = len(parts) == 3
        if status and not resource.status_subresource:
            raise ApiError(404, "NotFound", f"{resource.plural} have no status subresource here")
        return Where(resource, namespace, parts[1] if len(parts) > 1 else "", status)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        where = self._where(request)
        method = request.method
        if not where.name:
            if method == "GET":
                if _flag(request.query.get("watch")):
                    return await self._watch(request, where)
                return web.json_response(await self._list(request, where))
            if method == "POST":
                return web.json_response(
                    await self._create(where, await request.json()), status=201
                )
        else:
            if method == "GET":
                return web.json_response(await self._get(where))
            if method == "PUT":
                return web.json_response(await self._update(where, await request.json()))
            if method == "PATCH":
                kind = request.content_type
                if kind != "application/merge-patch+json":
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        f"this double takes merge patches only, not {kind}",
                    )
                return web.json_response(await self._patch(where, await request.json()))
            if method == "DELETE":
                return web.json_response(await self._delete(where))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {request.path}")

    # -- verbs

    def _selectors(self, request: web.Request) -> Match:
        labels = label_selector(request.query.get("labelSelector", ""))
        fields = field_selector(request.query.get("fieldSelector", ""))
        return lambda obj: labels(obj) and fields(obj)

    async def _list(self, request: web.Request, where: Where) -> Obj:
        r, match = where.resource, self._selectors(request)
        revision = 0
        if request.query.get("resourceVersionMatch") == "Exact":
            revision = int(request.query.get("resourceVersion") or 0)
        try:
            kvs, revision = await self.kv.list_prefix(
                self._collection(r, where.namespace), revision=revision
            )
        except KvCompacted:
            raise ApiError(
                410, "Expired", "The resourceVersion for the provided list is too old."
            ) from None
        items = [o for o in (self._decode(r, kv) for kv in kvs) if match(o)]
        return {
            "apiVersion": r.api_version,
            "kind": f"{r.kind}List",
            "metadata": {"resourceVersion": str(revision)},
            "items": items,
        }

    async def _get(self, where: Where) -> Obj:
        kv = await self.kv.get(self._key(where.resource, where.namespace, where.name))
        if kv is None:
            raise self._not_found(where)
        return self._decode(where.resource, kv)

    def _not_found(self, where: Where) -> ApiError:
        return ApiError(404, "NotFound", f'{where.resource.plural} "{where.name}" not found')

    async def _create(self, where: Where, body: Obj) -> Obj:
        r = where.resource
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if r.namespaced:
            if meta.get("namespace", where.namespace) != where.namespace or not where.namespace:
                raise ApiError(
                    400, "BadRequest", "the namespace of the object does not match the request"
                )
            meta["namespace"] = where.namespace
        meta.pop("resourceVersion", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if r.status_subresource:
            meta["generation"] = 1
        key = self._key(r, where.namespace, name)
        result = await self.kv.txn(Txn((absent(key),), (Put(key, _encode(body)),)))
        if not result.succeeded:
            raise ApiError(409, "AlreadyExists", f'{r.plural} "{name}" already exists')
        return self._decode(r, KeyValue(key, _encode(body), mod_revision=result.revision))

    async def _replace(
        self, where: Where, change: Callable[[Obj], Obj], expected: str | None
    ) -> Obj:
        """Read, change, write back if nobody wrote in between (else 409)."""
        r = where.resource
        key = self._key(r, where.namespace, where.name)
        current = await self.kv.get(key)
        if current is None:
            raise self._not_found(where)
        if expected and expected != str(current.mod_revision):
            raise self._conflict(where)
        old: Obj = json.loads(current.value)
        new = change(old)
        value = _encode(new)
        result = await self.kv.txn(
            Txn((unchanged_since(key, current.mod_revision),), (Put(key, value),))
        )
        if not result.succeeded:
            raise self._conflict(where)
        return self._decode(r, KeyValue(key, value, mod_revision=result.revision))

    def _conflict(self, where: Where) -> ApiError:
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {where.resource.plural} "{where.name}": '
            "the object has been modified; please apply your changes to the latest version "
            "and try again",
        )

    async def _update(self, where: Where, body: Obj) -> Obj:
        r = where.resource
        meta = body.get("metadata") or {}
        if meta.get("name", where.name) != where.name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the request")

        def change(old: Obj) -> Obj:
            kept = {
                k: old["metadata"][k]
                for k in ("uid", "creationTimestamp", "generation", "namespace")
                if k in old["metadata"]
            }
            if where.status:  # only the status is taken
                return {**old, "status": body.get("status", {})}
            new = {**body, "metadata": {**meta, **kept}}
            new["metadata"].pop("resourceVersion", None)
            if r.status_subresource:
                new["status"] = old.get("status", {})
                if _spec(new) != _spec(old):
                    new["metadata"]["generation"] = int(kept.get("generation", 1)) + 1
            return new

        return await self._replace(where, change, meta.get("resourceVersion"))

    async def _patch(self, where: Where, patch: Obj) -> Obj:
        if not where.status:
            raise ApiError(
                405, "MethodNotAllowed", "this double patches the status subresource only"
            )

        def patched_status(old: Obj) -> Obj:
            status = merge_patch(old.get("status", {}), patch.get("status", {}))
            return {**old, "status": status or {}}

        expected = (patch.get("metadata") or {}).get("resourceVersion")
        return await self._replace(where, patched_status, expected)

    async def _delete(self, where: Where) -> Obj:
        r = where.resource
        key = self._key(r, where.namespace, where.name)
        current = await self.kv.get(key)
        if current is None:
            raise self._not_found(where)
        result = await self.kv.txn(
            Txn((unchanged_since(key, current.mod_revision),), (Delete(key),))
        )
        if not result.succeeded:
            raise self._conflict(where)
        return self._decode(r, current, result.revision)

    # -- watch

    async def _watch(self, request: web.Request, where: Where) -> web.StreamResponse:
        r, match = where.resource, self._selectors(request)
        bookmarks = _flag(request.query.get("allowWatchBookmarks"))
        timeout = float(request.query.get("timeoutSeconds") or 0) or None
        given = request.query.get("resourceVersion") or "0"
        collection = self._collection(r, where.namespace)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        lines: asyncio.Queue[Obj | None] = asyncio.Queue()
        ended = asyncio.Event()
        self._watches.add(ended)
        last = 0  # the newest revision this stream has seen

        async def send(kind: str, obj: Obj) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        async def pump(start: int) -> None:
            nonlocal last
            try:
                async for events in self.kv.watch(collection, start, prev_kv=True):
                    for ev in events:
                        last = max(last, ev.kv.mod_revision)
                        line = _event(r, ev.deleted, ev.kv, ev.prev, match, self._decode)
                        if line is not None:
                            await lines.put(line)
            except KvCompacted:
                await lines.put(
                    {
                        "type": "ERROR",
                        "object": ApiError(
                            410, "Expired", f"too old resource version: {start - 1}"
                        ).status(),
                    }
                )
            except KvError:
                pass
            await lines.put(None)

        try:
            if given == "0":  # from now, after every current object as ADDED
                kvs, last = await self.kv.list_prefix(collection)
                for kv in kvs:
                    obj = self._decode(r, kv)
                    if match(obj):
                        await send("ADDED", obj)
            else:
                last = int(given)
            pumping = asyncio.create_task(pump(last + 1))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            try:
                while not ended.is_set():
                    wait = self.bookmark_every
                    if deadline is not None:
                        wait = min(wait, deadline - loop.time())
                        if wait <= 0:
                            break
                    getting = asyncio.ensure_future(lines.get())
                    stopping = asyncio.ensure_future(ended.wait())
                    done, _ = await asyncio.wait(
                        {getting, stopping}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                    stopping.cancel()
                    if getting not in done:
                        getting.cancel()
                        if bookmarks and not ended.is_set() and last:
                            await send(
                                "BOOKMARK",
                                {
                                    "kind": r.kind,
                                    "apiVersion": r.api_version,
                                    "metadata": {"resourceVersion": str(last)},
                                },
                            )
                        continue
                    line = getting.result()
                    if line is None:
                        break
                    await send(line["type"], line["object"])
                    if line["type"] == "ERROR":
                        break
            finally:
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.discard(ended)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


def _event(
    r: Resource,
    deleted: bool,
    kv: KeyValue,
    prev: KeyValue | None,
    match: Match,
    decode: Callable[[Resource, KeyValue, int | None], Obj],
) -> Obj | None:
    """One etcd event as the watch event a client with these selectors sees, or None."""
    before = decode(r, prev, None) if prev is not None and prev.value else None
    was = before is not None and match(before)
    if deleted:
        if not was or before is None:
            return None
        before["metadata"]["resourceVersion"] = str(kv.mod_revision)
        return {"type": "DELETED", "object": before}
    after = decode(r, kv, None)
    now = match(after)
    if was and now:
        return {"type": "MODIFIED", "object": after}
    if now:
        return {"type": "ADDED", "object": after}
    if was:
        return {"type": "DELETED", "object": after}
    return None


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _spec(obj: Obj) -> Any:
    return (obj.get("spec"), obj.get("specs"))


def _encode(obj: Obj) -> bytes:
    stored = json.loads(json.dumps(obj))
    stored.get("metadata", {}).pop("resourceVersion", None)
    stored.pop("apiVersion", None)
    stored.pop("kind", None)
    return json.dumps(stored, sort_keys=True).encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.asynccontextmanager
async def running_kube_api(
    etcd: EtcdServer, prefix: str, **options: Any
) -> AsyncIterator[KubeApiDouble]:
    api = KubeApiDouble(etcd, prefix, **options)
    try:
        await api.start()
        yield api
    finally:
        await api.stop()
