"""API-firewall mode: the same pipeline, policy engine and flow log in front of
one service, with no kernel datapath and no namespaces.

The service is a virtual endpoint with the labels given on the command line,
so ingress policies that select it apply. Clients are identified by address:
``fromCIDR`` prefixes get CIDR identities, loopback and this host's addresses
are ``host``, everything else is ``world``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from l7proxy.observe.flowlog import FlowLog
from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.model import Policy
from l7proxy.policy.source import PolicySource
from l7proxy.policy.state import PolicyState
from l7proxy.proxy.driver import ProxyLimits
from l7proxy.proxy.heap import steady_heap
from l7proxy.proxy.server import Proxy, Upstream
from l7proxy.proxy.tls import TlsStore

log = logging.getLogger("l7proxy.proxy.firewall")

SERVICE_ENDPOINT_ID = 1
HOST_PREFIXES = (ipaddress.IPv4Network("127.0.0.0/8"),)


class Firewall:
    def __init__(
        self,
        *,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        labels: dict[str, str],
        policy_paths: Sequence[str | Path],
        flowlog: FlowLog,
        audit: bool = False,
        limits: ProxyLimits | None = None,
        poll_interval: float = 1.0,
        tls: TlsStore | None = None,
        policy_fallback: Sequence[Path] | None = None,
    ):
        self.listen_addr = listen
        self.identities = IdentityAllocator()
        self.service = Endpoint(
            SERVICE_ENDPOINT_ID,
            f"service:{upstream[0]}:{upstream[1]}",
            self.identities.for_labels(labels),
            None,
        )
        self.audit = audit
        self.revision = 0
        self.state: PolicyState | None = None
        # TLS contexts: those policies name, checked with each policy set, and the
        # command line's (always built: --tls-* files are read at start too).
        self.tls = tls
        self.source = PolicySource(
            policy_paths, self._apply, verify=tls.update if tls is not None else None
        )
        if policy_fallback:  # a restarted worker: the others run the last good policy
            self.source.load_or_fall_back(policy_fallback)
        else:
            self.source.load()  # raises PolicyError: refuse to start on a bad policy
        assert self.state is not None  # _apply ran on the first load
        self.proxy: Proxy = Proxy(
            self.state,
            flowlog,
            limits=limits,
            upstream=Upstream(upstream[0], upstream[1], self.service),
            tls=tls,
        )
        self.poll_interval: float = poll_interval
        self.sock: socket.socket | None = None

    def _apply(self, policies: list[Policy]) -> None:
        self.revision += 1
        compiled = compile_policy(
            policies,
            [self.service],
            self.identities,
            revision=self.revision,
            audit_all=self.audit,
            host_prefixes=HOST_PREFIXES + tuple(_local_prefixes(self.listen_addr[0])),
        )
        if self.state is None:
            self.state = PolicyState(compiled)
        else:
            self.state.swap(compiled)

    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Listen on ``--listen``, or on ``sock`` (a worker's inherited socket)."""
        self.sock = await self.proxy.listen(*self.listen_addr, sock=sock)
        return self.sock.getsockname()[:2]

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.source.poll()
            if self.tls is not None:
                self.tls.poll()
            self.proxy.flowlog.flush()

    async def close(self) -> None:
        await self.proxy.close()


def _local_prefixes(listen_host: str) -> list[ipaddress.IPv4Network]:
    """The listen address, when specific, is this host too."""
    try:
        ip = ipaddress.IPv4Address(listen_host)
    except ValueError:
        return []
    return [] if ip.is_unspecified else [ipaddress.IPv4Network(f"{ip}/32")]


async def run_firewall(
    fw: Firewall,
    *,
    ready=print,
    metrics: tuple[str, int] | None = None,
    ui: tuple[str, int] | None = None,
    sock: socket.socket | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = await fw.start(sock)
    # --metrics: /metrics and /healthz (l7proxy/observe/metrics.py)
    served = None
    if metrics is not None:
        from l7proxy.observe.metrics import start_firewall_metrics

        served = await start_firewall_metrics(fw, metrics)
    from parsers.registry import active_parsers

    log.info("parsers: %s", ", ".join(f"{k}={v}" for k, v in active_parsers().items()))
    ready(f"l7proxy firewall listening on {host}:{port}")
    if served is not None:
        ready(f"l7proxy metrics on {served.url}")
    shown = None
    if ui is not None:  # --ui: the web UI (l7proxy/ui/)
        from l7proxy.ui.server import start_ui

        shown = await start_ui(fw.proxy.flowlog, lambda: fw.state, ui, mode="firewall")
        ready(f"l7proxy UI on {shown.url}")
    watcher = loop.create_task(fw.watch())
    heap = loop.create_task(steady_heap())
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        heap.cancel()
        if shown is not None:
            await shown.close()
        if served is not None:
            await served.close()
        await fw.close()
