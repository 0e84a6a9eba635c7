"""A real etcd for this folder's tests (one per module, data on tmpfs), and helpers.

Each test works under its own key prefix, so tests that share a server never
see each other's keys.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from l7proxy.cluster.store import ClusterConfig, ClusterStore
from tests.support import etcd as etcd_support

_prefixes = itertools.count()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"t{next(_prefixes)}-{request.node.name[:40]}/state".replace("[", "-").replace("]", "")


@pytest.fixture
def config(etcd: etcd_support.EtcdServer, prefix: str) -> Callable[..., ClusterConfig]:
    """``config("node-1", lease_ttl=2)``: a node of this test's cluster, quick to react."""

    def make(node: str, port: int | None = None, **overrides: Any) -> ClusterConfig:
        settings: dict[str, Any] = dict(
            node=node,
            etcd=(etcd.host, port or etcd.port),
            prefix=prefix,
            node_ips=(f"192.0.2.{sum(map(ord, node)) % 250 + 1}",),
            lease_ttl=30,
            sync_every=0.5,
            rate=0,  # no budget unless a test sets one
            backoff_base=0.05,
            backoff_cap=0.5,
            timeout=2.0,
        )
        settings.update(overrides)
        return ClusterConfig(**settings)

    return make


@asynccontextmanager
async def running(*configs: ClusterConfig) -> AsyncIterator[list[ClusterStore]]:
    """Start every store (together), stop them all however the block ends."""
    stores = [ClusterStore(c) for c in configs]
    try:
        await asyncio.gather(*(s.start(timeout=10) for s in stores))
        yield stores
    finally:
        await asyncio.gather(*(s.stop() for s in stores), return_exceptions=True)


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> float:
    """Poll ``check`` until true; fail after ``timeout`` seconds. Returns the seconds taken."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what or check}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started
