"""Identity garbage collection: an id key nobody refers to, for a grace period, goes.

A node's references live on its lease, so when a node dies its references
expire with it; the id keys they pointed at stay (other nodes may still use
the number, or a pod may come back). A sweep lists the id keys and the
references; an id key none refers to starts a clock, and once the clock
passes ``grace`` the key is deleted by one transaction that holds only if the
key is unchanged *and* no reference to its label set exists at that moment.
A node that refers to it again in between (``reuse_txn``) stops the clock,
or makes the delete fail: an identity is never collected while referenced.

Any number of agents may sweep; the transaction makes double work harmless.
At scale one sweeper is enough (Cilium's operator does this job), since each
sweep lists every reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from l7proxy.cluster.keys import Layout
from l7proxy.cluster.kv import Delete, Etcd, KeyValue, Txn, none_under, unchanged_since


def collect_txn(layout: Layout, id_kv: KeyValue) -> Txn:
    return Txn(
        compare=(
            unchanged_since(id_kv.key, id_kv.mod_revision),
            none_under(layout.refs_prefix(id_kv.value.decode())),
        ),
        success=(Delete(id_kv.key),),
    )


@dataclass
class IdentityGc:
    kv: Etcd
    layout: Layout
    grace: float
    clock: Callable[[], float] = time.monotonic
    unreferenced_since: dict[int, float] = field(default_factory=dict)
    collected: list[int] = field(default_factory=list)

    def due(self, ids: Iterable[KeyValue], refs: Iterable[KeyValue], now: float) -> list[KeyValue]:
        """The id keys unreferenced for ``grace`` seconds; starts and stops the clocks."""
        referenced = set()
        for kv in refs:
            split = self.layout.split_ref(kv.key)
            if split is not None:
                referenced.add(split[0])
        out, seen = [], set()
        for kv in ids:
            number = self.layout.number_of(kv.key)
            if number is None:
                continue
            seen.add(number)
            if kv.value.decode() in referenced:
                self.unreferenced_since.pop(number, None)
                continue
            since = self.unreferenced_since.setdefault(number, now)
            if now - since >= self.grace:
                out.append(kv)
        for number in set(self.unreferenced_since) - seen:
            del self.unreferenced_since[number]
        return out

    async def sweep(self) -> list[int]:
        """One pass; returns the numbers collected."""
        ids, _ = await self.kv.list_prefix(self.layout.ids)
        refs, _ = await self.kv.list_prefix(self.layout.values, keys_only=True)
        gone = []
        for kv in self.due(ids, refs, self.clock()):
            result = await self.kv.txn(collect_txn(self.layout, kv))
            number = self.layout.number_of(kv.key)
            assert number is not None
            self.unreferenced_since.pop(number, None)
            if result.succeeded:
                gone.append(number)
        self.collected.extend(gone)
        return gone
