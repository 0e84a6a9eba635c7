"""``firewall --workers``: requests/s with 1 worker against N, at a load that
saturates one.

    python -m bench workers [--duration 10] [--rounds 3] [--connections 64] [--workers 2]

One run starts nginx (the upstream: one process, about a tenth of the proxy's
CPU per request), then l7proxy in firewall mode with an L7 rule in force and
the flow log on, once with ``--workers 1`` and once with ``--workers N``. wrk
(keep-alive GETs, ``--connections`` connections, enough to keep every worker
busy) runs against each, interleaved, ``--rounds`` times. Reported per
configuration: requests/s, p99 latency, CPU per request of the proxy's
processes together (supervisor and workers), the cores they kept busy, and
how the requests spread over the workers (from the flow log's ``worker``
field). The headline is requests/s of N workers over 1: the median over the
rounds of each round's ratio, since the two runs of a round meet the same
background load.

On a machine with C cores, wrk and nginx share them with the proxy: with
C = 2 the ratio says how much a second worker gains while the load generator
and the upstream take their part of the same two cores, not the ratio a
node with spare cores would see (docs/workers.md).

Results go to ``bench/results/workers.json``; a table is printed.

``--agent`` measures transparent mode instead (``run --workers``; root, BPF):
two endpoints in namespaces, nginx in the server's, wrk in the client's, an L7
rule between them, so the kernel redirects every connection to the agent's
proxy. One node and one agent, switched between ``--workers 1`` and
``--workers N`` before each run by a lossless takeover (the configurations
cannot run side by side on one node). CPU is the agent's processes together
(agent and workers). Results go to ``bench/results/workers_agent.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    markdown_table,
    median,
    ratio,
    run_wrk,
    start_firewall,
    start_nginx,
    tool_version,
    us_per_request,
    write_results,
)
from l7proxy.observe.flowlog import retained_files

NAME = "workers"
LABELS = {"app": "bench"}


def policy_yaml(upstream_port: int) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-get-only
spec:
  endpointSelector:
    matchLabels: {{app: bench}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports:
      - {{port: "{upstream_port}", protocol: TCP}}
      rules:
        http:
        - {{method: GET, path: "/.*"}}
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.workers", description=__doc__.split("\n\n")[0]
    )
    argv = [] if argv is None else argv  # called by the runner: defaults
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs (medians reported)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="N, compared with 1")
    p.add_argument(
        "--agent", action="store_true", help="transparent mode: l7proxy run on a real node"
    )
    return p.parse_args(argv)


def proxy_pids(supervisor: int) -> list[int]:
    """The supervisor and its workers (one process when there are no workers)."""
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        return [supervisor, *(int(p) for p in f.read().split())]


def worker_share(flows: Path, since: int) -> tuple[dict[str, int], int]:
    """Records per worker after the first ``since`` lines, and the line count now."""
    lines = [line for f in retained_files(flows) for line in f.read_bytes().splitlines()]
    counts = Counter(str(json.loads(line).get("worker", 0)) for line in lines[since:])
    return dict(sorted(counts.items())), len(lines)


@dataclass
class Target:
    """One configuration under load: where wrk sends its requests (from which
    network namespace), the proxy's top process, and its flow log."""

    url: str
    pid: Callable[[], int]
    flows: Path
    netns: str | None = None
    prepare: Callable[[], None] = lambda: None  # made current before each run


def measure(configs: dict[str, Target], args, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    seen = dict.fromkeys(configs, 0)
    for target in configs.values():  # warm-up
        target.prepare()
        run_wrk(
            target.url,
            connections=args.connections,
            duration=2,
            workdir=workdir,
            netns=target.netns,
        )
    time.sleep(1.5)
    for rnd in range(args.rounds):
        order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
        for name in order:
            target = configs[name]
            target.prepare()
            _, seen[name] = worker_share(target.flows, 0)
            meters = [CpuMeter(pid) for pid in proxy_pids(target.pid())]
            result = run_wrk(
                target.url,
                threads=args.threads,
                connections=args.connections,
                duration=args.duration,
                workdir=workdir,
                netns=target.netns,
            )
            run = result.as_dict()
            run["round"] = rnd
            run["proxy_cpu_s"] = sum(m.stop() for m in meters)
            run["proxy_us_per_req"] = us_per_request(run["proxy_cpu_s"], result.requests)
            run["proxy_cores_busy"] = run["proxy_cpu_s"] / (result.duration_us / 1e6)
            time.sleep(1.5)  # each worker writes its flow records on a 1 s timer
            run["flow_records_by_worker"], seen[name] = worker_share(target.flows, seen[name])
            runs[name].append(run)
            print(
                f"  round {rnd} {name:<10} {run['rps']:>9,.0f} req/s  p99 "
                f"{run['p99_us'] / 1000:6.2f} ms  proxy {run['proxy_us_per_req']:6.1f} us/req "
                f"({run['proxy_cores_busy']:.2f} cores)  by worker {run['flow_records_by_worker']}"
                f"  errors {result.status_errors + result.socket_errors}",
                flush=True,
            )
    return runs


def firewall_targets(args, workdir: Path, stack: ExitStack) -> dict[str, Target]:
    nginx = stack.enter_context(start_nginx(workdir))
    upstream = (nginx.host, nginx.port)
    targets = {}
    for w in (1, args.workers):
        svc = stack.enter_context(
            start_firewall(
                policy_yaml(nginx.port),
                upstream,
                LABELS,
                workdir,
                flowlog=True,
                extra_args=["--workers", str(w)],
                name=f"l7proxy-{w}",
            )
        )
        targets[config_name(w)] = Target(
            svc.url + "/", lambda pid=svc.pid: pid, svc.workdir / "flows.jsonl"
        )
    return targets


AGENT_ENDPOINTS = {"server": {"app": "bench"}, "client": {"app": "bench-client"}}
AGENT_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-get-only}
spec:
  endpointSelector: {matchLabels: {app: bench}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: bench-client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/.*"}]
"""


def agent_targets(args, workdir: Path, stack: ExitStack) -> dict[str, Target]:
    """One node; before each run the agent is taken over by one with the run's
    ``--workers`` if it has another."""
    from tests.support.node import running_node

    node = stack.enter_context(running_node(AGENT_ENDPOINTS, start_agent=False))
    node.start_agent("--workers", "1")
    node.import_policy(AGENT_POLICY)
    stack.enter_context(start_nginx(workdir, port=80, netns=node.endpoint("server").netns))
    current = {"workers": 1}

    def switch_to(workers: int) -> None:
        if current["workers"] == workers:
            return
        old = node.agent
        argv = [*node.l7proxy, "--state-dir", str(node.store.root), "run"]
        new = node.spawn(
            [*argv, "--workers", str(workers), "--drain-timeout", "1"],
            "agent running",
            f"agent-{len(node.procs)}",
            timeout=60,
        )
        node.agent = new
        node.wait_status(lambda s: s and s["pid"] == new.pid and s["healthy"], timeout=30)
        assert old is not None
        old.wait(timeout=30)
        current["workers"] = workers

    url = f"http://{node.ip('server')}/"
    client = node.endpoint("client").netns
    return {
        config_name(w): Target(
            url,
            lambda: node.agent.pid,
            node.store.flowlog,
            netns=client,
            prepare=lambda w=w: switch_to(w),
        )
        for w in (1, args.workers)
    }


def config_name(workers: int) -> str:
    return f"{workers} worker{'s' if workers > 1 else ''}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = time.monotonic()
    n = args.workers
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        make = agent_targets if args.agent else firewall_targets
        configs = make(args, workdir, stack)
        print(
            f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s x "
            f"{args.rounds} rounds{' (agent mode)' if args.agent else ''} ...",
            flush=True,
        )
        runs = measure(configs, args, workdir)

    summary = {
        name: {
            "rps": median([r["rps"] for r in rs]),
            "p99_us": median([r["p99_us"] for r in rs]),
            "proxy_us_per_req": median([r["proxy_us_per_req"] for r in rs]),
            "proxy_cores_busy": median([r["proxy_cores_busy"] for r in rs]),
            "errors": sum(r["status_errors"] + r["connect_errors"] + r["read_errors"] for r in rs),
        }
        for name, rs in runs.items()
    }
    one, many = summary["1 worker"], summary[f"{n} workers"]
    by_round = [
        ratio(b["rps"], a["rps"])
        for a, b in zip(runs["1 worker"], runs[f"{n} workers"], strict=True)
    ]
    doc = {
        "settings": vars(args),
        "versions": {"wrk": tool_version(["wrk", "--version"])},
        "headline": {
            # Rounds run back to back, so a round's ratio compares the two under the
            # same background load; their median is the figure a busy machine allows.
            f"rps_{n}_over_1": median(by_round),
            f"rps_{n}_over_1_by_round": by_round,
            f"median_rps_{n}_over_median_rps_1": ratio(many["rps"], one["rps"]),
        },
        "load": summary,
        "runs": runs,
        "wall_seconds": round(time.monotonic() - started_at, 1),
    }
    path = write_results(NAME + ("_agent" if args.agent else ""), doc)
    rows = [
        [
            name,
            s["rps"],
            s["p99_us"] / 1000,
            s["proxy_us_per_req"],
            s["proxy_cores_busy"],
            s["errors"],
        ]
        for name, s in summary.items()
    ]
    print(
        markdown_table(
            ["proxy", "requests/s", "p99 ms", "proxy CPU us/req", "proxy cores busy", "errors"],
            rows,
        )
    )
    print(
        f"requests/s, {n} workers over 1: {doc['headline'][f'rps_{n}_over_1']:.2f} (median of "
        f"the rounds: {', '.join(f'{r:.2f}' for r in by_round)})"
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
