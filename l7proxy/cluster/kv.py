"""The one etcd client of the package: typed requests over aetcd's connection.

aetcd (asyncio, grpc) brings the channel and etcd's generated v3 API, which
works with etcd 3.4 and protobuf >= 5.27. Requests are built here from those
messages rather than through aetcd's helpers, because the package needs what
the helpers leave out: ranges with ``limit`` and ``revision`` (paginated lists
at one revision), compares over a key range, ``Get`` inside a transaction's
failure branch, ``hasleader`` metadata (a request to a member that lost its
leader fails instead of hanging), and a watch that *ends with an error* on
cancellation, compaction or a lost stream (aetcd's own watches do not resume
after an etcd restart; the caller lists again and re-watches, see
``mirror.py``).

Every request first takes a token from the client's ``TokenBucket`` and is
counted in ``requests`` by kind, which is how the bench counts etcd requests
per allocation.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import aetcd
import grpc
from aetcd import rpc

from l7proxy.cluster.keys import prefix_end
from l7proxy.cluster.protect import TokenBucket

REQUIRE_LEADER = (("hasleader", "true"),)


class KvError(Exception):
    """A request to etcd failed; the caller backs off and tries again."""


class KvUnavailable(KvError):
    """etcd could not be reached, timed out, or has no leader."""


class KvCompacted(KvError):
    """The revision asked for was compacted away: list again from a fresh one."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {revision})")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    deleted: bool
    kv: KeyValue
    prev: KeyValue | None = None  # the key's previous version, on watches asked for it


# --------------------------------------------------------------------- transactions as data


@dataclass(frozen=True, slots=True)
class Cmp:
    """One compare. With ``prefix``, it must hold for *every* key under ``key``
    (an empty range compares as a key that does not exist: create revision 0,
    and no value at all, so a value compare on an empty range fails)."""

    key: bytes
    target: Literal["create", "value", "mod"]
    arg: int | bytes
    prefix: bool = False


def absent(key: bytes) -> Cmp:
    return Cmp(key, "create", 0)


def none_under(prefix: bytes) -> Cmp:
    return Cmp(prefix, "create", 0, prefix=True)


def value_is(key: bytes, value: bytes) -> Cmp:
    return Cmp(key, "value", value)


def all_under_are(prefix: bytes, value: bytes) -> Cmp:
    return Cmp(prefix, "value", value, prefix=True)


def unchanged_since(key: bytes, mod_revision: int) -> Cmp:
    return Cmp(key, "mod", mod_revision)


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes
    prefix: bool = False
    limit: int = 0


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class Txn:
    compare: tuple[Cmp, ...]
    success: tuple[Op, ...] = ()
    failure: tuple[Op, ...] = ()


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    gets: tuple[tuple[KeyValue, ...], ...] = ()  # one per Get of the branch taken, in order


# --------------------------------------------------------------------- the client


class Etcd:
    """A connection to one etcd endpoint. ``rate``/``burst``: the request budget."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        rate: float = 20.0,
        burst: float = 20.0,
        timeout: float = 5.0,
        reconnect_cap: float = 5.0,
    ) -> None:
        self.endpoint = f"{host}:{port}"
        self.timeout = timeout
        self.bucket = TokenBucket(rate, burst)
        self.requests: Counter[str] = Counter()
        options = {
            # gRPC reconnects on its own, with its own jittered back-off; cap it
            # so a healed link is used within seconds, not gRPC's default 2 min.
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": int(reconnect_cap * 1000),
            # a partition that drops packets (no reset) is noticed within 15 s;
            # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time)
            "grpc.keepalive_time_ms": 10_000,
            "grpc.keepalive_timeout_ms": 5_000,
        }
        self._client = aetcd.Client(host, port, timeout=int(max(1, timeout)), options=options)
        self._kv: Any = None
        self._lease: Any = None
        self._watch: Any = None
        self._maintenance: Any = None

    async def connect(self) -> None:
        try:
            await self._client.connect()
        except aetcd.ClientError as e:
            raise KvUnavailable(f"etcd {self.endpoint}: {e}") from None
        channel = self._client.channel
        self._kv = rpc.KVStub(channel)
        self._lease = rpc.LeaseStub(channel)
        self._watch = rpc.WatchStub(channel)
        self._maintenance = rpc.MaintenanceStub(channel)

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, kind: str, stub_method: Any, request: Any) -> Any:
        await self.bucket.acquire()
        self.requests[kind] += 1
        try:
            return await stub_method(request, timeout=self.timeout, metadata=REQUIRE_LEADER)
        except grpc.aio.AioRpcError as e:
            raise _mapped(e) from None

    # -- keys

    async def txn(self, txn: Txn) -> TxnResult:
        request = rpc.TxnRequest(
            compare=[_compare(c) for c in txn.compare],
            success=_ops(txn.success),
            failure=_ops(txn.failure),
        )
        reply = await self._call("txn", self._kv.Txn, request)
        gets = tuple(
            tuple(_kv(kv) for kv in r.response_range.kvs)
            for r in reply.responses
            if r.WhichOneof("response") == "response_range"
        )
        return TxnResult(bool(reply.succeeded), int(reply.header.revision), gets)

    async def get(self, key: bytes) -> KeyValue | None:
        reply = await self._call("range", self._kv.Range, rpc.RangeRequest(key=key))
        return _kv(reply.kvs[0]) if reply.kvs else None

    async def list_prefix(
        self, prefix: bytes, *, page: int = 1000, keys_only: bool = False, revision: int = 0
    ) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` at one revision (``revision``, or the latest),
        ``page`` keys a request.

        Returns the keys and the revision they were read at (watch from the
        next one). A compacted ``revision``, or a compaction between pages,
        raises ``KvCompacted``.
        """
        start, end = prefix, prefix_end(prefix)
        out: list[KeyValue] = []
        while True:
            request = rpc.RangeRequest(
                key=start, range_end=end, limit=page, revision=revision, keys_only=keys_only
            )
            reply = await self._call("range", self._kv.Range, request)
            revision = revision or int(reply.header.revision)
            out.extend(_kv(kv) for kv in reply.kvs)
            if not reply.more or not reply.kvs:
                return out, revision
            start = bytes(reply.kvs[-1].key) + b"\x00"

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        request = rpc.PutRequest(key=key, value=value, lease=lease)
        reply = await self._call("put", self._kv.Put, request)
        return int(reply.header.revision)

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        request = rpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        reply = await self._call("delete", self._kv.DeleteRange, request)
        return int(reply.deleted)

    async def compact(self, revision: int) -> None:
        request = rpc.CompactionRequest(revision=revision, physical=True)
        await self._call("compact", self._kv.Compact, request)

    # -- leases

    async def grant(self, ttl: int) -> int:
        reply = await self._call(
            "lease_grant", self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl)
        )
        if reply.error:
            raise KvError(f"lease grant: {reply.error}")
        return int(reply.ID)

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its new TTL in seconds, 0 if it is gone (expired or revoked)."""
        await self.bucket.acquire()
        self.requests["lease_keepalive"] += 1
        call = self._lease.LeaseKeepAlive(
            iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
            timeout=self.timeout,
            metadata=REQUIRE_LEADER,
        )
        try:
            async for reply in call:
                return max(0, int(reply.TTL))
        except grpc.aio.AioRpcError as e:
            raise _mapped(e) from None
        finally:
            call.cancel()
        raise KvUnavailable("lease keepalive stream ended without a reply")

    async def lease_keys(self, lease: int) -> tuple[int, set[bytes]]:
        """(remaining TTL, the keys attached); TTL <= 0 if the lease is gone."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease, keys=True)
        reply = await self._call("lease_ttl", self._lease.LeaseTimeToLive, request)
        return int(reply.TTL), {bytes(k) for k in reply.keys}

    async def revoke(self, lease: int) -> None:
        await self._call("lease_revoke", self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease))

    # -- watches

    async def watch(
        self, prefix: bytes, start_revision: int, *, prev_kv: bool = False
    ) -> AsyncIterator[list[Event]]:
        """Events under ``prefix`` from ``start_revision``, one list per etcd response.
        ``prev_kv``: each event carries the key's previous version (a deletion's last value).

        An empty list means the watch was created or etcd reported progress.
        Never ends quietly: a cancelled, compacted or broken watch raises.
        """
        await self.bucket.acquire()
        self.requests["watch"] += 1
        done = asyncio.Event()
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix,
                range_end=prefix_end(prefix),
                start_revision=start_revision,
                progress_notify=True,
                prev_kv=prev_kv,
            )
        )

        async def outgoing() -> AsyncIterator[Any]:
            yield create
            await done.wait()  # keep our side of the stream open

        call = self._watch.Watch(outgoing(), metadata=REQUIRE_LEADER)
        try:
            async for reply in call:
                if reply.compact_revision:
                    raise KvCompacted(int(reply.compact_revision))
                if reply.canceled:
                    raise KvError(f"watch cancelled by etcd: {reply.cancel_reason or 'no reason'}")
                yield [
                    Event(
                        ev.type == rpc.Event.DELETE,
                        _kv(ev.kv),
                        _kv(ev.prev_kv) if ev.HasField("prev_kv") else None,
                    )
                    for ev in reply.events
                ]
            raise KvUnavailable("watch stream ended")
        except grpc.aio.AioRpcError as e:
            raise _mapped(e) from None
        finally:
            done.set()
            call.cancel()


# --------------------------------------------------------------------- conversions


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        bytes(kv.key),
        bytes(kv.value),
        int(kv.create_revision),
        int(kv.mod_revision),
        int(kv.lease),
    )


_TARGETS = {"create": rpc.Compare.CREATE, "value": rpc.Compare.VALUE, "mod": rpc.Compare.MOD}


def _compare(c: Cmp) -> Any:
    msg = rpc.Compare(key=c.key, target=_TARGETS[c.target], result=rpc.Compare.EQUAL)
    if c.prefix:
        msg.range_end = prefix_end(c.key)
    if c.target == "value":
        assert isinstance(c.arg, bytes)
        msg.value = c.arg
    elif c.target == "create":
        msg.create_revision = int(c.arg)
    else:
        msg.mod_revision = int(c.arg)
    return msg


def _ops(ops: Iterable[Op]) -> list[Any]:
    out = []
    for op in ops:
        if isinstance(op, Put):
            out.append(
                rpc.RequestOp(
                    request_put=rpc.PutRequest(key=op.key, value=op.value, lease=op.lease)
                )
            )
        elif isinstance(op, Delete):
            out.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key)))
        else:
            request = rpc.RangeRequest(
                key=op.key, range_end=prefix_end(op.key) if op.prefix else b"", limit=op.limit
            )
            out.append(rpc.RequestOp(request_range=request))
    return out


def _mapped(e: Any) -> KvError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return KvCompacted(0)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return KvUnavailable(f"{code.name}: {details}")
    return KvError(f"{code.name}: {details}")
