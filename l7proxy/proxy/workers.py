"""``firewall --workers N``: one supervisor, N worker processes, one port.

The supervisor makes N listening sockets on the same address with
``SO_REUSEPORT`` before any worker starts (so ``--listen HOST:0`` picks one
port for all, and no worker races another for it); the kernel spreads new
connections over them by a hash of their addresses. Each worker is a fresh
interpreter (``python -m l7proxy … --worker-of FD``) that inherits one socket
and runs the whole firewall on it with its own event loop: its own policy
polling, its own connections, its own metrics on a private loopback port.

Why a fresh interpreter, not ``fork``: the supervisor has compiled a policy and
may hold an event loop, aiohttp sessions and logging locks; a forked child
would inherit them half-owned (a lock held by a thread that does not exist in
the child, an event loop's selector shared with its parent). A re-exec starts
from nothing but the command line and one descriptor, exactly like a single
``firewall``, and a restarted worker is built the same way as the first.

The supervisor holds every listening socket for as long as it runs. A worker
that dies leaves its socket open in the supervisor: connections the kernel
hashes to it wait in its accept queue until the replacement accepts them,
instead of being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from l7proxy.observe.aggregate import WorkerEndpoint, WorkerMetrics, WorkersView
from l7proxy.observe.metrics import serve_metrics

log = logging.getLogger("l7proxy.proxy.workers")

READY_PREFIX = "l7proxy firewall listening on "
METRICS_PREFIX = "l7proxy metrics on "
# A worker must report listening this long after it was started.
START_TIMEOUT = 30.0
# After SIGTERM, workers get this long to close their connections; then SIGKILL.
STOP_TIMEOUT = 10.0
# Restart back-off: FIRST_DELAY, doubled per death that came sooner than
# STEADY after its start, at most MAX_DELAY.
FIRST_DELAY = 0.1
MAX_DELAY = 10.0
STEADY = 10.0
# A line every worker logs alike within this long (a rejected policy file) is
# shown once.
SAME_LINE_WINDOW = 10.0

# "2026-12-07 03:37:34,123 " (the log format's time) differs between workers.
_LOG_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")

# The supervisor's pid, in each worker's environment (``die_with_parent``).
SUPERVISOR_ENV = "L7PROXY_SUPERVISOR"

Command = Callable[[int, list[int]], list[str]]  # (worker, inherited fds) -> argv


def worker_count(text: str) -> int:
    """``--workers``: a number from 1, or ``auto`` for the CPUs this process may use."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a number of workers from 1, or auto, got {text!r}")
    return int(text)


def reuseport_listeners(
    host: str, port: int, count: int, *, backlog: int | None = None
) -> list[socket.socket]:
    """``count`` listening sockets on one address, one ``SO_REUSEPORT`` group."""
    from l7proxy.proxy.server import make_listener

    socks = [make_listener(host, port, backlog=backlog, reuse_port=True)]
    port = socks[0].getsockname()[1]  # port 0: the one the first got, for all
    try:
        while len(socks) < count:
            socks.append(make_listener(host, port, backlog=backlog, reuse_port=True))
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor goes, even by SIGKILL, so no
    worker outlives it; if it went already, go now."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class LineRelay:
    """Workers' stderr, tagged by worker, with a line all of them log alike shown once."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self._seen: dict[str, tuple[int, float]] = {}  # text -> (first worker, when)

    def line(self, worker: int, text: str) -> None:
        key = _LOG_TIME.sub("", text)
        now = time.monotonic()
        first = self._seen.get(key)
        if first is not None and first[0] != worker and now - first[1] < SAME_LINE_WINDOW:
            return
        if first is None or now - first[1] >= SAME_LINE_WINDOW:
            self._seen[key] = (worker, now)
            if len(self._seen) > 1000:
                self._seen = {k: v for k, v in self._seen.items() if now - v[1] < SAME_LINE_WINDOW}
        self.out(f"[worker {worker}] {text}")


@dataclass
class Worker:
    index: int
    socks: list[socket.socket]  # the listening sockets it inherits, in the command's order
    proc: asyncio.subprocess.Process | None = None
    listening: str | None = None  # HOST:PORT from its ready line
    metrics_url: str | None = None
    started: float = 0.0
    quick_deaths: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """N workers, each started with its sockets; restarted on the same sockets.

    ``socks``: each worker's sockets (one for the firewall; one or more per parser
    family for the agent's). With ``feed``, a worker's stdin is a pipe and
    ``feed(worker)`` is written to it as it starts (the agent's policy);
    ``on_line`` gets the stdout lines that are not readiness (else printed)."""

    def __init__(
        self,
        socks: Sequence[Sequence[socket.socket]],
        command: Command,
        *,
        with_metrics: bool = False,
        relay: LineRelay | None = None,
        ready_prefix: str = READY_PREFIX,
        feed: Callable[[Worker], bytes] | None = None,
        on_line: Callable[[Worker, str], None] | None = None,
    ) -> None:
        self.workers = [Worker(i, list(s)) for i, s in enumerate(socks)]
        self.command = command
        self.with_metrics = with_metrics
        self.relay = relay or LineRelay(lambda text: print(text, file=sys.stderr, flush=True))
        self.ready_prefix = ready_prefix
        self.feed = feed
        self.on_line = on_line
        self.restarts = 0
        self._stopping = False
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ running

    async def run(
        self,
        *,
        ready: Callable[[str], None] = print,
        metrics: tuple[str, int] | None = None,
        every_second: Callable[[], object] | None = None,
    ) -> int:
        """Start every worker, report ready, keep them running until SIGTERM/SIGINT.
        Returns the exit code: 1 if the workers could not start. ``every_second``
        runs once a second meanwhile (the policy snapshot for restarted workers)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        served: WorkerMetrics | None = None
        try:
            if not await self.start():
                return 0 if self._stop.is_set() else 1
            host, port = self.workers[0].socks[0].getsockname()[:2]
            ready(f"{READY_PREFIX}{host}:{port}")
            if metrics is not None:
                served = WorkerMetrics(
                    WorkersView(len(self.workers), self.endpoints, lambda: self.restarts)
                )
                await serve_metrics(served, *metrics)  # type: ignore[arg-type]
                ready(f"{METRICS_PREFIX}{served.url}")
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                if every_second is not None and not self._stop.is_set():
                    try:
                        every_second()
                    except Exception:  # noqa: BLE001 - housekeeping must not stop the workers
                        log.exception("supervisor housekeeping failed")
            return 0
        finally:
            if served is not None:
                await served.close()
            await self.stop()
            for worker in self.workers:
                for sock in worker.socks:
                    sock.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def start(self) -> bool:
        """Start every worker; True once all are listening (False: see ``_all_ready``)."""
        for worker in self.workers:
            await self._spawn(worker)
        return await self._all_ready()

    def hold(self) -> None:
        """Restart no worker from now on (they are being stopped or drained)."""
        self._stopping = True

    async def stop(self) -> None:
        """SIGTERM to every worker, SIGKILL after STOP_TIMEOUT; the sockets stay open."""
        self.hold()
        self._stop.set()
        await self._stop_all()

    async def wait_exited(self, timeout: float) -> bool:
        """True if every worker exited within ``timeout`` (``hold`` first)."""
        running = [w.proc for w in self.workers if w.proc and w.proc.returncode is None]
        if not running:
            return True
        waits = [asyncio.ensure_future(p.wait()) for p in running]
        _, late = await asyncio.wait(waits, timeout=timeout)
        for fut in late:
            fut.cancel()
        return not late

    def send(self, worker: Worker, data: bytes) -> bool:
        """Write to a running worker's stdin (``feed`` mode); False if it is not running."""
        proc = worker.proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return False
        try:
            proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False  # it died; _watch restarts it and feed() gives it the current state
        return True

    def running(self, worker: Worker) -> bool:
        return worker.proc is not None and worker.proc.returncode is None

    def endpoints(self) -> list[WorkerEndpoint]:
        """The metrics endpoints of the workers running now."""
        return [
            WorkerEndpoint(w.index, w.proc.pid, w.metrics_url)
            for w in self.workers
            if w.proc is not None and w.proc.returncode is None and w.metrics_url
        ]

    async def _all_ready(self) -> bool:
        """True once every worker is listening; False if one died first, the
        start took too long, or we were asked to stop."""
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(w.ready.wait()) for w in self.workers
        ]
        exits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(w.proc.wait()) for w in self.workers if w.proc
        ]
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        all_ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
        try:
            done, _ = await asyncio.wait(
                [all_ready, stop, *exits], timeout=START_TIMEOUT, return_when="FIRST_COMPLETED"
            )
            if all_ready in done:
                return True
            if stop not in done:
                died = [w for w in self.workers if w.proc and w.proc.returncode is not None]
                for w in died:
                    log.error(
                        "worker %d exited with %s before it was listening",
                        w.index,
                        _exit_text(w.proc.returncode if w.proc else None),
                    )
                if not died:
                    log.error("workers did not report listening within %g s", START_TIMEOUT)
            return False
        finally:
            for f in (all_ready, stop, *waits, *exits):
                f.cancel()

    async def _spawn(self, worker: Worker) -> None:
        worker.listening = worker.metrics_url = None
        worker.ready.clear()
        fds = [sock.fileno() for sock in worker.socks]
        worker.proc = await asyncio.create_subprocess_exec(
            *self.command(worker.index, fds),
            stdin=asyncio.subprocess.DEVNULL if self.feed is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=fds,
            env=dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid())}),
            # Its own session, so its own process group: a terminal's Ctrl-C reaches
            # the supervisor alone, which stops the workers in order. (A session, not
            # process_group=0, which uvloop's subprocesses do not take.)
            start_new_session=True,
        )
        worker.started = time.monotonic()
        if self.feed is not None:
            self.send(worker, self.feed(worker))
        log.debug("worker %d started, pid %d", worker.index, worker.proc.pid)
        self._task(self._read_stdout(worker, worker.proc))
        self._task(self._read_stderr(worker, worker.proc))
        self._task(self._watch(worker, worker.proc))

    def _task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_stdout(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            text = raw.decode(errors="replace").rstrip("\n")
            if text.startswith(self.ready_prefix):
                worker.listening = text[len(self.ready_prefix) :]
            elif text.startswith(METRICS_PREFIX):
                worker.metrics_url = text[len(METRICS_PREFIX) :]
            elif self.on_line is not None:
                self.on_line(worker, text)
            else:
                print(f"[worker {worker.index}] {text}", flush=True)
            if worker.listening and (worker.metrics_url or not self.with_metrics):
                worker.ready.set()

    async def _read_stderr(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            self.relay.line(worker.index, raw.decode(errors="replace").rstrip("\n"))

    async def _watch(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping or not worker.ready.is_set():
            return  # stopping, or the start is failing: run() decides
        lived = time.monotonic() - worker.started
        worker.quick_deaths = worker.quick_deaths + 1 if lived < STEADY else 0
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** max(0, worker.quick_deaths - 1))
        self.restarts += 1
        log.warning(
            "worker %d (pid %d) %s after %.1f s; restarting it in %g s",
            worker.index,
            proc.pid,
            _exit_text(code),
            lived,
            delay,
        )
        await asyncio.sleep(delay)
        while not self._stopping:
            try:
                await self._spawn(worker)
                return
            except OSError as exc:  # out of processes or memory: try again later
                log.error("worker %d could not be restarted: %s", worker.index, exc)
                await asyncio.sleep(MAX_DELAY)

    async def _stop_all(self) -> None:
        running = [w.proc for w in self.workers if w.proc and w.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if running:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running], timeout=STOP_TIMEOUT
            )
            for proc in running:
                if proc.returncode is None:
                    log.warning(
                        "worker pid %d did not stop in %g s: killed", proc.pid, STOP_TIMEOUT
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for proc in running:
                await proc.wait()
            for fut in late:
                fut.cancel()
        # The readers end at the pipes' end of file: what the workers said last is relayed.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
