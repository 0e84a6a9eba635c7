"""HTTP/2 (h2c) small requests and one bulk download:
h2load -> {direct, haproxy, l7proxy firewall} -> nghttpd.

    python -m bench.h2 [--requests N] [--bulk-mib M] [--profile]

Every configuration serves the same 64-byte file from the same nghttpd in the
same run. Reported: requests/s seen by h2load, and CPU microseconds per
request spent by the proxy process (haproxy with one thread, or l7proxy),
with ratios against direct and against haproxy. ``--profile`` runs the
l7proxy process under cProfile and prints where its time went.

The bulk part downloads one file of ``--bulk-mib`` MiB (1 GiB by default, a
sparse file) on one stream with h2load's default 1 GiB windows, three rounds
per configuration in turn, and reports the median rate and the proxy's CPU per
MiB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.h2_tools import (
    DOWNLOAD_COLUMNS,
    h2load,
    haproxy_h2c,
    l7proxy_firewall,
    measure,
    median_downloads,
    nghttpd,
    table,
    top_functions,
    write_results,
)

LABELS = {"app": "bench-h2"}
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-h2}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-h2}}}}
  ingress:
    - toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
            http:
              - {{method: GET, path: "/public/.*"}}
"""


def run(
    requests: int = 20000,
    clients: int = 4,
    streams: int = 16,
    profile: bool = False,
    bulk_mib: int = 1024,
    bulk_rounds: int = 3,
) -> dict:
    docroot = Path(tempfile.mkdtemp(prefix="bench-h2-"))
    (docroot / "public").mkdir()
    (docroot / "public" / "small.txt").write_bytes(b"x" * 64)
    with open(docroot / "public" / "big.bin", "wb") as big:
        big.truncate(bulk_mib << 20)
    bulk: list[dict] = []
    prof_path = docroot / "l7proxy.prof" if profile else None
    rows = []
    with nghttpd(docroot) as (server_port, server_pid):
        with (
            haproxy_h2c(server_port) as (ha_port, ha_pid),
            l7proxy_firewall(
                POLICY.format(port=server_port), server_port, LABELS, profile=prof_path
            ) as (fw_port, fw_pid),
        ):
            for name, port, proxy_pid in (
                ("direct", server_port, None),
                ("haproxy", ha_port, ha_pid),
                ("l7proxy", fw_port, fw_pid),
            ):
                url = f"http://127.0.0.1:{port}/public/small.txt"
                h2load(url, requests=1000, clients=clients, streams=streams)  # warm-up
                ((result, proxy_cpu),) = [
                    measure(
                        proxy_pid,
                        lambda url=url: h2load(
                            url, requests=requests, clients=clients, streams=streams
                        ),
                    )
                ]
                rows.append(
                    {
                        "config": name,
                        "req_per_s": result["req_per_s"],
                        "succeeded": result["succeeded"],
                        "failed": result["failed"],
                        "proxy_cpu_us_per_req": None
                        if proxy_cpu is None
                        else proxy_cpu * 1e6 / requests,
                    }
                )
            if bulk_mib:
                bulk = median_downloads(
                    [
                        ("direct", server_port, None),
                        ("haproxy", ha_port, ha_pid),
                        ("l7proxy", fw_port, fw_pid),
                    ],
                    bulk_mib,
                    bulk_rounds,
                    _bulk_download(bulk_mib),
                )
    by = {r["config"]: r for r in rows}
    for r in rows:
        r["vs_direct"] = r["req_per_s"] / by["direct"]["req_per_s"]
        r["vs_haproxy"] = r["req_per_s"] / by["haproxy"]["req_per_s"]
        cpu, ha_cpu = r["proxy_cpu_us_per_req"], by["haproxy"]["proxy_cpu_us_per_req"]
        r["cpu_vs_haproxy"] = None if cpu is None or not ha_cpu else cpu / ha_cpu
    payload = {
        "benchmark": "h2",
        "command": "python -m bench.h2",
        "workload": {
            "requests": requests,
            "h2load_clients": clients,
            "streams_per_client": streams,
            "body_bytes": 64,
        },
        "rows": rows,
        "bulk": {"mib": bulk_mib, "rounds": bulk_rounds, "rows": bulk},
    }
    if prof_path is not None and prof_path.exists():
        payload["profile_top"] = top_functions(prof_path)
    return payload


def _bulk_download(mib: int):
    """One download of the sparse file of ``mib`` MiB with h2load on one stream: MiB/s."""

    def download(name: str, port: int) -> float:
        start = time.monotonic()
        result = h2load(f"http://127.0.0.1:{port}/public/big.bin", requests=1, clients=1, streams=1)
        elapsed = time.monotonic() - start
        if result["failed"] or result["succeeded"] != 1:
            raise RuntimeError(f"bulk download through {name} failed: {result}")
        return mib / elapsed

    return download


COLUMNS = [
    ("config", "config", "{}"),
    ("req_per_s", "req/s", "{:.0f}"),
    ("vs_direct", "x direct", "{:.2f}"),
    ("vs_haproxy", "x haproxy", "{:.2f}"),
    ("proxy_cpu_us_per_req", "proxy CPU us/req", "{:.1f}"),
    ("cpu_vs_haproxy", "CPU x haproxy", "{:.1f}"),
    ("failed", "failed", "{}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.h2")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run l7proxy under cProfile and print the top functions",
    )
    parser.add_argument("--bulk-mib", type=int, default=1024, help="0: no bulk download")
    args = parser.parse_args(argv or [])
    payload = run(args.requests, profile=args.profile, bulk_mib=args.bulk_mib)
    path = write_results("h2", payload)
    print(table(payload["rows"], COLUMNS))
    if payload["bulk"]["rows"]:
        print(table(payload["bulk"]["rows"], DOWNLOAD_COLUMNS))
    if "profile_top" in payload:
        print(payload["profile_top"])
    print(f"written {path.relative_to(path.parents[2])}")
    return 0 if all(r["failed"] == 0 for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
