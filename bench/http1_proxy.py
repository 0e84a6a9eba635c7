"""HTTP/1.1 through l7proxy's API firewall, against haproxy and a direct connection.

    python -m bench http1_proxy [--duration 10] [--rounds 2] [--connections 32]

One run starts nginx (the upstream, never the bottleneck), l7proxy in
firewall mode with an L7 rule in force (GET /.* allowed, so POST is denied),
the same l7proxy with a flow-log file, and haproxy (one thread) with the
equivalent ACL. Then, all in this run:

- correctness: GET answered 200 through each path; POST answered 403 by both
  proxies, and l7proxy keeps the connection usable after its 403;
- load: wrk keep-alive GETs on each path, interleaved, ``--rounds`` times;
  requests/s, p50/p99 latency and the CPU microseconds per request of each
  process (proxy, nginx, wrk). On a 2-core machine wrk caps requests/s, so
  the comparison that means something is proxy CPU per request, reported as
  the ratio l7proxy / haproxy;
- download: a 1 GiB (sparse) file through each path with curl;
- profile: l7proxy under the same load inside cProfile (``python -m cProfile
  -m l7proxy firewall``), and the sans-I/O engine + driver driven in-process,
  to say where the time goes.

Results go to ``bench/results/http1_proxy.json``; tables are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import http.client
import io
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    REPO,
    CpuMeter,
    markdown_table,
    median,
    ratio,
    run_wrk,
    start_firewall,
    start_haproxy,
    start_nginx,
    tool_version,
    us_per_request,
    write_results,
)
from l7proxy.observe.flowlog import retained_files

NAME = "http1_proxy"
LABELS = {"app": "bench"}
BIG_FILE_BYTES = 1 << 30
HAPROXY_RULES = "http-request deny unless { method GET } { path_reg ^/.* }"
NGINX_LOCATIONS = "location = /big { root {root}; }"  # serves <workdir>/big


def policy_yaml(upstream_port: int) -> str:
    # Firewall mode judges traffic to the upstream's port: the policy names it.
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
    - ports: [{{port: "{upstream_port}", protocol: TCP}}]
      rules:
        http:
        - method: GET
          path: "/.*"
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.http1_proxy", description=__doc__.split("\n\n")[0]
    )
    argv = [] if argv is None else argv  # called by the runner: defaults
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved wrk runs per path (medians reported)"
    )
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--download-repeats", type=int, default=3)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--profile-duration", type=float, default=6.0)
    p.add_argument(
        "--engine-requests",
        type=int,
        default=30000,
        help="requests for the in-process engine profile",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------- correctness


def exchange(
    host: str, port: int, steps: list[tuple[str, str, bytes | None]]
) -> list[tuple[int, bytes]]:
    """Send requests one after another on ONE connection; (status, body) for each."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        out = []
        for method, path, body in steps:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            out.append((resp.status, resp.read()))
        return out
    finally:
        conn.close()


def check_correctness(paths: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for name, svc in paths.items():
        got = {"GET /": exchange(svc.host, svc.port, [("GET", "/", None)])[0][0]}
        if name != "direct":
            # The denial, then the same connection must still carry an allowed request.
            (post_status, post_body), (after_status, _) = exchange(
                svc.host, svc.port, [("POST", "/", b"x"), ("GET", "/", None)]
            )
            got["POST /"] = post_status
            got["POST / body"] = post_body.decode("latin-1").strip()[:60]
            got["GET / after 403, same connection"] = after_status
        ok = got["GET /"] == 200 and (
            name == "direct"
            or (got["POST /"] == 403 and got["GET / after 403, same connection"] == 200)
        )
        got["ok"] = ok
        checks[name] = got
    return checks


def raw_response(host: str, port: int, request: bytes) -> bytes:
    """The exact bytes the upstream answers to ``request`` (for the in-process profile)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"ok"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


# ---------------------------------------------------------------- load


# Every request a different target (/?n=1, /?n=2, ...): nothing repeats, so
# this measures the full parse path rather than the keep-alive repeat memo.
VARIED_LUA = """
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/?n=" .. counter)
end
"""
# What real clients send (issue 15): every head differs in its path, its query and
# one header, as a REST client with an id in the path and a request id does.
REALISTIC_LUA = """
local counter = 0
request = function()
  counter = counter + 1
  local id = string.format("%04x-%d", counter * 40503 % 65536, counter)
  return wrk.format("GET", "/public/item/" .. counter .. "?q=" .. (counter * 7919 % 100000),
                    {["X-Request-Id"] = id})
end
"""


def varied_request(i: int, host: bytes) -> bytes:
    """Request ``i`` of VARIED_LUA, for the benches that send it themselves."""
    return b"GET /?n=%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, host)


def realistic_request(i: int, host: bytes) -> bytes:
    """Request ``i`` of REALISTIC_LUA (wrk writes Host first, then the script's field)."""
    return b"GET /public/item/%d?q=%d HTTP/1.1\r\nHost: %s\r\nX-Request-Id: %04x-%d\r\n\r\n" % (
        i,
        i * 7919 % 100000,
        host,
        i * 40503 % 65536,
        i,
    )


# The workloads whose heads never repeat: (key in the results, title, wrk script).
UNREPEATED = (
    ("varied", "every request a different query", VARIED_LUA),
    ("realistic", "path, query and X-Request-Id differ on every request", REALISTIC_LUA),
)


def measure_load(
    paths: dict[str, Any], nginx, args, workdir: Path, *, lua: str = ""
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for svc in paths.values():  # warm-up: connections, caches, the interpreter
        run_wrk(
            svc.url + "/",
            threads=args.threads,
            connections=args.connections,
            duration=2,
            workdir=workdir,
            extra_lua=lua,
        )
    for rnd in range(args.rounds):
        order = (
            list(paths) if rnd % 2 == 0 else list(reversed(paths))
        )  # spread drift over all paths
        for name in order:
            svc = paths[name]
            proxy_cpu = CpuMeter(svc.pid) if svc is not nginx else None
            nginx_cpu = CpuMeter(nginx.pid)
            result = run_wrk(
                svc.url + "/",
                threads=args.threads,
                connections=args.connections,
                duration=args.duration,
                workdir=workdir,
                extra_lua=lua,
            )
            run = result.as_dict()
            run["round"] = rnd
            run["nginx_cpu_s"] = nginx_cpu.stop()
            run["nginx_us_per_req"] = us_per_request(run["nginx_cpu_s"], result.requests)
            run["wrk_us_per_req"] = us_per_request(result.wrk_cpu_s, result.requests)
            if proxy_cpu is not None:
                run["proxy_cpu_s"] = proxy_cpu.stop()
                run["proxy_us_per_req"] = us_per_request(run["proxy_cpu_s"], result.requests)
                run["proxy_user_us_per_req"] = us_per_request(proxy_cpu.user, result.requests)
                run["proxy_sys_us_per_req"] = us_per_request(proxy_cpu.system, result.requests)
            flows = svc.workdir / "flows.jsonl"
            if flows.exists():
                time.sleep(1.5)  # the flow log is flushed on a 1 s timer
                # Every retained file: the log is rotated by size (100 MiB by default).
                run["flow_records_total"] = sum(
                    sum(1 for _ in open(f, "rb")) for f in retained_files(flows)
                )
            runs[name].append(run)
            print(
                f"  round {rnd} {name:<16} {run['rps']:>9,.0f} req/s  p50 "
                f"{run['p50_us'] / 1000:6.2f} ms  "
                f"p99 {run['p99_us'] / 1000:6.2f} ms  proxy "
                f"{run.get('proxy_us_per_req', float('nan')):6.1f} us/req  "
                f"errors {result.status_errors + result.socket_errors}",
                flush=True,
            )
    return runs


def summarise_load(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rs in runs.items():
        s = {
            "rps": median([r["rps"] for r in rs]),
            "p50_ms": median([r["p50_us"] for r in rs]) / 1000,
            "p99_ms": median([r["p99_us"] for r in rs]) / 1000,
            "nginx_us_per_req": median([r["nginx_us_per_req"] for r in rs]),
            "wrk_us_per_req": median([r["wrk_us_per_req"] for r in rs]),
            "requests": sum(r["requests"] for r in rs),
            "non_2xx": sum(r["status_errors"] for r in rs),
            "socket_errors": sum(
                r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
                for r in rs
            ),
        }
        if "proxy_us_per_req" in rs[0]:
            for key in ("proxy_us_per_req", "proxy_user_us_per_req", "proxy_sys_us_per_req"):
                s[key] = median([r[key] for r in rs])
        out[name] = s
    return out


# ---------------------------------------------------------------- download


def measure_download(paths: dict[str, Any], nginx, repeats: int) -> dict[str, dict[str, Any]]:
    """Each path ``repeats`` times, interleaved; the median run (by time) is reported."""
    tries: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, svc in paths.items():
            tries[name].append(download_once(svc, nginx))
    out = {}
    for name, rows in tries.items():
        rows.sort(key=lambda r: r["seconds"])
        row = dict(rows[len(rows) // 2])
        row["gbit_s_all"] = [round(r["gbit_s"], 2) for r in rows]
        row["status"] = (
            max(r["status"] for r in rows)
            if all(r["status"] == 200 for r in rows)
            else min(r["status"] for r in rows)
        )
        row["complete"] = all(r["complete"] for r in rows)
        out[name] = row
        print(
            f"  download {name:<10} {row['gbit_s']:6.2f} Gbit/s  {row['seconds']:6.2f} s  proxy "
            f"CPU {row.get('proxy_cpu_s', float('nan')):.2f} s",
            flush=True,
        )
    return out


def download_once(svc, nginx) -> dict[str, Any]:
    proxy_cpu = CpuMeter(svc.pid) if svc is not nginx else None
    nginx_cpu = CpuMeter(nginx.pid)
    done = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "300",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            svc.url + "/big",
        ],
        capture_output=True,
        text=True,
        timeout=320,
    )
    status, size, seconds = done.stdout.split()
    row = {
        "status": int(status),
        "bytes": int(float(size)),
        "seconds": float(seconds),
        "gbit_s": int(float(size)) * 8 / float(seconds) / 1e9,
        "complete": int(float(size)) == BIG_FILE_BYTES,
        "nginx_cpu_s": nginx_cpu.stop(),
    }
    if proxy_cpu is not None:
        row["proxy_cpu_s"] = proxy_cpu.stop()
        row["proxy_user_s"], row["proxy_sys_s"] = proxy_cpu.user, proxy_cpu.system
    return row


# ---------------------------------------------------------------- profiles


def profile_firewall(nginx, args, workdir: Path) -> dict[str, Any]:
    """The real firewall process under wrk load, profiled (cProfile) during the load only."""
    prof_file = workdir / "firewall.prof"
    launcher = ["-m", "bench._profile_firewall", str(prof_file)]
    with start_firewall(
        policy_yaml(nginx.port),
        (nginx.host, nginx.port),
        LABELS,
        workdir,
        launcher=launcher,
        name="l7proxy-cprofile",
    ) as fw:
        run_wrk(
            fw.url + "/",
            threads=args.threads,
            connections=args.connections,
            duration=1,
            workdir=workdir,
        )  # warm
        os.kill(fw.pid, signal.SIGUSR1)
        result = run_wrk(
            fw.url + "/",
            threads=args.threads,
            connections=args.connections,
            duration=args.profile_duration,
            workdir=workdir,
        )
        os.kill(fw.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not prof_file.exists() and time.monotonic() < deadline and fw.proc.poll() is None:
            time.sleep(0.1)
    if not prof_file.exists():
        return {"error": "the profiled firewall wrote no profile"}
    stats = pstats.Stats(str(prof_file))
    return {
        "requests": result.requests,
        "rps_under_profiler": round(result.rps, 1),
        "note": (
            "cProfile inflates Python-heavy code several times; read shares, not absolute times"
        ),
        **top_functions(stats, result.requests),
    }


class Sink:
    """Stands in for an asyncio transport in process: takes writes and drops them."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def set_write_buffer_limits(self, *a) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def profile_engine(
    upstream: tuple[str, int], request: bytes, response: bytes, n: int, workdir: Path
) -> dict[str, Any]:
    """The sans-I/O engine and the driver's command loop, no sockets: the Python floor
    per request."""
    from l7proxy.observe.flowlog import FlowLog
    from l7proxy.proxy.driver import Pipe, ProxyLimits, ProxyStats
    from l7proxy.proxy.firewall import Firewall
    from parsers.registry import engine_factory

    policy_file = workdir / "engine-policy.yaml"
    policy_file.write_text(policy_yaml(upstream[1]))
    fw = Firewall(
        listen=(LOOPBACK, 0),
        upstream=upstream,
        labels=LABELS,
        policy_paths=[policy_file],
        flowlog=FlowLog(),
    )
    state = fw.state
    conn_policy = state.connection(
        state.side(LOOPBACK, 40000), state.side(upstream[0], upstream[1], fw.service)
    )
    factory = engine_factory(conn_policy.parser)
    loop = asyncio.new_event_loop()
    try:

        def engine_only() -> None:
            engine = factory(conn_policy.decide)
            for _ in range(n):
                engine.client_data(request)
                engine.server_data(response)

        # The unrepeated workloads' requests, built before timing.
        host = request.split(b"Host: ", 1)[1].split(b"\r\n", 1)[0]
        varied = [varied_request(i, host) for i in range(n)]

        def engine_varied() -> None:
            engine = factory(conn_policy.decide)
            for each in varied:
                engine.client_data(each)
                engine.server_data(response)

        realistic = [realistic_request(i, host) for i in range(n)]

        def engine_realistic() -> None:
            engine = factory(conn_policy.decide)
            for each in realistic:
                engine.client_data(each)
                engine.server_data(response)

        def engine_and_driver() -> None:
            pipe = Pipe(
                loop,
                factory(conn_policy.decide),
                FlowLog(),
                conn_policy.parser,
                ProxyLimits(),
                ProxyStats(),
                client=Sink(),
            )
            pipe.server_connected(Sink())
            for _ in range(n):
                pipe.client_data(request)
                pipe.server_data(response)

        timings = {}
        for label, fn in (
            ("engine", engine_only),
            ("engine_varied", engine_varied),
            ("engine_realistic", engine_realistic),
            ("engine_and_driver", engine_and_driver),
        ):
            fn()  # warm
            t0 = time.process_time()
            fn()
            timings[f"{label}_us_per_req"] = (time.process_time() - t0) * 1e6 / n
        prof = cProfile.Profile()
        prof.enable()
        engine_and_driver()
        prof.disable()
        stats = pstats.Stats(prof)
    finally:
        loop.close()
    return {
        "requests": n,
        "request_bytes": len(request),
        "response_bytes": len(response),
        **timings,
        **top_functions(stats, n),
    }


def top_functions(stats: pstats.Stats, requests: int, limit: int = 20) -> dict[str, Any]:
    """Top functions by own time, and own time grouped by source file."""
    rows = []
    by_file: dict[str, float] = {}
    total = 0.0
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        total += tottime
        short = _short(filename)
        by_file[short] = by_file.get(short, 0.0) + tottime
        rows.append((tottime, cumtime, ncalls, f"{short}:{line}({func})"))
    rows.sort(reverse=True)
    top = [
        {
            "function": where,
            "calls_per_req": round(ncalls / requests, 2),
            "own_share": round(tt / total, 4),
            "own_us_per_req": round(tt * 1e6 / requests, 2),
            "cum_us_per_req": round(ct * 1e6 / requests, 2),
        }
        for tt, ct, ncalls, where in rows[:limit]
    ]
    files = sorted(by_file.items(), key=lambda kv: -kv[1])[:limit]
    return {
        "profiled_us_per_req": round(total * 1e6 / requests, 2),
        "top_functions": top,
        "by_file": [
            {
                "file": f,
                "own_share": round(t / total, 4),
                "own_us_per_req": round(t * 1e6 / requests, 2),
            }
            for f, t in files
        ],
    }


def _short(filename: str) -> str:
    if filename.startswith(str(REPO)):
        return filename[len(str(REPO)) + 1 :]
    if filename == "~":
        return "(builtins)"
    for marker in ("site-packages/", "python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-http1-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        big = workdir / "big"
        subprocess.run(["truncate", "-s", str(BIG_FILE_BYTES), str(big)], check=True)
        big.chmod(0o644)
        nginx = stack.enter_context(start_nginx(workdir, locations=NGINX_LOCATIONS))
        upstream = (nginx.host, nginx.port)
        l7 = stack.enter_context(start_firewall(policy_yaml(nginx.port), upstream, LABELS, workdir))
        l7_log = stack.enter_context(
            start_firewall(
                policy_yaml(nginx.port),
                upstream,
                LABELS,
                workdir,
                flowlog=True,
                name="l7proxy-flowlog",
            )
        )
        haproxy = stack.enter_context(
            start_haproxy(workdir, upstream, frontend_rules=HAPROXY_RULES)
        )
        load_paths = {"direct": nginx, "l7proxy": l7, "l7proxy+flowlog": l7_log, "haproxy": haproxy}

        print("correctness ...", flush=True)
        checks = check_correctness(load_paths)
        print(
            f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s x "
            f"{args.rounds} rounds ...",
            flush=True,
        )
        runs = measure_load(load_paths, nginx, args, workdir)
        varied_paths = {"direct": nginx, "l7proxy": l7, "haproxy": haproxy}
        unrepeated_runs = {}
        for key, title, lua in UNREPEATED:
            print(f"load, {title} ...", flush=True)
            unrepeated_runs[key] = measure_load(varied_paths, nginx, args, workdir, lua=lua)
        download = {}
        if args.download:
            print("download: 1 GiB with curl ...", flush=True)
            download = measure_download(
                {"direct": nginx, "l7proxy": l7, "haproxy": haproxy}, nginx, args.download_repeats
            )
        request = f"GET / HTTP/1.1\r\nHost: {nginx.host}:{nginx.port}\r\n\r\n".encode()
        response = raw_response(nginx.host, nginx.port, request)
        profiles: dict[str, Any] = {}
        if args.profile:
            print("profile: engine + driver in-process ...", flush=True)
            profiles["engine_in_process"] = profile_engine(
                upstream, request, response, args.engine_requests, workdir
            )
            print("profile: firewall under wrk inside cProfile ...", flush=True)
            profiles["firewall_cprofile"] = profile_firewall(nginx, args, workdir)

    load = summarise_load(runs)
    unrepeated = {key: summarise_load(runs_) for key, runs_ in unrepeated_runs.items()}
    l7_us, ha_us = load["l7proxy"]["proxy_us_per_req"], load["haproxy"]["proxy_us_per_req"]

    def by_round(runs: dict[str, list[dict[str, Any]]]) -> list[float]:
        """l7proxy / haproxy per round: each pair measured minutes apart, not the
        medians of rounds the machine's load may have moved apart."""
        return [
            ratio(a["proxy_us_per_req"], b["proxy_us_per_req"])
            for a, b in zip(runs["l7proxy"], runs["haproxy"], strict=True)
        ]

    per_round = by_round(runs)
    headline = {
        "l7proxy_over_haproxy_cpu_per_req": ratio(l7_us, ha_us),
        "l7proxy_over_haproxy_cpu_per_req_by_round": per_round,
        "l7proxy_flowlog_over_haproxy_cpu_per_req": ratio(
            load["l7proxy+flowlog"]["proxy_us_per_req"], ha_us
        ),
        "l7proxy_over_haproxy_rps": ratio(load["l7proxy"]["rps"], load["haproxy"]["rps"]),
        **{
            f"{key}_l7proxy_over_haproxy_cpu_per_req": ratio(
                u["l7proxy"]["proxy_us_per_req"], u["haproxy"]["proxy_us_per_req"]
            )
            for key, u in unrepeated.items()
        },
        **{
            f"{key}_l7proxy_over_haproxy_cpu_per_req_by_round": by_round(runs_)
            for key, runs_ in unrepeated_runs.items()
        },
        "target_ratio_issue": 3.0,
        "target_ratio_goal": 1.5,
    }
    if download:
        headline["download_l7proxy_over_haproxy_cpu_s"] = ratio(
            download["l7proxy"]["proxy_cpu_s"], download["haproxy"]["proxy_cpu_s"]
        )
    problems = [f"{name}: correctness {c}" for name, c in checks.items() if not c["ok"]]
    problems += [
        f"{name}: {s['non_2xx']} non-2xx, {s['socket_errors']} socket errors under load"
        for name, s in load.items()
        if s["non_2xx"] or s["socket_errors"]
    ]
    problems += [
        f"{name} ({key}): {s['non_2xx']} non-2xx, {s['socket_errors']} socket errors"
        for key, u in unrepeated.items()
        for name, s in u.items()
        if s["non_2xx"] or s["socket_errors"]
    ]
    problems += [
        f"download via {name}: status {d['status']}, {d['bytes']} bytes"
        for name, d in download.items()
        if d["status"] != 200 or not d["complete"]
    ]
    flowlog_runs = runs["l7proxy+flowlog"]
    if flowlog_runs and flowlog_runs[-1].get("flow_records_total", 0) < sum(
        r["requests"] for r in flowlog_runs
    ):
        problems.append("flow log has fewer records than requests served")

    doc = {
        "settings": {
            "wrk": (
                f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
                "(keep-alive GET /, 2-byte body)"
            ),
            "rounds": args.rounds,
            "download": "curl -o /dev/null of a 1 GiB sparse file served by nginx (sendfile)",
            "l7proxy": (
                "python -m l7proxy firewall, L7 rule GET /.* in force (uvloop, C head parser)"
            ),
            "haproxy": f"nbthread 1, mode http, {HAPROXY_RULES}",
            "nginx": 'master_process off, 1 worker, return 200 "ok"',
        },
        "versions": {
            "nginx": tool_version(["nginx", "-v"]),
            "haproxy": tool_version(["haproxy", "-v"]),
            "wrk": tool_version(["wrk", "--version"]),
            "curl": tool_version(["curl", "--version"]),
            "http1_parser": _http1_impl(),
        },
        "headline": headline,
        "correctness": checks,
        "load": load,
        "load_runs": runs,
        **{f"load_{key}": u for key, u in unrepeated.items()},
        **{f"load_{key}_runs": runs_ for key, runs_ in unrepeated_runs.items()},
        "download": download,
        "profiles": profiles,
        "problems": problems,
        "wall_seconds": round(time.monotonic() - started_at, 1),
    }
    path = write_results(NAME, doc)
    print()
    print(report(doc))
    print(f"\nwritten: {path.relative_to(REPO)}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def _http1_impl() -> str:
    from parsers.http1.engine import ACTIVE_IMPLEMENTATION

    return ACTIVE_IMPLEMENTATION


def report(doc: dict[str, Any]) -> str:
    """The markdown tables of docs/benchmarks.md, from a results document."""
    load = doc["load"]
    rows = []
    for name, s in load.items():
        nan = float("nan")
        rows.append(
            [
                name,
                s["rps"],
                s["p50_ms"],
                s["p99_ms"],
                s.get("proxy_us_per_req", nan),
                s.get("proxy_user_us_per_req", nan),
                s.get("proxy_sys_us_per_req", nan),
                s["nginx_us_per_req"],
                s["wrk_us_per_req"],
                s["non_2xx"],
            ]
        )
    out = io.StringIO()
    out.write(
        markdown_table(
            [
                "path",
                "req/s",
                "p50 ms",
                "p99 ms",
                "proxy CPU us/req",
                "(user)",
                "(sys)",
                "nginx CPU us/req",
                "wrk CPU us/req",
                "non-2xx",
            ],
            rows,
        )
    )
    h = doc["headline"]
    by_round = ", ".join(f"{r:.2f}" for r in h["l7proxy_over_haproxy_cpu_per_req_by_round"])
    out.write(
        f"\n\nl7proxy / haproxy CPU per request: **{h['l7proxy_over_haproxy_cpu_per_req']:.2f}x** "
        f"(rounds: {by_round}; "
        f"with flow-log file {h['l7proxy_flowlog_over_haproxy_cpu_per_req']:.2f}x; issue target "
        "<= 3x, goal 1.5x)\n"
    )
    for key, title, _lua in UNREPEATED:
        if not doc.get(f"load_{key}"):
            continue
        nan = float("nan")
        rows = [
            [
                name,
                s["rps"],
                s["p50_ms"],
                s["p99_ms"],
                s.get("proxy_us_per_req", nan),
                s.get("proxy_user_us_per_req", nan),
                s.get("proxy_sys_us_per_req", nan),
                s["non_2xx"],
            ]
            for name, s in doc[f"load_{key}"].items()
        ]
        out.write(f"\nHeads never repeat, {title}:\n\n")
        out.write(
            markdown_table(
                [
                    "path",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "proxy CPU us/req",
                    "(user)",
                    "(sys)",
                    "non-2xx",
                ],
                rows,
            )
        )
        rounds = ", ".join(
            f"{r:.2f}" for r in h.get(f"{key}_l7proxy_over_haproxy_cpu_per_req_by_round", [])
        )
        out.write(
            f"\n\nl7proxy / haproxy CPU per request, {title}: "
            f"**{h[f'{key}_l7proxy_over_haproxy_cpu_per_req']:.2f}x** (rounds: {rounds})\n"
        )
    if doc["download"]:
        nan = float("nan")
        rows = [
            [
                name,
                d["gbit_s"],
                d["seconds"],
                d.get("proxy_cpu_s", nan),
                d.get("proxy_user_s", nan),
                d.get("proxy_sys_s", nan),
                d["nginx_cpu_s"],
                d["status"],
            ]
            for name, d in doc["download"].items()
        ]
        out.write(
            "\n"
            + markdown_table(
                [
                    "1 GiB download",
                    "Gbit/s",
                    "seconds",
                    "proxy CPU s",
                    "(user)",
                    "(sys)",
                    "nginx CPU s",
                    "status",
                ],
                rows,
            )
            + "\n"
        )
    checks = doc["correctness"]
    rows = [
        [
            name,
            c.get("GET /"),
            c.get("POST /", "-"),
            c.get("GET / after 403, same connection", "-"),
            "yes" if c["ok"] else "NO",
        ]
        for name, c in checks.items()
    ]
    out.write(
        "\n"
        + markdown_table(
            ["correctness", "GET /", "POST /", "GET after 403 (same conn)", "ok"], rows
        )
        + "\n"
    )
    for key, title in (
        ("engine_in_process", "engine + driver in-process"),
        ("firewall_cprofile", "firewall under wrk, cProfile"),
    ):
        prof = doc["profiles"].get(key)
        if not prof or "top_functions" not in prof:
            continue
        extra = ""
        if key == "engine_in_process":
            extra = (
                f" (engine alone {prof['engine_us_per_req']:.1f} us/req, "
                f"{prof.get('engine_varied_us_per_req', float('nan')):.1f} us/req with varied "
                f"targets, {prof.get('engine_realistic_us_per_req', float('nan')):.1f} with "
                "realistic heads; engine + driver "
                f"{prof['engine_and_driver_us_per_req']:.1f} us/req; unprofiled)"
            )
        out.write(f"\nProfile, {title}{extra}: top functions by own time\n\n")
        rows = [
            [f["function"], f["calls_per_req"], f"{f['own_share'] * 100:.1f}%", f["own_us_per_req"]]
            for f in prof["top_functions"][:15]
        ]
        out.write(
            markdown_table(["function", "calls/req", "own share", "own us/req (profiled)"], rows)
            + "\n"
        )
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
