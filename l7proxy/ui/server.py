"""The web UI's server: an aiohttp app in the proxy's own process and loop.

Records come in through a ``FlowTap`` on the process's flow log (one append per
record on the request path). Once a tick (a second) the server takes what the
tap holds, counts it into the service map, and hands every open event stream
(server-sent events) the map's snapshot, if it moved, and the newest rows that
match that stream's filters: the browser's load is bounded by the tick and the
bounds of the map, not by the flow rate.

History comes from the flow-log files, read backward from a cursor (a record's
``Position``) in a worker thread, at most ``SCAN_LIMIT`` records a page, so a
page never loads the log whole. A firewall without a flow-log file keeps its
last ``MEMORY_RECORDS`` flows in memory instead, and pages through those.

Routes: ``/`` (the page), ``/static/*``, ``/api/info``, ``/api/map``,
``/api/flows`` (a page of history), ``/api/flows/{id}`` (one flow and why it
got its verdict), ``/api/events`` (the live stream). Bound to loopback, it
answers only requests whose Host is a loopback name (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from l7proxy.observe.flowlog import FlowLog, FlowTap, Position, Record, head_of
from l7proxy.observe.history import PositionGone, record_at, records_before
from l7proxy.policy.state import PolicyState
from l7proxy.ui.explain import explain
from l7proxy.ui.flows import FilterError, FlowFilter, row
from l7proxy.ui.servicemap import ServiceMap

log = logging.getLogger("l7proxy.ui")

STATIC = Path(__file__).parent / "static"
TICK = 1.0  # seconds between pushes to the browsers
PAGE_ROWS = 50
MAX_PAGE_ROWS = 500
SCAN_LIMIT = 20_000  # records one history request reads at most
LIVE_ROWS = 100  # newest matching rows a stream is sent per tick, at most
MEMORY_RECORDS = 20_000  # history kept in memory when there is no flow-log file
SEED_RECORDS = 20_000  # records of the log's tail the map starts from
KEEPALIVE = 15.0
RATE_WINDOW = 10.0  # seconds the flows/s figure is averaged over
TAP_CAPACITY = 100_000  # records between two ticks before the map misses some

PolicyStateFn = Callable[[], PolicyState | None]


class FlowUi:
    """One UI for one process's flow log and policy."""

    def __init__(
        self,
        flowlog: FlowLog,
        policy_state: PolicyStateFn,
        *,
        mode: str,
        tick: float = TICK,
        seed_records: int = SEED_RECORDS,
    ):
        self.flowlog = flowlog
        self.policy_state = policy_state
        self.mode = mode
        self.tick_seconds = tick
        self.seed_records = seed_records
        self.map = ServiceMap()
        self.tap = FlowTap(flowlog, TAP_CAPACITY)
        # Without a file, history is what this UI has seen: (sequence, record).
        self.memory: deque[tuple[int, Record]] = deque(maxlen=MEMORY_RECORDS)
        self.streams: set[_Stream] = set()
        self.started = time.time()
        self.rate = 0.0  # records per second over the last RATE_WINDOW seconds
        self._counts: deque[tuple[float, int]] = deque()  # (monotonic time, records) per tick
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._seeding: list[Record] | None = None
        self._seeder: asyncio.Future[ServiceMap] | None = None
        self._map_json = b""
        self._map_version = -1
        self._closing = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l7proxy-ui")

    # ------------------------------------------------------------ life cycle

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("the UI is not served yet")
        host, port = self.address
        return f"http://{host}:{port}/"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/info", self._info)
        app.router.add_get("/api/map", self._map)
        app.router.add_get("/api/flows", self._flows)
        app.router.add_get("/api/flows/{id}", self._flow)
        app.router.add_get("/api/events", self._events)
        return app

    async def start(self, host: str, port: int) -> None:
        """Serve on ``host:port`` (port 0 picks one; ``address`` says which), and
        start counting from here on, and from the log's tail in the background."""
        self._start_seeding()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        bound = self._runner.addresses[0]
        self.address = (bound[0], bound[1])
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def close(self) -> None:
        self._closing = True
        self.tap.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for stream in list(self.streams):
            stream.wake.set()  # its handler sees _closing and ends the response
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._seeder is not None:
            self._seeder.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ the tick

    async def _tick_forever(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_seconds)
            now = time.monotonic()
            try:
                count = self.tick()
            except Exception:  # noqa: BLE001 - the UI must never take the proxy down
                log.exception("UI tick failed")
                continue
            self._counts.append((now, count))
            while self._counts[0][0] < now - RATE_WINDOW:
                self._counts.popleft()
            span = min(RATE_WINDOW, now - started)
            self.rate = sum(c for _, c in self._counts) / max(span, 1e-6)

    def tick(self) -> int:
        """Take the tap's records into the map, the memory and the streams; push.
        Returns how many records were taken."""
        batch, missed = self.tap.take()
        self.map.missed(missed)
        fresh: list[tuple[str, Record]] = []
        for seq, position, record in batch:
            self.map.add(record)
            if position is None:
                self.memory.append((seq, record))
                fresh.append((f"m{seq}", record))
            else:
                fresh.append((position.token(), record))
        if self._seeding is not None:
            self._seeding.extend(record for _, _, record in batch)
            if len(self._seeding) > TAP_CAPACITY:  # seeding is slower than the traffic
                self._seeding = None
                if self._seeder is not None:
                    self._seeder.cancel()
        self._push(fresh, missed)
        return len(batch)

    def _push(self, fresh: list[tuple[str, Record]], missed: int) -> None:
        if not self.streams:
            return
        map_event = self._map_event()
        stats = _event("stats", self._stats(missed))
        for stream in self.streams:
            stream.offer(fresh, map_event, stats)

    def _map_event(self) -> bytes | None:
        if self.map.version == self._map_version:
            return None
        self._map_version = self.map.version
        self._map_json = _event("map", self.map.snapshot())
        return self._map_json

    def _stats(self, missed: int = 0) -> dict[str, Any]:
        state = self.policy_state()
        return {
            "time": time.time(),
            "rate": round(self.rate, 1),
            "flows": self.map.flows,
            "missed": missed,
            "revision": state.current.revision if state else None,
        }

    # ------------------------------------------------------------ seeding

    def _start_seeding(self) -> None:
        """Count the log's last ``seed_records`` into a map of their own, in the
        worker thread; records that arrive meanwhile are kept and added after."""
        path = self.flowlog.path
        if path is None or self.seed_records <= 0 or not path.exists():
            return
        self.flowlog.flush()
        with open(path, "rb") as current:
            st = os.fstat(current.fileno())
            head = head_of(current)
        if head is None:
            return
        # The end of the log now: older records are the seed's, newer the tap's.
        end = Position(st.st_dev, st.st_ino, head, st.st_size)
        self._seeding = []
        loop = asyncio.get_running_loop()
        self._seeder = loop.run_in_executor(self._worker, self._seed, path, end)
        self._seeder.add_done_callback(self._seeded)

    def _seed(self, path: Path, end: Position) -> ServiceMap:
        records: list[Record] = []
        with contextlib.suppress(PositionGone):
            for _, record in records_before(path, end):
                records.append(record)
                if len(records) >= self.seed_records or self._closing:
                    break
        seeded = ServiceMap()
        for record in reversed(records):
            seeded.add(record)
        return seeded

    def _seeded(self, future: asyncio.Future[ServiceMap]) -> None:
        if future.cancelled() or self._seeding is None or self._closing:
            return
        if future.exception() is not None:
            log.warning("UI: reading the flow log's tail failed: %s", future.exception())
            self._seeding = None
            return
        seeded = future.result()
        for record in self._seeding:
            seeded.add(record)
        seeded.records_missed = self.map.records_missed
        seeded.version = self.map.version + seeded.version + 1
        self.map, self._seeding = seeded, None

    # ------------------------------------------------------------ HTTP

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.address is not None and _loopback(self.address[0]):
            host = (request.host or "").rpartition(":")[0] or request.host
            if host.strip("[]") not in ("localhost", "127.0.0.1", "::1", self.address[0]):
                return web.Response(status=421, text="the UI answers loopback names only\n")
        response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _info(self, _request: web.Request) -> web.Response:
        state = self.policy_state()
        compiled = state.current if state else None
        return web.json_response(
            {
                "mode": self.mode,
                "started": self.started,
                "flowlog": str(self.flowlog.path) if self.flowlog.path else None,
                "history": "file" if self.flowlog.path else f"memory ({MEMORY_RECORDS} flows)",
                "policies": [p.key for p in compiled.policies] if compiled else [],
                "revision": compiled.revision if compiled else None,
                "tick": self.tick_seconds,
                "bounds": {
                    "nodes": self.map.max_nodes,
                    "edges": self.map.max_edges,
                    "l7": self.map.max_l7,
                },
            }
        )

    async def _map(self, _request: web.Request) -> web.Response:
        return web.json_response(self.map.snapshot())

    async def _flows(self, request: web.Request) -> web.Response:
        try:
            flt = FlowFilter.from_query(request.query)
            limit = min(int(request.query.get("limit", PAGE_ROWS)), MAX_PAGE_ROWS)
            if limit < 1:
                raise ValueError
        except FilterError as err:
            raise web.HTTPBadRequest(text=f"{err}\n") from None
        except ValueError:
            raise web.HTTPBadRequest(text="limit: expected a number above 0\n") from None
        before = request.query.get("before", "")
        path = self.flowlog.path
        if path is None:
            return web.json_response(self._memory_page(flt, before, limit))
        try:
            cursor = Position.parse(before) if before else None
        except ValueError as err:
            raise web.HTTPBadRequest(text=f"before: {err}\n") from None
        self.flowlog.flush()  # what the page reads is on disk
        loop = asyncio.get_running_loop()
        try:
            page = await loop.run_in_executor(
                self._worker, _file_page, path, flt, cursor, limit, SCAN_LIMIT
            )
        except PositionGone as err:
            raise web.HTTPGone(text=f"{err}\n") from None
        return web.json_response(page)

    def _memory_page(self, flt: FlowFilter, before: str, limit: int) -> dict[str, Any]:
        if before and not (before.startswith("m") and before[1:].isdigit()):
            raise web.HTTPBadRequest(text=f"before: not a flow id of this UI: {before!r}\n")
        below = int(before[1:]) if before else None
        return _page(
            ((f"m{seq}", record) for seq, record in reversed(self.memory)),
            flt,
            limit,
            SCAN_LIMIT,
            skip_while=(lambda flow_id: int(flow_id[1:]) >= below) if below is not None else None,
        )

    async def _flow(self, request: web.Request) -> web.Response:
        flow_id = request.match_info["id"]
        record = await self._lookup(flow_id)
        if record is None:
            raise web.HTTPNotFound(text=f"no flow {flow_id!r} (rotated away, or never)\n")
        return web.json_response(
            {
                "flow": row(flow_id, record),
                "record": record,
                "explain": explain(record, self.policy_state()),
            }
        )

    async def _lookup(self, flow_id: str) -> Record | None:
        if flow_id.startswith("m"):
            seq = int(flow_id[1:]) if flow_id[1:].isdigit() else -1
            return next((r for s, r in reversed(self.memory) if s == seq), None)
        path = self.flowlog.path
        if path is None:
            return None
        try:
            position = Position.parse(flow_id)
        except ValueError:
            return None
        self.flowlog.flush()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, record_at, path, position)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        try:
            flt = FlowFilter.from_query(request.query)
        except FilterError as err:
            raise web.HTTPBadRequest(text=f"{err}\n") from None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        stream = _Stream(flt)
        self.streams.add(stream)
        try:
            await response.write(b"retry: 2000\n\n" + _event("map", self.map.snapshot()))
            await response.write(_event("stats", self._stats()))
            while not self._closing:
                try:
                    await asyncio.wait_for(stream.wake.wait(), KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                stream.wake.clear()
                for event in stream.pop():
                    await response.write(event)
        except ConnectionResetError:  # the browser went away
            pass
        finally:
            self.streams.discard(stream)
        return response


class _Stream:
    """One browser's event stream: what it has not been sent yet, bounded
    (the newest map, the newest ``LIVE_ROWS`` matching rows, the latest stats)."""

    def __init__(self, flt: FlowFilter):
        self.filter = flt
        self.wake = asyncio.Event()
        self.rows: deque[tuple[str, Record]] = deque(maxlen=LIVE_ROWS)
        self.matched = 0
        self.map_event: bytes | None = None
        self.stats_event: bytes | None = None

    def offer(self, fresh: list[tuple[str, Record]], map_event: bytes | None, stats: bytes) -> None:
        for flow_id, record in fresh:
            if self.filter.matches(record):
                self.rows.append((flow_id, record))
                self.matched += 1
        if map_event is not None:
            self.map_event = map_event
        self.stats_event = stats
        self.wake.set()

    def pop(self) -> Iterator[bytes]:
        if self.map_event is not None:
            yield self.map_event
            self.map_event = None
        if self.matched:
            rows = [row(flow_id, record) for flow_id, record in reversed(self.rows)]
            yield _event("flows", {"rows": rows, "matched": self.matched})
            self.rows.clear()
            self.matched = 0
        if self.stats_event is not None:
            yield self.stats_event
            self.stats_event = None


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _file_page(
    path: Path, flt: FlowFilter, cursor: Position | None, limit: int, scan_limit: int
) -> dict[str, Any]:
    """A page of history from the files (runs in the worker thread)."""
    flows = (
        (position.token(), record)
        for position, record in records_before(path, cursor, until=flt.until)
    )
    return _page(flows, flt, limit, scan_limit)


def _page(
    flows: Iterator[tuple[str, Record]],
    flt: FlowFilter,
    limit: int,
    scan_limit: int,
    skip_while: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Up to ``limit`` matching rows, newest first, reading at most ``scan_limit``
    records; ``next`` is the cursor to read on from (None: nothing older is left)."""
    rows: list[dict[str, Any]] = []
    scanned = 0
    last_id: str | None = None
    exhausted = True
    for flow_id, record in flows:
        if skip_while is not None and skip_while(flow_id):
            continue
        if scanned >= scan_limit or len(rows) >= limit:
            exhausted = False
            break
        scanned += 1
        last_id = flow_id
        when = record.get("time")
        if flt.since is not None and isinstance(when, (int, float)) and when < flt.since:
            break  # one writer appends in time order: everything older is older still
        if flt.matches(record):
            rows.append(row(flow_id, record))
    return {
        "flows": rows,
        "next": None if exhausted else last_id,
        "scanned": scanned,
    }


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start_ui(
    flowlog: FlowLog, policy_state: PolicyStateFn, address: tuple[str, int], *, mode: str
) -> FlowUi:
    """``--ui ADDR:PORT`` on ``run`` and ``firewall``: serve the UI until
    ``await ui.close()``."""
    ui = FlowUi(flowlog, policy_state, mode=mode)
    await ui.start(*address)
    return ui
