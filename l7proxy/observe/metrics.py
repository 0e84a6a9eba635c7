"""Prometheus metrics and readiness, with Cilium/Hubble names where one exists.

Two feeds, so the request path never pays for a scrape and a scrape never
walks the flow log:

- Flow records (a ``FlowLog`` subscriber) count as they happen: every L7
  decision, every kernel drop/audit event, every connection the firewall
  refuses at L3/L4, every client cut by a limit, and the upstream reply
  latency of forwarded requests.
- Everything that is a level or a kernel-side counter (policies, revision,
  import outcomes, redirects, active connections, parse errors, BPF
  counters and map fill) is read at scrape time from a status callable: the
  agent's ``Agent.status(...)`` dict or the firewall's equivalent. The
  callable may be async (the agent reads its BPF maps on its kernel thread).

A dedicated ``CollectorRegistry`` keeps these apart from anything else in
the process. ``serve_metrics`` exposes ``/metrics`` and ``/healthz`` (200 when
healthy, 503 otherwise, JSON body) with a small aiohttp app.

    metrics = attach_metrics(flowlog, status_fn, health_fn)
    runner = await serve_metrics(metrics, "127.0.0.1", 9962)
    ...
    await runner.cleanup()
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("l7proxy.observe.metrics")

Status = dict[str, Any]
StatusFn = Callable[[], Any]  # returns a Status, or an awaitable of one

# Flow protocol -> the proxy (parser family) that handled it; Cilium's proxy_type.
PROXY_TYPE = {
    "http": "http",
    "grpc": "http",
    "kafka": "kafka",
    "cassandra": "cassandra",
    "tls": "tls",
}
# Kernel counters that mean "this packet went on" (proxy_replies is a subset of ct_hits).
FORWARD_COUNTERS = ("allowed", "redirected", "ct_hits", "proxy_upstream")
# Latency buckets (seconds): loopback sub-millisecond up to slow upstreams.
REPLY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """All metrics of one agent or firewall process."""

    def __init__(self, status_fn: StatusFn | None = None, health_fn: StatusFn | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.status_fn = status_fn
        self.health_fn = health_fn
        self.status: Status | None = None  # refreshed right before each scrape
        self.address: tuple[str, int] | None = None  # where serve_metrics listens
        self.runner: web.AppRunner | None = None
        self.flowlog = None
        r = self.registry
        self.flows = Counter(
            "hubble_flows_processed",
            "Flow records processed, by type (L7, L3_L4), verdict and protocol",
            ["type", "verdict", "protocol"],
            registry=r,
        )
        self.drops = Counter(
            "cilium_drop_count",
            "Packets (agent) or connections (firewall) dropped, by reason and direction",
            ["reason", "direction"],
            registry=r,
        )
        self.limits = Counter(
            "l7proxy_proxy_limit_exceeded",
            "Clients cut by a proxy limit (header_timeout, body_timeout, max_frame, "
            "max_held_frame) or paused by one (max_held_bytes), by limit and protocol",
            ["limit", "protocol"],
            registry=r,
        )
        self.reply_seconds = Histogram(
            "cilium_proxy_upstream_reply_seconds",
            "Time from a forwarded request to its upstream reply, by L7 protocol",
            ["protocol"],
            buckets=REPLY_BUCKETS,
            registry=r,
        )
        # cilium_policy_l7_total mixes this feed (received/forwarded/denied) with
        # the proxy's parse error counters, so it is emitted by the collector.
        self.l7_counts: dict[tuple[str, str], int] = defaultdict(int)
        r.register(_StatusCollector(self))

    # ------------------------------------------------------------ flow feed

    def observe(self, record: dict) -> None:
        """FlowLog subscriber: called once per record, on the proxy's loop."""
        kind = record.get("type")
        verdict = record.get("verdict", "")
        protocol = record.get("protocol", "")
        if kind == "l7":
            self.flows.labels("L7", verdict, protocol).inc()
            proxy_type = PROXY_TYPE.get(protocol, protocol)
            self.l7_counts[("received", proxy_type)] += 1
            self.l7_counts[("denied" if verdict == "DENIED" else "forwarded", proxy_type)] += 1
            reply = record.get("reply") or {}
            latency = record.get("latency_ms")
            # Only a request that reached the upstream and got its answer has an
            # upstream reply time; denials are answered by the proxy itself.
            if verdict != "DENIED" and isinstance(latency, (int, float)) and "closed" not in reply:
                self.reply_seconds.labels(protocol).observe(latency / 1000.0)
        elif kind == "limit":
            self.limits.labels(record.get("limit", ""), protocol).inc()
        elif kind == "drop":
            # One record may stand for many packets (the kernel aggregates drop reports).
            packets = int(record.get("count", 1))
            self.flows.labels("L3_L4", verdict, protocol).inc(packets)
            if verdict == "DROPPED":
                self.drops.labels(
                    drop_reason(record.get("reason", "")),
                    (record.get("direction") or "ingress").upper(),
                ).inc(packets)

    __call__ = observe

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("metrics are not served yet")
        host, port = self.address
        return f"http://{host}:{port}/metrics"

    async def close(self) -> None:
        """Stop serving and stop counting."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.flowlog is not None:
            self.flowlog.unsubscribe(self.observe)

    # ------------------------------------------------------------ scrape

    async def refresh(self) -> None:
        if self.status_fn is None:
            self.status = None
            return
        try:
            status = self.status_fn()
            if inspect.isawaitable(status):
                status = await status
            self.status = status
        except Exception:  # noqa: BLE001 - a broken status must not break the scrape
            log.exception("status for metrics failed")
            self.status = None

    async def scrape(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)

    async def health(self) -> Status:
        fn = self.health_fn
        if fn is None:
            await self.refresh()
            return health_from_status(self.status)
        result = fn()
        if inspect.isawaitable(result):
            result = await result
        return result


def drop_reason(text: str) -> str:
    """The kernel's reason names as they are; the firewall's words mapped onto them."""
    if text.startswith("denied by"):
        return "policy-deny"
    if text.startswith("default deny"):
        return "default-deny"
    return text or "unknown"


def health_from_status(status: Status | None) -> Status:
    if status is None:
        return {"healthy": False, "reason": "no status"}
    keys = ("healthy", "policy_revision", "policy_error", "uptime_s", "listeners", "mode")
    return {k: status[k] for k in keys if k in status}


class _StatusCollector(Collector):
    """Levels and kernel counters, from the status read just before the scrape."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []  # dynamic: nothing to check for duplicates at registration

    def collect(self):
        m = self.metrics
        st = m.status or {}
        proxy = st.get("proxy", {})
        parse_errors = proxy.get("parse_errors", {})

        l7 = CounterMetricFamily(
            "cilium_policy_l7",
            "L7 requests received, forwarded, denied and parse errors, by proxy type",
            labels=["rule", "proxy_type"],
        )
        counts = dict(m.l7_counts)
        for key, n in parse_errors.items():
            family = key.split(":", 1)[0]
            counts[("parse_errors", family)] = counts.get(("parse_errors", family), 0) + n
        for (rule, proxy_type), n in sorted(counts.items()):
            l7.add_metric([rule, proxy_type], n)
        yield l7

        healthy = GaugeMetricFamily(
            "l7proxy_healthy", "1 when the agent/firewall is ready (as /healthz)"
        )
        healthy.add_metric([], 1 if st.get("healthy") else 0)
        yield healthy
        if m.status is None:
            return

        yield _gauge("cilium_policy", "Policies in force", len(st.get("policies", [])))
        yield _gauge(
            "cilium_policy_max_revision",
            "Revision of the policy in force",
            st.get("policy_revision", 0),
        )
        change = CounterMetricFamily(
            "cilium_policy_change",
            "Policy loads, by outcome (a failure keeps the last good policy)",
            labels=["outcome"],
        )
        change.add_metric(["success"], st.get("policy_imports", 0))
        change.add_metric(["failure"], st.get("policy_import_errors", 0))
        yield change
        errors = CounterMetricFamily("cilium_policy_import_errors", "Policy loads rejected")
        errors.add_metric([], st.get("policy_import_errors", 0))
        yield errors
        if "endpoints" in st:
            yield _gauge("cilium_endpoint", "Endpoints managed", len(st["endpoints"]))

        redirects = GaugeMetricFamily(
            "cilium_proxy_redirects",
            "Policy entries redirecting to the proxy, by L7 protocol",
            labels=["protocol"],
        )
        for protocol, n in sorted(st.get("redirects", {}).items()):
            redirects.add_metric([protocol], n)
        yield redirects

        yield _gauge(
            "l7proxy_proxy_connections_active",
            "Proxied connections open now",
            proxy.get("connections_active", 0),
        )
        for name, key, text in (
            ("l7proxy_proxy_connections", "connections_total", "Proxied connections accepted"),
            (
                "l7proxy_proxy_connections_refused",
                "connections_refused",
                "Connections refused (L3/L4 deny, or a direct connection to a proxy port)",
            ),
            (
                "l7proxy_proxy_upstream_failures",
                "upstream_failures",
                "Upstream connections that failed",
            ),
            (
                "l7proxy_proxy_tls_handshake_failures",
                "tls_handshake_failures",
                "Client TLS handshakes the proxy terminates that failed or timed out",
            ),
        ):
            if key in proxy:
                fam = CounterMetricFamily(name, text)
                fam.add_metric([], proxy[key])
                yield fam
        perr = CounterMetricFamily(
            "l7proxy_proxy_parse_errors",
            "Protocol errors seen by the proxy, by protocol and side",
            labels=["protocol", "side"],
        )
        for key, n in sorted(parse_errors.items()):
            family, _, side = key.partition(":")
            perr.add_metric([family, side or "client"], n)
        yield perr

        dp = st.get("datapath") or {}
        totals = (dp.get("counters") or {}).get("total") or {}
        if totals:
            fwd = CounterMetricFamily(
                "cilium_forward_count",
                "Packets the datapath let through (allowed, redirected, established, proxy "
                "upstream)",
            )
            fwd.add_metric([], sum(totals.get(k, 0) for k in FORWARD_COUNTERS))
            yield fwd
            raw = CounterMetricFamily(
                "l7proxy_datapath_packets", "The datapath's own packet counters", labels=["counter"]
            )
            for name, n in totals.items():
                raw.add_metric([name], n)
            yield raw
        maps = dp.get("maps") or {}
        if maps:
            pressure = GaugeMetricFamily(
                "cilium_bpf_map_pressure", "Fill ratio of each BPF map", labels=["map_name"]
            )
            for name, (used, cap) in sorted(maps.items()):
                pressure.add_metric([name], used / cap if cap else 0.0)
            yield pressure


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text)
    g.add_metric([], value)
    return g


# --------------------------------------------------------------------------- wiring


def attach_metrics(
    flowlog, status_fn: StatusFn | None, health_fn: StatusFn | None = None
) -> Metrics:
    """Create the metrics of this process and subscribe them to its flow log."""
    metrics = Metrics(status_fn, health_fn)
    metrics.flowlog = flowlog
    flowlog.subscribe(metrics.observe)
    return metrics


async def start_agent_metrics(agent, address: tuple[str, int]) -> Any:
    """``run --metrics``: call after ``Agent.start``; ``await metrics.close()`` before
    ``Agent.stop``. With workers, the agent's own metrics and its workers' scrapes,
    combined (l7proxy/observe/aggregate.py)."""
    metrics = attach_metrics(agent.flowlog, agent_status_fn(agent))
    if agent.workers is None:
        metrics.runner = await serve_metrics(metrics, *address)
        agent.metrics = metrics
        return metrics
    from l7proxy.observe.aggregate import WorkerMetrics, WorkersView

    workers = agent.workers
    combined = WorkerMetrics(
        WorkersView(
            workers.count,
            workers.supervisor.endpoints,
            lambda: workers.restarts,
            mode="agent",
            own=metrics.scrape,
            own_health=metrics.health,
        )
    )
    await serve_metrics(combined, *address)  # type: ignore[arg-type]
    agent.metrics = combined
    return combined


async def start_firewall_metrics(fw, address: tuple[str, int]) -> Metrics:
    """``firewall --metrics``: call after ``Firewall.start``."""
    metrics = attach_metrics(fw.proxy.flowlog, firewall_status_fn(fw))
    metrics.runner = await serve_metrics(metrics, *address)
    return metrics


async def serve_metrics(
    metrics: Metrics, host: str, port: int, health: StatusFn | None = None
) -> web.AppRunner:
    """Serve ``/metrics`` and ``/healthz``; returns the runner (``await runner.cleanup()``).
    ``metrics.address`` is set to the bound address (``port`` 0 picks a free one)."""
    if health is not None:
        metrics.health_fn = health

    async def scrape(_request: web.Request) -> web.Response:
        return web.Response(
            body=await metrics.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        body = await metrics.health()
        return web.json_response(body, status=200 if body.get("healthy") else 503, dumps=_dumps)

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0]  # the address actually bound (port 0 picks one)
    metrics.address = (bound[0], bound[1])
    metrics.runner = runner
    return runner


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str)


# --------------------------------------------------------------------------- status sources


def agent_status_fn(agent) -> StatusFn:
    """Fresh agent status per scrape: BPF counters and maps read on the kernel thread."""

    async def status() -> Status:
        dp = await agent._kernel(agent.datapath.status)
        st = agent.status(dp)
        st["mode"] = "agent"
        if agent.workers is not None:
            st.pop("proxy", None)  # the workers' own metrics count their traffic
        _add_proxy_stats(st, agent.proxy)
        compiled = agent.state.current if agent.state else None
        if compiled is not None:
            st["redirects"] = _redirects(
                compiled, dict(agent.listeners or agent.agent_state.proxy_ports)
            )
        return st

    return status


def agent_worker_status_fn(proxy) -> StatusFn:
    """A worker of ``run --workers N``: its proxy's counters (the agent has the rest)."""

    def status() -> Status:
        st: Status = {"mode": "agent-worker", "healthy": True}
        _add_proxy_stats(st, proxy)
        return st

    return status


def firewall_status_fn(fw) -> StatusFn:
    """The firewall's status, shaped like the agent's (no datapath)."""

    def status() -> Status:
        compiled = fw.state.current
        source = fw.source
        st: Status = {
            "mode": "firewall",
            "healthy": fw.sock is not None and source.last_error is None,
            "listeners": {"firewall": "{}:{}".format(*fw.sock.getsockname()[:2])}
            if fw.sock is not None
            else {},
            "policies": [
                {"name": p.key, "source": p.source, "audit": p.audit} for p in compiled.policies
            ],
            "policy_revision": compiled.revision,
            "policy_error": str(source.last_error) if source.last_error else None,
            "policy_imports": source.imports,
            "policy_import_errors": source.import_errors,
            "audit": fw.audit,
            "redirects": _redirects(compiled),
        }
        _add_proxy_stats(st, fw.proxy)
        return st

    return status


def _add_proxy_stats(st: Status, proxy) -> None:
    if proxy is None:
        return
    s = proxy.stats
    st["proxy"] = {
        "connections_total": s.connections_total,
        "connections_active": s.connections_active,
        "connections_refused": s.connections_refused,
        "upstream_failures": s.upstream_failures,
        "tls_handshake_failures": s.tls_handshake_failures,
        "parse_errors": dict(s.parse_errors),
    }


def _redirects(compiled, proxy_ports: dict[str, int] | None = None) -> dict[str, int]:
    """Policy entries that redirect to the proxy, per L7 protocol (parser family).
    Without real proxy ports (firewall mode), each family gets a stand-in."""
    if proxy_ports is None:
        proxy_ports = {family: i + 1 for i, family in enumerate(sorted(compiled.parsers_in_use()))}
    family_of = {port: family for family, port in proxy_ports.items()}
    out: dict[str, int] = {}
    for e in compiled.kernel_entries(proxy_ports):
        if e.action == "redirect":
            family = family_of.get(e.proxy_port, str(e.proxy_port))
            out[family] = out.get(family, 0) + 1
    return out
