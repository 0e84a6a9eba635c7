"""Cluster-wide identity allocation with etcd transactions, no lock.

The rule that makes it safe: **a label set's references all carry one
number**, and a reference exists only beside the id key that maps that number
back to the label set. Every way of writing a reference is one transaction
whose compares keep that true:

- ``create_txn`` (a number nobody holds): the id key ``id/N`` does not exist
  *and* no reference to the label set exists -> create ``id/N = labels`` and
  our reference ``value/<labels>/<node> = N`` together;
- ``reuse_txn`` (an id key for the label set exists, no node refers to it
  any more, it waits for collection): ``id/N`` still holds the labels *and*
  no reference exists -> create our reference to N;
- ``join_txn`` (other nodes refer to N): ``id/N`` still holds the labels *and*
  every existing reference says N -> create ours.

The first two both require "no reference yet", so of two agents that race
for the first reference to a label set only one commits; the other's failure
branch reads back the reference that won and it joins that number on its next
attempt. Two label sets never share a number because ``id/N`` is only created
when absent and only joined while it holds the same labels. The collector
(``gc.py``) deletes ``id/N`` only when no reference exists, in one
transaction, so a reference never outlives its id key.

A failed attempt costs one transaction and tells the next one what to do
(its failure branch reads the first reference and the id key): no extra
round trip, no global lock. New numbers are drawn at random from the free
part of 256-65535, as Cilium does, so agents allocating different label sets
at the same moment rarely pick the same one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from l7proxy.cluster.keys import (
    FIRST_CLUSTER_IDENTITY,
    LAST_CLUSTER_IDENTITY,
    Layout,
    encode_labels,
)
from l7proxy.cluster.kv import (
    Delete,
    Etcd,
    Get,
    Put,
    Txn,
    TxnResult,
    absent,
    all_under_are,
    none_under,
    value_is,
)


class AllocationError(RuntimeError):
    """No number could be had for a label set (the range is full, or too many conflicts)."""


# --------------------------------------------------------------------- the transactions


def _why(layout: Layout, label_key: str, number: int) -> tuple[Get, Get]:
    """What a failed attempt reads back: the first reference, and the id key it aimed at."""
    return Get(layout.refs_prefix(label_key), prefix=True, limit=1), Get(layout.id_key(number))


def create_txn(layout: Layout, label_key: str, node: str, number: int, lease: int) -> Txn:
    id_key, refs = layout.id_key(number), layout.refs_prefix(label_key)
    return Txn(
        compare=(absent(id_key), none_under(refs)),
        success=(
            Put(id_key, label_key.encode()),
            Put(layout.ref_key(label_key, node), str(number).encode(), lease),
        ),
        failure=_why(layout, label_key, number),
    )


def reuse_txn(layout: Layout, label_key: str, node: str, number: int, lease: int) -> Txn:
    return Txn(
        compare=(
            value_is(layout.id_key(number), label_key.encode()),
            none_under(layout.refs_prefix(label_key)),
        ),
        success=(Put(layout.ref_key(label_key, node), str(number).encode(), lease),),
        failure=_why(layout, label_key, number),
    )


def join_txn(layout: Layout, label_key: str, node: str, number: int, lease: int) -> Txn:
    return Txn(
        compare=(
            value_is(layout.id_key(number), label_key.encode()),
            all_under_are(layout.refs_prefix(label_key), str(number).encode()),
        ),
        success=(Put(layout.ref_key(label_key, node), str(number).encode(), lease),),
        failure=_why(layout, label_key, number),
    )


def release_txn(layout: Layout, label_key: str, node: str, number: int) -> Txn:
    ref = layout.ref_key(label_key, node)
    return Txn(compare=(value_is(ref, str(number).encode()),), success=(Delete(ref),))


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the next attempt does: ``join`` a number others refer to, ``reuse``
    an unreferenced id key that holds the labels, or ``create`` a new one."""

    kind: str  # join | reuse | create
    number: int | None = None


def after_failure(label_key: str, number: int, result: TxnResult) -> Attempt:
    """Read a failed attempt's failure branch: what to try next."""
    refs, id_kv = result.gets
    if refs:
        return Attempt("join", int(refs[0].value))
    if id_kv and id_kv[0].value == label_key.encode():
        return Attempt("reuse", number)
    return Attempt("create")


# --------------------------------------------------------------------- the id table


class IdentityTable:
    """Number <-> label key, as the identities watch last saw them."""

    def __init__(self) -> None:
        self.by_number: dict[int, str] = {}
        self.by_key: dict[str, set[int]] = {}

    def update(self, number: int, label_key: str | None) -> None:
        old = self.by_number.pop(number, None)
        if old is not None:
            numbers = self.by_key.get(old, set())
            numbers.discard(number)
            if not numbers:
                self.by_key.pop(old, None)
        if label_key is not None:
            self.by_number[number] = label_key
            self.by_key.setdefault(label_key, set()).add(number)

    def number_for(self, label_key: str) -> int | None:
        numbers = self.by_key.get(label_key)
        return min(numbers) if numbers else None


# --------------------------------------------------------------------- the allocator


@dataclass
class LocalRef:
    number: int
    users: int = 0


@dataclass
class AllocatorStats:
    allocations: int = 0  # label sets that got a reference from this node
    transactions: int = 0
    conflicts: int = 0  # failed attempts
    created: int = 0  # id keys this node created
    restored: int = 0  # references written again after they were lost
    renumbered: int = 0  # label sets whose number changed on restore


@dataclass
class ClusterAllocator:
    """This node's side of the cluster-wide allocator; ``lease`` is read at each write."""

    kv: Etcd
    layout: Layout
    node: str
    table: IdentityTable
    lease: Callable[[], int]
    rng: random.Random = field(default_factory=random.Random)
    first: int = FIRST_CLUSTER_IDENTITY
    last: int = LAST_CLUSTER_IDENTITY
    max_attempts: int = 16
    local: dict[str, LocalRef] = field(default_factory=dict)
    stats: AllocatorStats = field(default_factory=AllocatorStats)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def allocate(self, labels: Mapping[str, str]) -> int:
        """The cluster-wide number of ``labels``; this node refers to it until ``release``."""
        label_key = encode_labels(labels)
        async with self._lock(label_key):
            ref = self.local.get(label_key)
            if ref is None:
                number = await self.reference(label_key)
                ref = self.local[label_key] = LocalRef(number)
                self.stats.allocations += 1
            ref.users += 1
            return ref.number

    async def release(self, labels: Mapping[str, str]) -> None:
        label_key = encode_labels(labels)
        async with self._lock(label_key):
            ref = self.local.get(label_key)
            if ref is None:
                return
            ref.users -= 1
            if ref.users <= 0:
                del self.local[label_key]
                self.stats.transactions += 1
                await self.kv.txn(release_txn(self.layout, label_key, self.node, ref.number))

    def ref_keys(self) -> dict[bytes, str]:
        """Our reference keys -> their label keys."""
        return {self.layout.ref_key(k, self.node): k for k in self.local}

    async def restore(self, label_keys: list[str]) -> dict[str, tuple[int, int]]:
        """Write our references again (the lease was lost, or a key deleted).

        Keeps each label set's number when it can; returns those whose number
        changed (their id key was collected meanwhile) as key -> (old, new).
        """
        renumbered = {}
        for label_key in label_keys:
            async with self._lock(label_key):
                ref = self.local.get(label_key)
                if ref is None:
                    continue
                number = await self.reference(label_key, prefer=ref.number)
                self.stats.restored += 1
                if number != ref.number:
                    renumbered[label_key] = (ref.number, number)
                    self.stats.renumbered += 1
                    ref.number = number
        return renumbered

    async def reference(self, label_key: str, prefer: int | None = None) -> int:
        """Write this node's reference to ``label_key``'s number, allocating it if need be."""
        known = prefer if prefer is not None else self.table.number_for(label_key)
        attempt = Attempt("join", known) if known is not None else Attempt("create")
        tried: set[int] = set()
        recreate = prefer  # a number of ours that was collected: take it again if free
        for _ in range(self.max_attempts):
            number = attempt.number
            if number is None:
                number = recreate if recreate is not None else self._free(tried)
                recreate = None
            build = {"join": join_txn, "reuse": reuse_txn, "create": create_txn}[attempt.kind]
            txn = build(self.layout, label_key, self.node, number, self.lease())
            self.stats.transactions += 1
            result = await self.kv.txn(txn)
            if result.succeeded:
                self.stats.created += attempt.kind == "create"
                return number
            self.stats.conflicts += 1
            tried.add(number)
            attempt = after_failure(label_key, number, result)
        raise AllocationError(f"no identity for {label_key!r} after {self.max_attempts} attempts")

    def _free(self, tried: set[int]) -> int:
        """A number neither the table nor this call has seen taken: random, then a scan."""
        span = self.last - self.first + 1
        taken = self.table.by_number
        for _ in range(64):
            n = self.first + self.rng.randrange(span)
            if n not in taken and n not in tried:
                return n
        start = self.rng.randrange(span)
        for i in range(span):
            n = self.first + (start + i) % span
            if n not in taken and n not in tried:
                return n
        raise AllocationError(f"identity range {self.first}-{self.last} is full")

    def _lock(self, label_key: str) -> asyncio.Lock:
        lock = self._locks.get(label_key)
        if lock is None:
            lock = self._locks[label_key] = asyncio.Lock()
        return lock
