"""List, then watch from the list's resourceVersion, through the official client.

One ``ResourceWatch`` per kind, as client-go's reflector does:

1. list (the objects and the list's ``resourceVersion``); hand the whole set to
   the sink, which reconciles (what is gone is deleted);
2. watch from that ``resourceVersion`` with bookmarks; each event goes to the
   sink; every event and bookmark moves the resourceVersion on;
3. a watch that ends (the server's ``timeoutSeconds``, a dropped connection, any
   error but 410) is opened again from the last resourceVersion: nothing is missed
   and nothing is listed again;
4. ``410 Gone`` (the server no longer has that history: etcd compacted it) means
   events were lost: list again (step 1), and the sink's reconciliation turns the
   fresh list into the changes that were missed, in one step.

Every retry waits a jittered back-off (``l7proxy.cluster.protect.Backoff``), so
a thousand agents whose API server restarts do not come back at the same
moment; it resets once a list or an event got through.

The official client's own ``Watch`` retries a 410 once with the *same*
resourceVersion and gives up otherwise; with ``timeoutSeconds`` set it hands the
410 to us, which is what we want.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

from l7proxy.cluster.protect import Backoff

log = logging.getLogger("l7proxy.kube")

Obj = Mapping[str, Any]
Lister = Callable[..., Awaitable[Any]]


class Sink(Protocol):
    def replace(self, kind: str, objects: list[Obj]) -> None:
        """A fresh list: every object there is, now."""

    def apply(self, kind: str, event: str, obj: Obj) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""


@dataclass
class WatchStats:
    lists: int = 0
    relists_gone: int = 0  # lists made because the server answered 410 Gone
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    errors: int = 0
    last_error: str | None = None
    resource_version: str | None = None
    synced_at: float | None = None
    _synced: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class ResourceWatch:
    """``lister``: the official client's list call for the kind (e.g.
    ``CoreV1Api.list_pod_for_all_namespaces``), ``params`` its arguments
    (selectors, group/version/plural of a custom resource)."""

    def __init__(
        self,
        kind: str,
        lister: Lister,
        sink: Sink,
        *,
        args: tuple[Any, ...] = (),
        params: Mapping[str, Any] | None = None,
        backoff: Backoff | None = None,
        timeout_seconds: int = 300,
    ):
        self.kind = kind
        self.lister = lister
        self.sink = sink
        self.args = args
        self.params = dict(params or {})
        self.backoff = backoff or Backoff(base=0.2, cap=30.0)
        self.timeout_seconds = timeout_seconds
        self.stats = WatchStats()

    async def synced(self) -> None:
        await self.stats._synced.wait()

    async def run(self) -> None:
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                started, seen = time.monotonic(), self.stats.events + self.stats.bookmarks
                version = await self._watch(version)
                if (
                    time.monotonic() - started < 1.0
                    and self.stats.events + self.stats.bookmarks == seen
                ):
                    # a server that ends every watch at once must not make us spin
                    await asyncio.sleep(self.backoff.next())
            except ApiException as e:
                if e.status == 410:
                    self.stats.relists_gone += 1
                    log.info(
                        "%s: resourceVersion %s is gone (410): listing again", self.kind, version
                    )
                    version = None
                else:
                    self._failed(f"{e.status} {e.reason}")
                await asyncio.sleep(self.backoff.next())
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as e:
                self._failed(f"{type(e).__name__}: {e}")
                await asyncio.sleep(self.backoff.next())

    def _failed(self, why: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = why
        log.warning("%s: list/watch failed (%s); retrying after a back-off", self.kind, why)

    async def _list(self) -> str:
        response = await self.lister(
            *self.args,
            **self.params,
            _preload_content=False,
            _request_timeout=self.timeout_seconds,
        )
        async with response:
            if response.status >= 400:
                raise ApiException(status=response.status, reason=await response.text())
            listed = json.loads(await response.read())
        version = str(listed["metadata"]["resourceVersion"])
        self.sink.replace(self.kind, list(listed.get("items") or []))
        self.stats.lists += 1
        self.stats.resource_version = version
        self.stats.synced_at = time.time()
        self.stats._synced.set()
        self.backoff.reset()
        return version

    async def _watch(self, version: str) -> str:
        """Watch from ``version`` until the stream ends; returns the version reached."""
        self.stats.watches += 1
        # return_type "object": events stay the API's JSON (no model round trip).
        async with watch.Watch(return_type="object") as stream:
            async for event in stream.stream(
                self.lister,
                *self.args,
                **self.params,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.timeout_seconds,
                _request_timeout=self.timeout_seconds + 30,
            ):
                obj = event["raw_object"]
                version = str(obj["metadata"]["resourceVersion"])
                self.stats.resource_version = version
                if event["type"] == "BOOKMARK":
                    self.stats.bookmarks += 1
                    continue
                self.sink.apply(self.kind, str(event["type"]), obj)
                self.stats.events += 1
                self.backoff.reset()
        return version
