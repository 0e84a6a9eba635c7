"""Shared pieces of the HTTP/2 and gRPC benchmarks (no ``main``: not a benchmark).

Processes are started on loopback with temporary files and always killed on
exit. CPU time of a process comes from /proc/PID/stat (utime + stime), so a
figure is "CPU microseconds the proxy spent per request", independent of how
busy the rest of the machine was.
"""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.common import REPO, RESULTS, cpu_seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def nghttpd(docroot: Path):
    port = free_port()
    proc = subprocess.Popen(
        ["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", str(docroot), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, proc.pid
    finally:
        _stop(proc)


HAPROXY_CONFIG = """
global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend h2c_in
    bind 127.0.0.1:{listen} proto h2
    default_backend h2c_out
backend h2c_out
    server upstream 127.0.0.1:{upstream} proto h2
"""


@contextmanager
def haproxy_h2c(upstream: int):
    """haproxy with one thread, h2c in and out (the same shape as l7proxy's HTTP/2 path)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-haproxy-"))
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(listen=port, upstream=upstream))
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield port, proc.pid
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def l7proxy_firewall(
    policy: str, upstream: int, labels: dict[str, str], *, profile: Path | None = None
):
    """``l7proxy firewall`` as users run it (optionally under cProfile); yields (port, pid)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-l7proxy-"))
    (workdir / "policy.yaml").write_text(policy)
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += [
        "-m",
        "l7proxy",
        "firewall",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{upstream}",
        "--labels",
        ",".join(f"{k}={v}" for k, v in labels.items()),
        "--policy",
        str(workdir / "policy.yaml"),
        "--flowlog",
        str(workdir / "flows.jsonl"),
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("l7proxy firewall exited before listening")
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                line = proc.stdout.readline()
                if "listening on" in line:
                    port = int(line.strip().rsplit(":", 1)[1])
        if port is None:
            raise RuntimeError("l7proxy firewall did not start")
        yield port, proc.pid
    finally:
        _stop(proc)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


H2LOAD_RE = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
DONE_RE = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) "
    r"errored"
)


def h2load(url: str, *, requests: int, clients: int, streams: int, extra: list[str] = ()) -> dict:
    run = subprocess.run(
        [
            "h2load",
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            "1",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    speed = H2LOAD_RE.search(run.stdout)
    done = DONE_RE.search(run.stdout)
    if not speed or not done:
        raise RuntimeError(f"h2load output not understood:\n{run.stdout}\n{run.stderr}")
    return {
        "req_per_s": float(speed[3]),
        "succeeded": int(done[4]),
        "failed": int(done[5]) + int(done[6]),
    }


def measure(pid: int | None, run) -> tuple[dict, float | None]:
    """Run ``run()`` and return its result plus the CPU seconds ``pid`` spent meanwhile."""
    before = cpu_seconds(pid) if pid else None
    result = run()
    spent = cpu_seconds(pid) - before if pid else None
    return result, spent


def median_downloads(
    paths: list[tuple[str, int, int | None]], mib: int, rounds: int, download
) -> list[dict]:
    """``download(name, port)`` (one ``mib`` MiB download, returning MiB/s) through each
    path (name, port, proxy pid) in turn, ``rounds`` times: the median rate, every
    round's, the proxy's median CPU per MiB, and the rate against the first path's."""
    seen: dict[str, list[tuple[float, float | None]]] = {name: [] for name, _, _ in paths}
    for _ in range(rounds):
        for name, port, pid in paths:
            rate, cpu = measure(pid, lambda name=name, port=port: download(name, port))
            seen[name].append((rate, None if cpu is None else cpu * 1e3 / mib))
    rows = []
    for name, runs in seen.items():
        rates = sorted(rate for rate, _ in runs)
        cpus = sorted(c for _, c in runs if c is not None)
        rows.append(
            {
                "config": name,
                "mib_per_s": rates[len(rates) // 2],
                "rounds_mib_per_s": [round(rate, 1) for rate, _ in runs],
                "proxy_cpu_ms_per_mib": cpus[len(cpus) // 2] if cpus else None,
            }
        )
    for row in rows:
        row["vs_direct"] = row["mib_per_s"] / rows[0]["mib_per_s"]
    return rows


DOWNLOAD_COLUMNS = [
    ("config", "download", "{}"),
    ("mib_per_s", "MiB/s", "{:.0f}"),
    ("vs_direct", "x direct", "{:.2f}"),
    ("proxy_cpu_ms_per_mib", "proxy CPU ms/MiB", "{:.2f}"),
]


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows of dicts as a fixed-width table; columns are (key, title, format)."""
    head = [title for _, title, _ in columns]
    body = [
        [("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns]
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def top_functions(profile: Path, limit: int = 25) -> str:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(str(profile), stream=out).sort_stats("tottime").print_stats(limit)
    return out.getvalue()
