"""``run --workers N``: the agent's proxy in N worker processes.

The agent keeps everything but the proxy: the datapath, the sources (files,
Kubernetes, etcd), identities, the ipcache and the compiled policy. It makes N
``IP_TRANSPARENT`` listeners per parser family, one ``SO_REUSEPORT`` group per
family, and registers one member of each group in the datapath; the kernel
spreads the flows a tc ``bpf_sk_assign`` sends to that member over the whole
group (docs/workers.md, "Transparent mode"). Each worker is a fresh
interpreter (``python -m l7proxy … run … --worker-of FAMILY=FD,…``) started and
restarted by the firewall's ``Supervisor`` (l7proxy/proxy/workers.py), with its
sockets in ``pass_fds``.

What a worker's proxy reads from the agent is one object: the
``CompiledPolicy`` (rules, endpoints by address, identities, the ipcache, and
the ``Policy`` list its TLS contexts are loaded from). The agent compiles once
and sends it, pickled, down each worker's stdin whenever it changes, and first
of all to a worker as it starts, before it listens. A worker swaps its policy
in one assignment (``PolicyState.swap``) after the whole message is read and
unpickled, and answers on stdout with the revision it applied, or with the
error that kept its last one.

Messages (agent -> worker, on stdin): a 4-byte big-endian length, then a
pickled ``(kind, payload)``:
    ("policy", CompiledPolicy)
    ("drain", seconds)            after a handover: drain and exit
Lines (worker -> agent, on stdout): the PREFIXES below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

from l7proxy.agent.drain import DRAIN_FIELDS
from l7proxy.policy.engine import CompiledPolicy
from l7proxy.proxy.workers import Supervisor, Worker

log = logging.getLogger("l7proxy.agent.workers")

FRAME = struct.Struct("!I")
MAX_MESSAGE = 1 << 30

READY_PREFIX = "l7proxy worker listening on "
APPLIED_PREFIX = "l7proxy worker policy "  # revision
REJECTED_PREFIX = "l7proxy worker policy-error "  # revision: reason
STATS_PREFIX = "l7proxy worker stats "  # JSON, once a second
DRAINED_PREFIX = "l7proxy worker drained "  # JSON (drain_proxy's report)

# Past the drain deadline, what a worker may take to finish (IN_FLIGHT_GRACE and
# its exit) before it is stopped.
DRAIN_SLACK = 10.0

Command = Callable[[int, list[str], list[int]], list[str]]  # (worker, families, fds) -> argv


def message(kind: str, payload: object) -> bytes:
    data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


async def read_message(reader: asyncio.StreamReader) -> tuple[str, Any] | None:
    """The next message, or None at the end of the pipe (the agent is gone)."""
    try:
        head = await reader.readexactly(FRAME.size)
        (size,) = FRAME.unpack(head)
        if size > MAX_MESSAGE:
            raise ValueError(f"message of {size} bytes")
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    kind, payload = pickle.loads(body)  # from our own parent, on a pipe only it holds
    return str(kind), payload


def split_listeners(
    socks: dict[str, list[socket.socket]], count: int
) -> list[list[tuple[str, socket.socket]]]:
    """Each worker's (family, socket) pairs: socket i of a family goes to worker
    i mod count, so a worker may get more than one of a family (a predecessor
    with more workers handed over more sockets) and every socket is served."""
    out: list[list[tuple[str, socket.socket]]] = [[] for _ in range(count)]
    for family, group in socks.items():
        for i, sock in enumerate(group):
            out[i % count].append((family, sock))
    return out


class AgentWorkers:
    """The agent's end: N supervised workers kept on the policy in force."""

    def __init__(
        self,
        socks: dict[str, list[socket.socket]],
        count: int,
        command: Command,
        *,
        with_metrics: bool = False,
    ) -> None:
        shares = split_listeners(socks, count)
        self.families = [[family for family, _ in share] for share in shares]
        self.supervisor = Supervisor(
            [[sock for _, sock in share] for share in shares],
            lambda index, fds: command(index, self.families[index], fds),
            ready_prefix=READY_PREFIX,
            with_metrics=with_metrics,  # each serves its own on 127.0.0.1:0
            feed=self._feed,
            on_line=self._line,
        )
        self._policy = b""  # the current policy message, for every new worker
        self.revision = 0
        self.applied: dict[int, int] = {}  # worker -> the revision it runs
        self.rejected: dict[int, str] = {}  # worker -> why it kept its last one
        self.stats: dict[int, dict[str, Any]] = {}  # each worker's, once a second
        self._gone: list[dict[str, Any]] = []  # the last of workers that were restarted
        self.drained: dict[int, dict[str, int]] = {}

    @property
    def count(self) -> int:
        return len(self.supervisor.workers)

    async def start(self, compiled: CompiledPolicy) -> bool:
        self._set_policy(compiled)
        return await self.supervisor.start()

    def publish(self, compiled: CompiledPolicy) -> None:
        """Send a new policy to every running worker (a worker started later gets it
        at its start)."""
        self._set_policy(compiled)
        for worker in self.supervisor.workers:
            self.supervisor.send(worker, self._policy)

    def _set_policy(self, compiled: CompiledPolicy) -> None:
        self._policy = message("policy", compiled)
        self.revision = compiled.revision

    def _feed(self, worker: Worker) -> bytes:
        self.applied.pop(worker.index, None)
        gone = self.stats.pop(worker.index, None)
        if gone is not None:  # a restart: what the dead one counted stays in the totals
            self._gone.append({**gone, "connections_active": 0})
        return self._policy

    def _line(self, worker: Worker, text: str) -> None:
        if text.startswith(APPLIED_PREFIX):
            self.applied[worker.index] = int(text[len(APPLIED_PREFIX) :])
            self.rejected.pop(worker.index, None)
        elif text.startswith(REJECTED_PREFIX):
            self.rejected[worker.index] = text[len(REJECTED_PREFIX) :]
            log.error("worker %d kept its policy: %s", worker.index, self.rejected[worker.index])
        elif text.startswith(STATS_PREFIX):
            self.stats[worker.index] = json.loads(text[len(STATS_PREFIX) :])
        elif text.startswith(DRAINED_PREFIX):
            self.drained[worker.index] = json.loads(text[len(DRAINED_PREFIX) :])
        else:
            print(f"[worker {worker.index}] {text}", flush=True)

    # ------------------------------------------------------------ what status shows

    @property
    def in_sync(self) -> bool:
        """Every worker runs and applied the revision in force."""
        return all(
            self.supervisor.running(w) and self.applied.get(w.index) == self.revision
            for w in self.supervisor.workers
        )

    @property
    def serving(self) -> bool:
        return all(self.supervisor.running(w) and w.ready.is_set() for w in self.supervisor.workers)

    def totals(self) -> dict[str, Any]:
        """The workers' proxy counters, summed, with what restarted workers had counted
        at their last report (a new worker counts from 0)."""
        out: dict[str, Any] = {
            "connections_total": 0,
            "connections_active": 0,
            "parse_errors": {},
            "tls_handshake_failures": 0,
        }
        for stats in [*self.stats.values(), *self._gone]:
            for key in ("connections_total", "connections_active", "tls_handshake_failures"):
                out[key] += stats.get(key, 0)
            for parser, n in stats.get("parse_errors", {}).items():
                out["parse_errors"][parser] = out["parse_errors"].get(parser, 0) + n
        return out

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "worker": w.index,
                "pid": w.proc.pid if self.supervisor.running(w) and w.proc else None,
                "serving": self.supervisor.running(w) and w.ready.is_set(),
                "listeners": self.families[w.index],
                "policy_revision": self.applied.get(w.index),
                "policy_error": self.rejected.get(w.index),
                "connections_active": self.stats.get(w.index, {}).get("connections_active", 0),
                "connections_total": self.stats.get(w.index, {}).get("connections_total", 0),
            }
            for w in self.supervisor.workers
        ]

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    # ------------------------------------------------------------ ending

    async def drain(self, deadline: float, cut_short: asyncio.Event) -> dict[str, int]:
        """After a handover: every worker drains (``drain_proxy``) and exits; their
        reports, summed. A worker that does not finish in time is stopped."""
        self.supervisor.hold()
        for worker in self.supervisor.workers:
            self.supervisor.send(worker, message("drain", deadline))
        waited = asyncio.ensure_future(self.supervisor.wait_exited(deadline + DRAIN_SLACK))
        cut = asyncio.ensure_future(cut_short.wait())
        try:
            await asyncio.wait([waited, cut], return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
        if cut_short.is_set() and not waited.done():
            await self.supervisor.stop()  # SIGTERM: each cuts its drain short
        await waited
        await self.supervisor.stop()
        total = dict.fromkeys(DRAIN_FIELDS, 0)
        for report in self.drained.values():
            for key in DRAIN_FIELDS:
                total[key] += int(report.get(key, 0))
        missing = [w.index for w in self.supervisor.workers if w.index not in self.drained]
        if missing:
            log.warning("workers %s did not report their drain", missing)
        return total

    async def stop(self) -> None:
        await self.supervisor.stop()
