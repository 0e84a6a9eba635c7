"""``/metrics`` and ``/healthz`` of ``firewall --workers N``: the workers' own
scrapes, combined into one.

Each worker serves its metrics (``l7proxy/observe/metrics.py``, unchanged) on a
private loopback port; the supervisor scrapes them all when it is scraped and
answers with one exposition. prometheus_client's multiprocess mode does not fit
these metrics: half of them are levels a collector computes from the process's
status at scrape time (connections open, parse errors, the policy in force),
which that mode cannot share, and it leaves a file per dead process to clean.

The agent's ``run --workers N`` serves the same combination, with its own
metrics (datapath, kernel drops, policy) as one more member (``WorkersView.own``).

How each series combines (``combine``):
- traffic counters, histograms and levels of this process's traffic (flows,
  drops, limits, reply latency, connections): the sum over workers;
- what every worker computes for itself from the same policy files (the
  policy count, revision, loads, redirects): the highest, since a sum would
  count one policy N times (a restarted worker counts its loads from 1 again);
- ``l7proxy_healthy``: the lowest, healthy only if every worker is;
- ``*_created``: the earliest.

A worker's counters start again from zero when it is restarted. So that the
sums do not fall back, what a worker had counted at the last scrape before it
was gone is carried on in the totals (``counted``); what it counted after that
scrape is lost with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("l7proxy.observe.aggregate")

# Series every worker computes alike from the policy files: the highest stands.
PER_POLICY = frozenset(
    {
        "cilium_policy",
        "cilium_policy_max_revision",
        "cilium_policy_change",
        "cilium_policy_import_errors",
        "cilium_proxy_redirects",
    }
)
# Readiness: the lowest stands.
ALL_MUST_HOLD = frozenset({"l7proxy_healthy"})
SCRAPE_TIMEOUT = 5.0

Status = dict[str, Any]


def combine(family: str, sample: str, values: Sequence[float]) -> float:
    """One series' value from the workers' values (rules in the module docstring)."""
    if sample.endswith("_created"):
        return min(values)
    if family in PER_POLICY:
        return max(values)
    if family in ALL_MUST_HOLD:
        return min(values)
    return sum(values)


def parse(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


def combine_families(workers: Iterable[Iterable[Metric]]) -> list[Metric]:
    """The workers' metric families (one list per worker) as one list."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[float]] = {}
    for worker in workers:
        for fam in worker:
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            for s in fam.samples:
                key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                values.setdefault(key, []).append(s.value)
    for (family, sample, labels), vals in values.items():
        families[family].add_sample(sample, dict(labels), combine(family, sample, vals))
    return list(families.values())


def counted(families: Iterable[Metric]) -> list[Metric]:
    """What a worker had counted (counters and histograms of its traffic, not levels,
    not per-policy series, not creation times): carried on once it is gone."""
    kept = []
    for fam in families:
        if fam.type not in ("counter", "histogram", "summary") or fam.name in PER_POLICY:
            continue
        copy = Metric(fam.name, fam.documentation, fam.type)
        for s in fam.samples:
            if not s.name.endswith("_created"):
                copy.add_sample(s.name, s.labels, s.value)
        kept.append(copy)
    return kept


@dataclass
class WorkerEndpoint:
    """Where one worker serves its metrics, while it runs."""

    worker: int
    pid: int
    url: str  # http://127.0.0.1:PORT/metrics


@dataclass
class WorkersView:
    """What the supervisor knows of its workers, read at each scrape.

    ``own``: the supervisor's own metrics, combined with the workers' (the agent's:
    its datapath, kernel drops and policy; the workers have the proxy's traffic);
    ``own_health``: its own ``/healthz`` body, which must be healthy too."""

    configured: int
    endpoints: Callable[[], list[WorkerEndpoint]]
    restarts: Callable[[], int]
    extra: dict[str, Any] = field(default_factory=dict)
    mode: str = "firewall"
    own: Callable[[], Awaitable[bytes]] | None = None
    own_health: Callable[[], Awaitable[Status]] | None = None


class WorkerMetrics:
    """The supervisor's ``/metrics`` and ``/healthz`` (served by ``serve_metrics``)."""

    def __init__(self, view: WorkersView) -> None:
        self.view = view
        self.address: tuple[str, int] | None = None
        self.runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._last: list[Metric] = []
        self._seen: dict[int, tuple[int, list[Metric]]] = {}  # worker -> (pid, last scrape)
        self._gone: list[Metric] = []  # what workers that are gone had counted
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Families(self))

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("metrics are not served yet")
        host, port = self.address
        return f"http://{host}:{port}/metrics"

    async def _get(self, url: str) -> tuple[int, str] | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
            )
        try:
            async with self._session.get(url) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("worker metrics at %s: %s", url, exc or "timeout")
            return None

    async def scrape(self) -> bytes:
        endpoints = self.view.endpoints()
        answers = await asyncio.gather(*(self._get(e.url) for e in endpoints))
        running = {e.worker: e.pid for e in endpoints}
        for worker, (pid, families) in list(self._seen.items()):
            if running.get(worker) != pid:  # gone (restarted, or not yet)
                self._gone = combine_families([self._gone, counted(families)])
                del self._seen[worker]
        scraped = []
        for endpoint, answer in zip(endpoints, answers, strict=True):
            if answer is not None and answer[0] == 200:
                parsed = parse(answer[1])
                self._seen[endpoint.worker] = (endpoint.pid, parsed)
                scraped.append(parsed)
        own = [parse((await self.view.own()).decode())] if self.view.own is not None else []
        families = combine_families([*own, *scraped, self._gone])
        families.append(
            _gauge("l7proxy_workers", "Worker processes configured", self.view.configured)
        )
        families.append(
            _gauge(
                "l7proxy_workers_serving",
                "Worker processes that answered this scrape",
                len(scraped),
            )
        )
        restarts = Metric("l7proxy_worker_restarts", "Workers restarted after they died", "counter")
        restarts.add_sample("l7proxy_worker_restarts_total", {}, self.view.restarts())
        families.append(restarts)
        self._last = families
        return generate_latest(self._registry)

    async def health(self) -> Status:
        endpoints = self.view.endpoints()
        answers = await asyncio.gather(
            *(self._get(e.url.rsplit("/", 1)[0] + "/healthz") for e in endpoints)
        )
        workers = []
        for endpoint, answer in zip(endpoints, answers, strict=True):
            healthy = answer is not None and answer[0] == 200
            workers.append({"worker": endpoint.worker, "pid": endpoint.pid, "healthy": healthy})
        healthy = len(workers) == self.view.configured and all(w["healthy"] for w in workers)
        body: Status = {"healthy": healthy, "mode": self.view.mode, "workers": workers}
        if self.view.own_health is not None:
            own = await self.view.own_health()
            body = {**own, **body, "healthy": healthy and bool(own.get("healthy"))}
        body.update(self.view.extra)
        return body

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Families(Collector):
    """Hands ``generate_latest`` the families combined by the scrape in progress."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self.metrics._last)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text)
    g.add_metric([], value)
    return g
