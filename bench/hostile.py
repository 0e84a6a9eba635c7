"""Hostile clients against l7proxy and haproxy, in the same run (issue 14).

    python -m bench.hostile [--quick] [--attacks idle,slowloris_trickle,...] [--idle N] ...
    python -m bench.hostile --report bench/results/hostile.json   # the tables again

One run starts three upstreams, each with an ``l7proxy firewall`` (an L7 rule in force:
GET only) and a one-thread haproxy (the same rule, the same timeouts) in front:

- **http1**: nginx, for 10k idle connections, slowloris (heads trickled a byte at a time,
  and partial heads gone silent), pipelining from a client that never reads, and a
  connect-and-close flood (a port scan);
- **raw**: a small server that answers a request only once its whole body is in, and
  never answers ``/silent``: a stalled request body, and pipelining toward a silent
  upstream;
- **h2**: nghttpd (h2c), haproxy with ``proto h2`` on both sides: rapid reset, a SETTINGS
  flood from a client that never reads, a PING flood, a CONTINUATION flood.

Each attack runs against each proxy in turn, bounded in time, and cleans up. Measured per
attack and proxy: the proxy's CPU seconds (``/proc/PID/stat``, from the attack's start to
``--settle`` seconds after its end), its RSS before, at its peak (sampled every 0.1 s) and
after, RSS per connection where the attack is connections, upstream connections (``ss``),
how each attacking connection was cut (408, GOAWAY and its code, close, reset, or not at
all) and how long after its first byte, and the latency of a legitimate client (its own
process, one keep-alive connection, a GET every 20 ms) during the attack, against the
same client with no attack on the same proxy in the same run.

Results go to ``bench/results/hostile.json``; the tables are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    CpuMeter,
    Service,
    cpu_seconds,
    markdown_table,
    start_firewall,
    start_haproxy,
    start_nginx,
    tool_version,
    write_results,
)
from bench.hostile_attacks import ATTACKS, Attack, Ctx, Probe
from bench.hostile_peers import LegitClient, latency_stats, raw_upstream, summarize_endings

NAME = "hostile"
LABELS = {"app": "bench"}
HAPROXY_RULES = "http-request deny unless { method GET } { path_reg ^/.* }"
PROXIES = ("l7proxy", "haproxy")
GROUPS = ("http1", "raw", "h2")

# Sizes: the full run (about 10 minutes) and --quick (about 4), each overridable.
FULL = {
    "idle": 10_000,
    "hold": 5.0,
    "slowloris": 500,
    "trickle_every": 2.0,
    "stalled": 200,
    "pipeliners": 1,
    "flood_seconds": 12.0,
    "scan": 5_000,
    "header_timeout": 10.0,
    "body_timeout": 60.0,
    "baseline_seconds": 5.0,
}
QUICK = {
    **FULL,
    "idle": 1_000,
    "hold": 1.0,
    "slowloris": 50,
    "trickle_every": 0.5,
    "stalled": 20,
    "flood_seconds": 3.0,
    "scan": 500,
    # Not below the header timeout: haproxy's `timeout client` (set to it) would then cut
    # silent and idle clients before its `timeout http-request` does.
    "body_timeout": 10.0,
    "baseline_seconds": 3.0,
}


def policy_yaml(upstream_port: int) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-hostile
spec:
  endpointSelector:
    matchLabels: {{app: bench}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{{port: "{upstream_port}", protocol: TCP}}]
      rules:
        http:
        - method: GET
          path: "/.*"
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.hostile", description=__doc__.split("\n\n")[0]
    )
    names = [a.name for a in ATTACKS]
    p.add_argument("--quick", action="store_true", help="small counts and short floods")
    p.add_argument("--report", metavar="JSON", help="print the tables of a results file; no run")
    p.add_argument("--attacks", default=",".join(names), help=f"comma list of {', '.join(names)}")
    p.add_argument("--proxies", default=",".join(PROXIES), help="comma list of l7proxy, haproxy")
    sized = p.add_argument_group("sizes (defaults: the full run; --quick shrinks them)")
    for key, default in FULL.items():
        sized.add_argument(
            "--" + key.replace("_", "-"),
            type=type(default),
            default=None,
            help=f"default {default:g}, --quick {QUICK[key]:g}",
        )
    p.add_argument("--idle-deadline", type=float, default=120.0, help="to accept the idle ones")
    p.add_argument("--inflight", type=int, default=500, help="handshakes in flight at once")
    p.add_argument("--continuation-bytes", type=int, default=1024, help="per CONTINUATION frame")
    p.add_argument(
        "--grace",
        type=float,
        default=6.0,
        help="seconds past a timeout to wait (more than l7proxy's timer interval, 5 s)",
    )
    p.add_argument("--settle", type=float, default=2.0, help="seconds after an attack, then RSS")
    p.add_argument(
        "--quiet-deadline",
        type=float,
        default=120.0,
        help="most seconds to wait for a proxy still busy after an attack",
    )
    p.add_argument("--legit-interval", type=float, default=0.02, help="seconds between GETs")
    p.add_argument("--legit-timeout", type=float, default=5.0, help="a GET slower fails")
    args = p.parse_args(argv)
    for key, default in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.attacks = [a for a in args.attacks.split(",") if a]
    args.proxies = [x for x in args.proxies.split(",") if x]
    unknown = [a for a in args.attacks if a not in names] + [
        x for x in args.proxies if x not in PROXIES
    ]
    if unknown:
        p.error(f"unknown: {', '.join(unknown)}")
    return args


# --------------------------------------------------------------------------- processes


@dataclass
class Target:
    """One proxy under attack, with what is behind it and how a legitimate client asks."""

    name: str
    service: Service
    upstream_port: int
    upstream_pid: int
    legit_protocol: str  # http1 or h2
    legit_path: str

    @property
    def address(self) -> tuple[str, int]:
        return self.service.host, self.service.port


def _haproxy_timeouts(args: argparse.Namespace) -> dict[str, str]:
    # haproxy's counterparts of l7proxy's limits: `timeout http-request` is the header
    # deadline; haproxy has no body timer, its client-side inactivity timer is the nearest.
    return {
        "http-request": f"{round(args.header_timeout * 1000)}ms",
        "client": f"{round(args.body_timeout * 1000)}ms",
    }


@contextmanager
def group_targets(group: str, args: argparse.Namespace, workdir: Path) -> Iterator[list[Target]]:
    """The upstream of ``group`` and each proxy in front of it; all stopped on exit."""
    with ExitStack() as stack:
        legit = ("h2", "/ok.txt") if group == "h2" else ("http1", "/")
        if group == "http1":
            nginx = stack.enter_context(start_nginx(workdir, name="nginx"))
            up_port, up_pid = nginx.port, nginx.pid
        elif group == "raw":
            raw = stack.enter_context(raw_upstream())
            up_port, up_pid = raw.port, raw.pid
        else:
            from bench.h2_tools import nghttpd

            docroot = workdir / "h2root"
            docroot.mkdir(exist_ok=True)
            (docroot / "ok.txt").write_text("ok")
            up_port, up_pid = stack.enter_context(nghttpd(docroot))
        h2 = "proto h2" if group == "h2" else ""
        targets = []
        for name in args.proxies:
            if name == "l7proxy":
                svc = stack.enter_context(
                    start_firewall(
                        policy_yaml(up_port),
                        (LOOPBACK, up_port),
                        LABELS,
                        workdir,
                        name=f"l7proxy-{group}",
                        extra_args=[
                            "--header-timeout",
                            f"{args.header_timeout:g}",
                            "--body-timeout",
                            f"{args.body_timeout:g}",
                        ],
                    )
                )
            else:
                svc = stack.enter_context(
                    start_haproxy(
                        workdir,
                        (LOOPBACK, up_port),
                        frontend_rules=HAPROXY_RULES,
                        name=f"haproxy-{group}",
                        maxconn=haproxy_maxconn(args),
                        timeouts=_haproxy_timeouts(args),
                        bind_options=h2,
                        server_options=h2,
                    )
                )
            targets.append(Target(name, svc, up_port, up_pid, *legit))
        yield targets


def haproxy_maxconn(args: argparse.Namespace) -> int:
    """Enough for the idle connections and the rest, if the descriptor limit allows: haproxy
    reserves two descriptors per connection (client and server side) and refuses to start
    when its maxconn needs more than it may open."""
    wanted = args.idle + 2 * args.slowloris + 2000
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(wanted, (hard - 100) // 2)


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return None


def raise_open_files(need: int) -> int:
    """Raise this process's descriptor limit (children inherit it) to the hard limit, and
    the hard limit to ``need`` if it may (CAP_SYS_RESOURCE); the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            pass  # what the hard limit allows
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def traceback_in_log(service: Service) -> bool:
    log = service.workdir / "stderr.log"
    return log.exists() and "Traceback" in log.read_text(errors="replace")


# --------------------------------------------------------------------------- measuring


class PeakRss:
    """The proxy's RSS sampled every 0.1 s in the background; ``stop()`` gives the peak."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.peak = probe.rss_kib()
        self._task = asyncio.ensure_future(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.probe.rss_kib())
            await asyncio.sleep(0.1)

    def stop(self) -> float:
        self._task.cancel()
        self.peak = max(self.peak, self.probe.rss_kib())
        return round(self.peak / 1024, 1)


async def quiet(pid: int, limit: float, window: float = 0.5, busy: float = 0.25) -> float:
    """Wait until a process uses less than ``busy`` of a core over ``window`` seconds
    (the legitimate client alone stays well below); the seconds waited (at most ``limit``)."""
    started = time.monotonic()
    while True:
        spent = cpu_seconds(pid)
        await asyncio.sleep(window)
        if cpu_seconds(pid) - spent < busy * window:
            return time.monotonic() - started - window
        if time.monotonic() - started > limit:
            return time.monotonic() - started


async def _no_attack(ctx: Ctx) -> dict[str, Any]:
    await asyncio.sleep(ctx.args.baseline_seconds)
    return {"endings": [], "notes": "no attack"}


def baseline(group: str) -> Attack:
    return Attack("baseline", group, _no_attack, lambda a: "none (baseline)")


async def measure(attack: Attack, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """One attack against one proxy, with the legitimate client running meanwhile."""
    probe = Probe(target.service.pid, target.upstream_port)
    legit = LegitClient(
        target.legit_protocol,
        target.address,
        target.legit_path,
        interval=args.legit_interval,
        timeout=args.legit_timeout,
    )
    problems = []
    try:
        busy_before = await quiet(target.service.pid, args.quiet_deadline)
        if busy_before > 1:
            problems.append(f"still busy {busy_before:.0f} s after the previous attack")
        if not legit.wait_ready(15):
            problems.append("the legitimate client got no answer before the attack")
        await asyncio.sleep(0.2)
        # Before and after are both taken with the legitimate client connected, so its own
        # upstream connection cancels out of "upstream connections left".
        before = probe.snapshot()
        cpu = CpuMeter(target.service.pid)
        upstream_cpu = CpuMeter(target.upstream_pid)
        peak = PeakRss(probe)
        start = time.monotonic()
        hard_limit = (
            (args.header_timeout + args.body_timeout + args.flood_seconds + args.hold) * 2
            + args.idle_deadline
            + 60
        )
        ctx = Ctx(target.address, probe, before, args)
        detail = await asyncio.wait_for(attack.run(ctx), hard_limit)
        end = time.monotonic()
        # The attack's cost includes what the proxy still does once it is over (a backlog
        # of frames already read): wait until it is quiet, then read its CPU and memory.
        await asyncio.sleep(args.settle)
        busy_after = args.settle + await quiet(target.service.pid, args.quiet_deadline)
        cpu_s = cpu.stop()
        alive = target.service.proc.poll() is None
        after = probe.snapshot() if alive else dict.fromkeys(before)
    finally:
        samples = legit.stop()
    if not alive:
        problems.append(f"{target.name} died")
    endings = detail.pop("endings")
    return {
        "attack": attack.name,
        "title": attack.describe(args),
        "proxy": target.name,
        "seconds": round(end - start, 2),
        "busy_after_s": round(busy_after, 1),
        "cut": summarize_endings(endings),
        "proxy_cpu_s": round(cpu_s, 2),
        "proxy_user_s": round(cpu.user or 0.0, 2),
        "proxy_sys_s": round(cpu.system or 0.0, 2),
        "upstream_cpu_s": round(upstream_cpu.stop(), 2),
        "rss_mib": {"before": before["rss_mib"], "peak": peak.stop(), "after": after["rss_mib"]},
        "fds": {"before": before["fds"], "after": after["fds"]},
        "upstream_connections": {
            "before": before["upstream_connections"],
            "after": after["upstream_connections"],
        },
        # At least a second of it, so that an attack over at once still has a window.
        "legit": latency_stats(samples, start, max(end, start + 1.0)),
        "alive": alive,
        "problems": problems,
        **detail,
    }


async def run_group(
    group: str, attacks: list[Attack], args: argparse.Namespace, workdir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Baselines, then each attack against each proxy (alternating which goes first)."""
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    with group_targets(group, args, workdir) as targets:
        for t in targets:
            facts[f"{t.name}-{group}"] = {"open_files_limit": open_files_limit(t.service.pid)}
        for i, attack in enumerate([baseline(group), *attacks]):
            order = targets if i % 2 == 0 else list(reversed(targets))
            for target in order:
                print(f"  {group}: {attack.describe(args)} -> {target.name}", flush=True)
                row = await measure(attack, target, args)
                rows.append(row)
                print(f"    {_cut_cell(row)}; {row.get('notes', '')}", flush=True)
        for t in targets:
            facts[f"{t.name}-{group}"]["traceback_in_log"] = traceback_in_log(t.service)
    return rows, facts


def with_baselines(rows: list[dict[str, Any]]) -> None:
    """Each row's legitimate p99 as a multiple of its own proxy's baseline (same group)."""
    base: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["attack"] == "baseline":
            base[(r["group"], r["proxy"])] = r["legit"]["p99_ms"]
    for r in rows:
        b = base.get((r["group"], r["proxy"]))
        p99 = r["legit"]["p99_ms"]
        r["legit_p99_over_baseline"] = round(p99 / b, 2) if p99 is not None and b else None


# --------------------------------------------------------------------------- report


def _cut_cell(r: dict[str, Any]) -> str:
    cut = r["cut"]
    if not cut["connections"]:
        return "-"
    if cut["connections"] == 1:
        return next(iter(cut["how"]))
    return ", ".join(f"{how} ×{n:,}" for how, n in cut["how"].items())


def _when_cell(r: dict[str, Any]) -> str:
    cut = r["cut"]
    if cut["cut_after_median_s"] is None:
        return "-"
    if cut["connections"] == 1:
        return f"{cut['cut_after_median_s']:.2f}"
    return f"{cut['cut_after_median_s']:.1f} / {cut['cut_after_max_s']:.1f}"


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _legit_cells(r: dict[str, Any]) -> list[str]:
    legit = r["legit"]
    ratio = r.get("legit_p99_over_baseline")
    return [
        f"{_num(legit['p50_ms'], '{:.1f}')} / {_num(legit['p99_ms'], '{:.1f}')}",
        "-" if ratio is None or r["attack"] == "baseline" else f"{ratio:.1f}×",
        f"{legit['failed']}/{legit['requests']}",
    ]


def report(doc: dict[str, Any]) -> str:
    """The full table: one row per attack and proxy."""
    rows = []
    for r in doc["rows"]:
        rss = r["rss_mib"]
        up = r["upstream_connections"]
        rows.append(
            [
                r["title"],
                r["proxy"],
                _cut_cell(r),
                _when_cell(r),
                f"{r['proxy_cpu_s']:.2f}",
                f"{r['busy_after_s']:.1f}",
                f"{_num(rss['before'])} / {_num(rss['peak'])} / {_num(rss['after'])}",
                f"{up['before']} → {_num(up['after'])}",
                *_legit_cells(r),
                r.get("notes", ""),
            ]
        )
    return markdown_table(
        [
            "attack",
            "proxy",
            "cut (how × connections)",
            "cut after s (median / max)",
            "proxy CPU s",
            "busy after s",
            "RSS MiB before / peak / after",
            "upstream conns before → after",
            "legit p50 / p99 ms",
            "p99 × baseline",
            "legit failed",
            "notes",
        ],
        rows,
    )


def _outcome(r: dict[str, Any]) -> str:
    if r["attack"] == "idle":
        return (
            f"{r['rss_per_connection_kib']:.1f} KiB/conn, {r['upstream_opened']} upstream, "
            f"accepted in {r['accept_s']:.1f} s"
        )
    if r["attack"] == "scan":
        up = r["upstream_connections"]
        left = "?" if up["after"] is None else up["after"] - up["before"]
        return f"{left} upstream left"
    when = r["cut"]["cut_after_median_s"]
    return _cut_cell(r) + ("" if when is None else f" at {when:.1f} s")


def _legit_summary(r: dict[str, Any]) -> str:
    legit, ratio = r["legit"], r.get("legit_p99_over_baseline")
    cell = "" if legit["p99_ms"] is None else f"{legit['p99_ms']:.1f}"
    if ratio is not None:
        cell += f" ({ratio:.1f}×)"
    if legit["failed"]:
        cell += f"{', ' if cell else ''}{legit['failed']}/{legit['requests']} failed"
    return cell or "-"


def summary(doc: dict[str, Any]) -> str:
    """The short table for the README: per attack, l7proxy beside haproxy."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    titles: dict[str, str] = {}
    for r in doc["rows"]:
        if r["attack"] == "baseline":
            continue
        by.setdefault(r["attack"], {})[r["proxy"]] = r
        titles[r["attack"]] = r["title"]
    rows = []
    for attack, per in by.items():
        cells = [titles[attack]]
        for proxy in PROXIES:
            r = per.get(proxy)
            if r is None:
                cells += ["-", "-", "-"]
                continue
            cells += [
                _outcome(r),
                f"{r['proxy_cpu_s']:.2f} / {_num(r['rss_mib']['peak'])}",
                _legit_summary(r),
            ]
        rows.append(cells)
    return markdown_table(
        [
            "attack",
            "l7proxy: outcome",
            "CPU s / peak MiB",
            "legit p99 ms",
            "haproxy: outcome",
            "CPU s / peak MiB",
            "legit p99 ms",
        ],
        rows,
    )


# --------------------------------------------------------------------------- main


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        if r["attack"] == "idle" and r["proxy"] == "l7proxy":
            out["idle_connections"] = r["connected"]
            out["idle_l7proxy_rss_mib"] = r["held"]["rss_mib"]
            out["idle_l7proxy_rss_per_connection_kib"] = r["rss_per_connection_kib"]
            out["idle_l7proxy_upstream_connections"] = r["upstream_opened"]
            out["idle_under_100_mib_and_no_upstream"] = (
                r["held"]["rss_mib"] < 100 and r["upstream_opened"] == 0
            )
    return out


async def run(args: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], dict]:
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    for group in GROUPS:
        attacks = [a for a in ATTACKS if a.group == group and a.name in args.attacks]
        if not attacks:
            continue
        group_rows, group_facts = await run_group(group, attacks, args, workdir)
        for r in group_rows:
            r["group"] = group
        rows += group_rows
        facts.update(group_facts)
    return rows, facts


def main(argv: list[str] | None = None) -> int:
    argv = [] if argv is None else argv  # called by the runner: defaults
    args = parse_args(argv)
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        print(f"{doc['command']} ({doc['date_utc']})\n\n{report(doc)}\n\n{summary(doc)}")
        return 0
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # writes to sockets cut under us
    need = args.idle + 2 * args.slowloris + args.stalled + 2000
    nofile = raise_open_files(need)
    started_at = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        rows, facts = asyncio.run(run(args, Path(tmp)))
    with_baselines(rows)
    problems = [f"{r['title']} / {r['proxy']}: {p}" for r in rows for p in r.pop("problems")]
    for name, f in facts.items():
        if f.get("traceback_in_log"):
            problems.append(f"{name}: a traceback in its log")
        limit = f.get("open_files_limit")
        if limit is not None and limit < need:
            problems.append(f"{name}: open files limit {limit} < {need}")
    if nofile < need:
        problems.append(f"the bench may open only {nofile} files, {need} wanted")
    head = headline(rows)
    if head and not head["idle_under_100_mib_and_no_upstream"] and args.idle >= 10_000:
        problems.append("10k idle connections: over 100 MiB or an upstream connection")
    doc = {
        "command": "python -m bench.hostile" + (" " + shlex.join(argv) if argv else ""),
        "settings": {
            **{k: v for k, v in vars(args).items()},
            "l7proxy": "python -m l7proxy firewall, L7 rule GET /.* (uvloop, C head parser), "
            f"--header-timeout {args.header_timeout:g} --body-timeout {args.body_timeout:g}",
            "haproxy": f"nbthread 1, mode http, {HAPROXY_RULES}, "
            + ", ".join(f"timeout {k} {v}" for k, v in _haproxy_timeouts(args).items())
            + "; h2: proto h2 on bind and server",
            "legit": "own process, one keep-alive connection, GET every "
            f"{args.legit_interval * 1000:g} ms, {args.legit_timeout:g} s timeout",
            "bench_open_files": nofile,
            "haproxy_maxconn": haproxy_maxconn(args),
        },
        "versions": {
            "haproxy": tool_version(["haproxy", "-v"]),
            "nginx": tool_version(["nginx", "-v"]),
            "nghttpd": tool_version(["nghttpd", "--version"]),
            "load_average": os.getloadavg(),
        },
        "headline": head,
        "processes": facts,
        "rows": rows,
        "problems": problems,
        "wall_seconds": round(time.monotonic() - started_at, 1),
    }
    path = write_results(NAME, doc)
    print()
    print(report(doc))
    print()
    print(summary(doc))
    print(f"\nheadline: {head}\nwritten: {path}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
