"""This node's lease, and the plain keys it owns under it.

Every key a node writes (its node key, its ipcache entries, its identity
references) hangs on one lease, so a dead node's keys expire together.
``Session`` grants the lease, keeps it alive, and remembers the plain keys
(node, ipcache) with their values so it can write them again when they are
found gone: the lease expired while we were cut off from etcd (keepalive
answers TTL 0), the keys attached to it are fewer than ours (a sweep of
``LeaseTimeToLive``), or a watch saw one deleted. Identity references are
written again by the allocator, which must go through its transactions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from l7proxy.cluster.kv import Etcd

log = logging.getLogger("l7proxy.cluster")


@dataclass
class Session:
    kv: Etcd
    ttl: int
    lease: int = 0
    owned: dict[bytes, bytes] = field(default_factory=dict)
    leases_lost: int = 0
    rewritten: int = 0

    async def start(self) -> None:
        self.lease = await self.kv.grant(self.ttl)

    async def put(self, key: bytes, value: bytes) -> None:
        self.owned[key] = value
        await self.kv.put(key, value, self.lease)

    async def delete(self, key: bytes) -> None:
        self.owned.pop(key, None)
        await self.kv.delete(key)

    async def keepalive(self) -> bool:
        """Renew the lease; False if it was gone (then a new one is granted and
        the owned keys are written again: the caller restores the references)."""
        if await self.kv.keepalive(self.lease) > 0:
            return True
        await self.renew()
        return False

    async def renew(self) -> None:
        old = self.lease
        self.leases_lost += 1
        self.lease = await self.kv.grant(self.ttl)
        log.warning(
            "lease %x was gone; granted %x, writing %d keys again", old, self.lease, len(self.owned)
        )
        await self.rewrite(list(self.owned))

    async def rewrite(self, keys: list[bytes]) -> None:
        for key in keys:
            value = self.owned.get(key)
            if value is not None:
                await self.kv.put(key, value, self.lease)
                self.rewritten += 1

    async def attached(self) -> set[bytes] | None:
        """The keys on our lease now; None if the lease is gone."""
        ttl, keys = await self.kv.lease_keys(self.lease)
        return keys if ttl > 0 else None

    async def revoke(self) -> None:
        if self.lease:
            await self.kv.revoke(self.lease)
            self.lease = 0
