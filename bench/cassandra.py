"""CQL: cassandra-driver -> {direct, haproxy (TCP), L4-only proxy, l7proxy} -> the CQL server
test double.

    python -m bench.cassandra [--queries N] [--concurrency C]

The double (``tests/support/cql_server_double.py``) runs in its own process;
the load is the real cassandra-driver in this one, ``execute_concurrent`` with
C requests in flight on one connection. Workloads: a prepared SELECT
(EXECUTE), a simple SELECT (QUERY: the proxy lexes every statement) and a
BATCH of four prepared INSERTs, on protocol v4 and on v5 with LZ4 segments.
Reported per workload: requests/s through each path (a BATCH is one
request), CPU microseconds per request in the proxy process (haproxy, one
thread, TCP mode: the cost of a hop that parses nothing; ``l7proxy firewall``
with an L4-only policy, which passes bytes through: the proxy's I/O without
CQL parsing; ``l7proxy firewall`` with CQL rules), and the
throughput ratios, each the median of three runs. The direct path
is measured in the same run against a fresh double. The pure-Python double and
driver cap both paths, so the proxy's own cost is best read from its CPU per
request and from ``engine_us_per_request_and_response`` (the engine alone, fed
the driver-recorded fixtures).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from cassandra.cluster import Cluster
from cassandra.concurrent import execute_concurrent, execute_concurrent_with_args
from cassandra.policies import RoundRobinPolicy
from cassandra.query import BatchStatement

from bench.common import (
    CpuMeter,
    Service,
    free_port,
    markdown_table,
    ratio,
    started,
    us_per_request,
    wait_port,
    write_results,
)

LABELS = {"app": "bench-cql"}
POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-cql}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-cql}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        l7proto: cassandra
        l7:
        - query_action: select
          query_table: "system(_schema|_virtual_schema)?\\\\..*"
        - query_action: create-keyspace
        - query_action: create-table
        - query_action: select
          query_table: "bench\\\\.kv"
        - query_action: insert
          query_table: "bench\\\\.kv"
"""
L4_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-cql-l4}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-cql}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
"""
PROTOCOLS = [("v4", 4, False), ("v5-lz4", 5, "lz4")]


@contextmanager
def cql_double(workdir: Path):
    argv = [sys.executable, "-m", "tests.support.cql_server_double"]
    with started(argv, log=workdir / "double.log", ready_line=r"listening on") as (proc, line):
        host, _, port = line.rsplit(" ", 1)[-1].rpartition(":")
        yield Service("cql-double", proc, host, int(port), workdir)


@contextmanager
def l7proxy(upstream: Service, workdir: Path, policy_text: str = POLICY):
    policy = workdir / "policy.yaml"
    policy.write_text(policy_text.format(port=upstream.port))
    argv = [
        sys.executable,
        "-m",
        "l7proxy",
        "firewall",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"{upstream.host}:{upstream.port}",
        "--labels",
        ",".join(f"{k}={v}" for k, v in LABELS.items()),
        "--policy",
        str(policy),
    ]
    with started(argv, log=workdir / "l7proxy.log", ready_line=r"listening on") as (proc, line):
        host, _, port = line.rsplit(" ", 1)[-1].rpartition(":")
        yield Service("l7proxy", proc, host, int(port), workdir)


@contextmanager
def haproxy_tcp(upstream: Service, workdir: Path):
    """haproxy in TCP mode, one thread: the cost of a plain hop, no CQL parsing."""
    import shutil

    port = free_port()
    root = workdir / "haproxy"
    root.mkdir(exist_ok=True)
    conf = root / "haproxy.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend cql
    bind 127.0.0.1:{port}
    default_backend double
backend double
    server double {upstream.host}:{upstream.port}
""")
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    with started([exe, "-db", "-f", str(conf)], log=root / "stderr.log") as (proc, _):
        wait_port("127.0.0.1", port, proc=proc, log=root / "stderr.log")
        yield Service("haproxy", proc, "127.0.0.1", port, root)


def run_workloads(
    host: str,
    port: int,
    version: int,
    compression,
    queries: int,
    concurrency: int,
    proxy_pid: int | None,
    repeats: int = 3,
) -> dict[str, dict]:
    cluster = Cluster(
        [host],
        port=port,
        protocol_version=version,
        compression=compression,
        load_balancing_policy=RoundRobinPolicy(),
    )
    session = cluster.connect()
    try:
        session.execute(
            "CREATE KEYSPACE IF NOT EXISTS bench WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE IF NOT EXISTS bench.kv (k int PRIMARY KEY, v text)")
        insert = session.prepare("INSERT INTO bench.kv (k, v) VALUES (?, ?)")
        execute_concurrent_with_args(
            session, insert, [(i, f"value-{i}") for i in range(100)], concurrency=concurrency
        )
        select = session.prepare("SELECT v FROM bench.kv WHERE k = ?")

        def batch(i):
            b = BatchStatement()
            for j in range(4):
                b.add(insert, (i * 4 + j, "b"))
            return b

        batches = max(queries // 4, 1)
        workloads = {
            "prepared_select": [(select, (i % 100,)) for i in range(queries)],
            "simple_select": [
                (f"SELECT v FROM bench.kv WHERE k = {i % 100}", ()) for i in range(queries)
            ],
            "batch_of_4": [(batch(i), ()) for i in range(batches)],
        }
        results = {}
        for name, statements in workloads.items():
            execute_concurrent(session, statements[:200], concurrency=concurrency)  # warm-up
            runs = []
            for _ in range(repeats):
                cpu = CpuMeter(proxy_pid) if proxy_pid else None
                start = time.perf_counter()
                outcome = execute_concurrent(
                    session, statements, concurrency=concurrency, raise_on_first_error=True
                )
                elapsed = time.perf_counter() - start
                cpu_s = cpu.stop() if cpu else None
                runs.append(
                    (len(statements) / elapsed, cpu_s, sum(1 for success, _ in outcome if success))
                )
            runs.sort(key=lambda r: r[0])
            rate, cpu_s, ok = runs[len(runs) // 2]  # the median run
            results[name] = {
                "requests": len(statements),
                "succeeded": ok,
                "requests_per_s": round(rate, 1),
                "proxy_cpu_us_per_request": round(us_per_request(cpu_s, len(statements)), 1)
                if cpu_s is not None
                else None,
            }
        return results
    finally:
        cluster.shutdown()


def engine_cost(rounds: int = 20) -> dict[str, float]:
    """CqlEngine alone, fed the driver-recorded session of each fixture scenario:
    CPU microseconds per judged request (with its response), allow-all policy.
    Stable where the end-to-end rates are not: on a 2-core machine the driver
    and the double share the CPUs with the proxy."""
    import base64
    import json

    from parsers.base import Access, allow_all
    from parsers.cql.engine import CqlEngine

    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cql"
    out = {}
    for scenario in ("v4", "v4-lz4", "v5", "v5-lz4"):
        record = json.loads((fixtures / f"{scenario}.json").read_text())
        conns = [[(t, base64.b64decode(d)) for t, d in c] for c in record["connections"]]
        judged = 0
        start = time.process_time()
        for _ in range(rounds):
            for conn in conns:
                engine = CqlEngine(allow_all)
                for tag, data in conn:
                    cmds = engine.client_data(data) if tag == "c" else engine.server_data(data)
                    judged += sum(1 for c in cmds if isinstance(c, Access))
        out[scenario] = round((time.process_time() - start) * 1e6 / judged, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(
        argv if argv is not None else sys.argv[1:] if __name__ == "__main__" else []
    )
    logging.getLogger("cassandra").setLevel(logging.ERROR)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cql-") as tmp:
        workdir = Path(tmp)
        for label, version, compression in PROTOCOLS:
            # a fresh double for each path, so all see the same table sizes
            with cql_double(workdir) as double:
                direct = run_workloads(
                    double.host,
                    double.port,
                    version,
                    compression,
                    args.queries,
                    args.concurrency,
                    None,
                )
            with cql_double(workdir) as double, haproxy_tcp(double, workdir) as hap:
                haproxy = run_workloads(
                    hap.host,
                    hap.port,
                    version,
                    compression,
                    args.queries,
                    args.concurrency,
                    hap.pid,
                )
            with cql_double(workdir) as double, l7proxy(double, workdir, L4_POLICY) as fw:
                l4 = run_workloads(
                    fw.host, fw.port, version, compression, args.queries, args.concurrency, fw.pid
                )
            with cql_double(workdir) as double, l7proxy(double, workdir) as fw:
                proxied = run_workloads(
                    fw.host, fw.port, version, compression, args.queries, args.concurrency, fw.pid
                )
            for workload in direct:
                d, h, p, p4 = direct[workload], haproxy[workload], proxied[workload], l4[workload]
                rows.append(
                    {
                        "protocol": label,
                        "workload": workload,
                        "direct_requests_per_s": d["requests_per_s"],
                        "haproxy_tcp_requests_per_s": h["requests_per_s"],
                        "l4proxy_requests_per_s": p4["requests_per_s"],
                        "l7proxy_requests_per_s": p["requests_per_s"],
                        "l7proxy_vs_direct": round(
                            ratio(p["requests_per_s"], d["requests_per_s"]), 3
                        ),
                        "l7proxy_vs_haproxy": round(
                            ratio(p["requests_per_s"], h["requests_per_s"]), 3
                        ),
                        "haproxy_cpu_us_per_request": h["proxy_cpu_us_per_request"],
                        "l4proxy_cpu_us_per_request": p4["proxy_cpu_us_per_request"],
                        "l7proxy_cpu_us_per_request": p["proxy_cpu_us_per_request"],
                        "l7proxy_cpu_vs_haproxy": round(
                            ratio(
                                p["proxy_cpu_us_per_request"] or 0,
                                h["proxy_cpu_us_per_request"] or 0,
                            ),
                            2,
                        ),
                        "succeeded": [
                            d["succeeded"],
                            h["succeeded"],
                            p4["succeeded"],
                            p["succeeded"],
                        ],
                        "requests": d["requests"],
                    }
                )
    engine = engine_cost()
    headers = [
        "protocol",
        "workload",
        "direct req/s",
        "haproxy req/s",
        "L4 proxy req/s",
        "l7proxy req/s",
        "vs direct",
        "vs haproxy",
        "haproxy CPU us/req",
        "L4 proxy CPU us/req",
        "l7proxy CPU us/req",
    ]
    print(
        markdown_table(
            headers,
            [
                [
                    r["protocol"],
                    r["workload"],
                    r["direct_requests_per_s"],
                    r["haproxy_tcp_requests_per_s"],
                    r["l4proxy_requests_per_s"],
                    r["l7proxy_requests_per_s"],
                    r["l7proxy_vs_direct"],
                    r["l7proxy_vs_haproxy"],
                    r["haproxy_cpu_us_per_request"],
                    r["l4proxy_cpu_us_per_request"],
                    r["l7proxy_cpu_us_per_request"],
                ]
                for r in rows
            ],
        )
    )
    print(
        markdown_table(
            ["engine only (in process)", "us per request+response"],
            [[k, v] for k, v in engine.items()],
        )
    )
    path = write_results(
        "cassandra",
        {
            "command": "python -m bench.cassandra",
            "workload": {
                "queries": args.queries,
                "concurrency": args.concurrency,
                "client": "cassandra-driver execute_concurrent, one connection",
                "server": "CQL server test double (tests/support/cql_server_double.py), "
                "own process",
            },
            "rows": rows,
            "engine_us_per_request_and_response": engine,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
