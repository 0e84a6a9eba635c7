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
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
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


def measure(configs: dict[str, Any], args, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    seen = dict.fromkeys(configs, 0)
    for svc in configs.values():  # warm-up
        run_wrk(svc.url + "/", connections=args.connections, duration=2, workdir=workdir)
    time.sleep(1.5)
    for name, svc in configs.items():
        _, seen[name] = worker_share(svc.workdir / "flows.jsonl", 0)
    for rnd in range(args.rounds):
        order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
        for name in order:
            svc = configs[name]
            meters = [CpuMeter(pid) for pid in proxy_pids(svc.pid)]
            result = run_wrk(
                svc.url + "/",
                threads=args.threads,
                connections=args.connections,
                duration=args.duration,
                workdir=workdir,
            )
            run = result.as_dict()
            run["round"] = rnd
            run["proxy_cpu_s"] = sum(m.stop() for m in meters)
            run["proxy_us_per_req"] = us_per_request(run["proxy_cpu_s"], result.requests)
            run["proxy_cores_busy"] = run["proxy_cpu_s"] / (result.duration_us / 1e6)
            time.sleep(1.5)  # each worker writes its flow records on a 1 s timer
            run["flow_records_by_worker"], seen[name] = worker_share(
                svc.workdir / "flows.jsonl", seen[name]
            )
            runs[name].append(run)
            print(
                f"  round {rnd} {name:<10} {run['rps']:>9,.0f} req/s  p99 "
                f"{run['p99_us'] / 1000:6.2f} ms  proxy {run['proxy_us_per_req']:6.1f} us/req "
                f"({run['proxy_cores_busy']:.2f} cores)  by worker {run['flow_records_by_worker']}"
                f"  errors {result.status_errors + result.socket_errors}",
                flush=True,
            )
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = time.monotonic()
    n = args.workers
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        nginx = stack.enter_context(start_nginx(workdir))
        upstream = (nginx.host, nginx.port)
        configs = {
            f"{w} worker{'s' if w > 1 else ''}": stack.enter_context(
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
            for w in (1, n)
        }
        print(
            f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s x "
            f"{args.rounds} rounds ...",
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
    path = write_results(NAME, doc)
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
