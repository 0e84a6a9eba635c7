"""A local copy of one etcd prefix: list, watch, and on any trouble list again.

``Mirror`` is the data: the keys as last seen and the changes that a new
list or a batch of watch events makes to them. It does no I/O, so the
reconciling (a key missing from a fresh list was deleted while we were not
watching) is tested without etcd.

``PrefixWatch`` is the loop around it: list at one revision, watch from the
next, and when the watch fails for any reason (etcd restarted, the revision
was compacted, the leader was lost, the stream broke) back off with jitter,
list again from a fresh revision and reconcile. Changes go to ``deliver``
with ``relisted=True`` when they came from a list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from l7proxy.cluster.kv import Etcd, Event, KeyValue, KvError
from l7proxy.cluster.protect import Backoff

log = logging.getLogger("l7proxy.cluster")


@dataclass(frozen=True, slots=True)
class KeyChange:
    key: bytes
    value: bytes | None  # None: the key is gone
    prev: bytes | None  # None: the key is new


class Mirror:
    """The keys of one prefix as last seen, and the revision they were seen at."""

    def __init__(self) -> None:
        self.kvs: dict[bytes, KeyValue] = {}
        self.revision = 0
        self.listed = 0  # the revision of the last list

    def reset(self, kvs: Iterable[KeyValue], revision: int) -> list[KeyChange]:
        """Take a fresh list in whole; returns what changed since the last view."""
        fresh = {kv.key: kv for kv in kvs}
        changes = [KeyChange(k, None, old.value) for k, old in self.kvs.items() if k not in fresh]
        for key, kv in fresh.items():
            old = self.kvs.get(key)
            if old is None or old.value != kv.value:
                changes.append(KeyChange(key, kv.value, old.value if old else None))
        self.kvs = fresh
        self.revision = self.listed = revision
        return changes

    def apply(self, events: Iterable[Event]) -> list[KeyChange]:
        changes = []
        for ev in events:
            # Already in the list we started from. (Not ``<= self.revision``: the keys
            # of one transaction, or of one expired lease, share a revision.)
            if ev.kv.mod_revision and ev.kv.mod_revision <= self.listed:
                continue
            self.revision = max(self.revision, ev.kv.mod_revision)
            old = self.kvs.get(ev.kv.key)
            if ev.deleted:
                if old is not None:
                    del self.kvs[ev.kv.key]
                    changes.append(KeyChange(ev.kv.key, None, old.value))
            else:
                self.kvs[ev.kv.key] = ev.kv
                if old is None or old.value != ev.kv.value:
                    changes.append(KeyChange(ev.kv.key, ev.kv.value, old.value if old else None))
        return changes


Deliver = Callable[[list[KeyChange], bool], None]


class PrefixWatch:
    """Keeps ``mirror`` equal to etcd's keys under ``prefix``, for as long as ``run`` runs."""

    def __init__(self, kv: Etcd, prefix: bytes, deliver: Deliver, backoff: Backoff) -> None:
        self.kv = kv
        self.prefix = prefix
        self.deliver = deliver
        self.backoff = backoff
        self.mirror = Mirror()
        self.synced = asyncio.Event()
        self.lists = 0
        self.errors = 0
        self.last_error = ""

    async def run(self) -> None:
        while True:
            try:
                kvs, revision = await self.kv.list_prefix(self.prefix)
                self.lists += 1
                self.deliver(self.mirror.reset(kvs, revision), True)
                self.synced.set()
                async for events in self.kv.watch(self.prefix, revision + 1):
                    self.backoff.reset()  # the watch stands: the next failure starts afresh
                    changes = self.mirror.apply(events)
                    if changes:
                        self.deliver(changes, False)
            except Exception as e:  # noqa: BLE001 - whatever broke, the copy must recover
                self.errors += 1
                self.last_error = str(e) or type(e).__name__
                delay = self.backoff.next()
                log.log(
                    logging.WARNING if isinstance(e, KvError) else logging.ERROR,
                    "watch of %s failed (%s); listing again in %.2f s",
                    self.prefix.decode(errors="replace"),
                    self.last_error,
                    delay,
                    exc_info=not isinstance(e, KvError),
                )
                await asyncio.sleep(delay)
