"""One worker of ``run --workers N``: the agent's proxy on the sockets it inherited.

It runs what the single agent runs in its own process (``Proxy`` with the
proxy's mark, limits, TLS store and a flow log whose records carry
``worker``), fed by the agent over stdin (l7proxy/agent/workers.py): the
first policy before it listens, every later one as the agent compiles it, and
after a handover the order to drain. It exits when the agent's end of the pipe
closes, and when the agent dies (``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from l7proxy.agent.drain import drain_proxy
from l7proxy.agent.workers import (
    APPLIED_PREFIX,
    DRAINED_PREFIX,
    READY_PREFIX,
    REJECTED_PREFIX,
    STATS_PREFIX,
    read_message,
)
from l7proxy.observe.flowlog import FlowLog, Rotation
from l7proxy.policy.engine import CompiledPolicy
from l7proxy.policy.state import PolicyState
from l7proxy.proxy.driver import ProxyLimits
from l7proxy.proxy.heap import steady_heap
from l7proxy.proxy.server import Proxy
from l7proxy.proxy.tls import TlsStore

log = logging.getLogger("l7proxy.agent.worker")

PROXY_HOST = "127.0.0.1"


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    listeners: Sequence[tuple[str, int]]  # (family, inherited fd)
    flowlog: Path
    rotation: Rotation
    limits: ProxyLimits
    mark: int
    tls_secrets_dir: Path
    metrics: bool = False  # serve /metrics on 127.0.0.1:0 for the agent to scrape


def parse_listeners(text: str) -> list[tuple[str, int]]:
    """``--worker-of http=5,kafka=6,…`` -> [("http", 5), ("kafka", 6), …]."""
    out = []
    for item in text.split(","):
        family, _, fd = item.partition("=")
        out.append((family, int(fd)))
    return out


def say(line: str) -> None:
    print(line, flush=True)


async def serve(config: WorkerConfig) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    stdin = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115 - the transport owns it
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    first = await read_message(reader)
    if first is None or first[0] != "policy":
        raise SystemExit("worker: the agent sent no policy")
    compiled = first[1]
    tls = TlsStore(config.tls_secrets_dir)
    state = PolicyState(compiled)
    _apply(state, tls, compiled)  # its TLS contexts; a failure is reported, as later
    proxy = Proxy(
        state,
        FlowLog(config.flowlog, rotation=config.rotation, fields={"worker": config.index}),
        limits=config.limits,
        mark=config.mark,
        tls=tls,
    )
    for _family, fd in config.listeners:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        await proxy.listen(PROXY_HOST, sock.getsockname()[1], sock=sock)
    served = None
    if config.metrics:
        from l7proxy.observe.metrics import agent_worker_status_fn, attach_metrics, serve_metrics
        from l7proxy.proxy.workers import METRICS_PREFIX

        served = attach_metrics(proxy.flowlog, agent_worker_status_fn(proxy))
        served.runner = await serve_metrics(served, "127.0.0.1", 0)
        say(f"{METRICS_PREFIX}{served.url}")
    say(READY_PREFIX + ",".join(f"{family}={fd}" for family, fd in config.listeners))

    stop = asyncio.Event()
    cut_short = asyncio.Event()
    draining = False

    def on_signal() -> None:
        (cut_short if draining else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    housekeeping = loop.create_task(_every_second(proxy, tls))
    heap = loop.create_task(steady_heap())
    try:
        while not stop.is_set():
            received = asyncio.ensure_future(read_message(reader))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([received, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not received.done():
                received.cancel()
                break
            got = received.result()
            if got is None:
                break  # the agent closed our stdin: it is gone
            kind, payload = got
            if kind == "policy":
                _apply(state, tls, payload)
            elif kind == "drain":
                draining = True
                report = await drain_proxy(proxy, float(payload), cut_short)
                proxy.flowlog.close()
                say(DRAINED_PREFIX + json.dumps(report))
                return
    finally:
        housekeeping.cancel()
        heap.cancel()
        if served is not None:
            await served.close()
        if not draining:
            await proxy.close()
            proxy.flowlog.close()


def _apply(state: PolicyState, tls: TlsStore, compiled: CompiledPolicy) -> None:
    """Both or neither: TLS contexts the policy names, then the policy in one swap."""
    try:
        tls.update(list(compiled.policies))
        state.swap(compiled)
    except Exception as exc:  # noqa: BLE001 - reported to the agent; the last policy stays
        say(f"{REJECTED_PREFIX}{compiled.revision}: {exc}")
        return
    say(f"{APPLIED_PREFIX}{compiled.revision}")


async def _every_second(proxy: Proxy, tls: TlsStore) -> None:
    while True:
        await asyncio.sleep(1.0)
        tls.poll()  # certificates changed on disk: for new connections
        proxy.flowlog.flush()
        stats = proxy.stats
        say(
            STATS_PREFIX
            + json.dumps(
                {
                    "connections_total": stats.connections_total,
                    "connections_active": stats.connections_active,
                    "parse_errors": dict(stats.parse_errors),
                    "tls_handshake_failures": stats.tls_handshake_failures,
                }
            )
        )
