"""Shared pieces for the benchmarks in ``bench/``.

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        nginx = stack.enter_context(start_nginx(Path(tmp)))
        upstream = ("127.0.0.1", nginx.port)
        fw = stack.enter_context(start_firewall(policy_yaml, upstream, {"app": "bench"}, Path(tmp)))
        cpu = CpuMeter(fw.pid)
        result = run_wrk(f"http://127.0.0.1:{fw.port}/", duration=10)
        per_request_us = cpu.stop() * 1e6 / result.requests

Rules every benchmark keeps: baselines are measured in the same run and
reported as ratios; every process started here is killed when its context
exits, even on error; CPU time is the process's own (utime + stime from
``/proc/PID/stat``, children excluded), which is the fair figure on a small
machine where the load generator caps requests per second.
"""

from __future__ import annotations

import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------- ports


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Wait until something accepts on host:port (or ``proc`` dies, or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} before listening on "
                f"{host}:{port}:\n{tail}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on {host}:{port} after {timeout} s"
                ) from None
            time.sleep(0.05)


# --------------------------------------------------------------------- processes


@dataclass
class Service:
    """A started server process: what to connect to and whose CPU to read."""

    name: str
    proc: subprocess.Popen
    host: str
    port: int
    workdir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Safe to call twice."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
    except ProcessLookupError:
        pass


@contextmanager
def started(
    argv: Sequence[str],
    *,
    log: Path,
    ready_line: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    grace: float = 5.0,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start ``argv`` with stderr to ``log``; yields (process, ready line).

    With ``ready_line`` (a regex), stdout is read line by line until one
    matches; the process is stopped on exit whatever happens.
    """
    err = open(log, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd or REPO,
        env=env,
        text=True,
        stderr=err,
        stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL,
    )
    try:
        line = ""
        if ready_line:
            line = _await_line(proc, re.compile(ready_line), timeout, log)
        yield proc, line
    finally:
        stop_process(proc, grace)
        if proc.stdout is not None:
            proc.stdout.close()
        err.close()


def _await_line(proc: subprocess.Popen, pattern: re.Pattern, timeout: float, log: Path) -> str:
    import select

    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break  # EOF: the process is gone
            seen.append(line)
            if pattern.search(line):
                return line.strip()
        elif proc.poll() is not None:
            break
    tail = log.read_text()[-2000:] if log.exists() else ""
    raise RuntimeError(
        f"{proc.args[0]} never printed /{pattern.pattern}/ (exit {proc.poll()}); "
        f"stdout={''.join(seen)!r} stderr tail:\n{tail}"
    )


# --------------------------------------------------------------------- CPU time


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, its children excluded."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return utime / CLK_TCK, stime / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its children excluded), in seconds."""
    user, system = cpu_times(pid)
    return user + system


class CpuMeter:
    """CPU seconds a process spends between construction and ``stop()``.

    The kernel counts in clock ticks (usually 10 ms): measure spans of
    seconds, not milliseconds.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.start = cpu_times(pid)
        self.user: float | None = None
        self.system: float | None = None

    def stop(self) -> float:
        """Total CPU seconds since construction (``.user``/``.system`` hold the split)."""
        user, system = cpu_times(self.pid)
        self.user = user - self.start[0]
        self.system = system - self.start[1]
        return self.user + self.system


class ChildrenCpu:
    """CPU seconds of waited-for children (e.g. the load generator) over a span."""

    def __init__(self):
        self.start = _children_cpu()

    def stop(self) -> float:
        return _children_cpu() - self.start


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def us_per_request(cpu_s: float, requests: int) -> float:
    return cpu_s * 1e6 / requests if requests else float("nan")


# --------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile, ``p`` in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    rank = (len(xs) - 1) * p / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# --------------------------------------------------------------------- load: wrk

WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,' ..
    '"timeouts":%d,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,' ..
    '"max_us":%.0f,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass
class WrkResult:
    requests: int
    duration_us: int
    bytes: int
    connect_errors: int
    read_errors: int
    write_errors: int
    status_errors: int  # responses with status >= 400
    timeouts: int
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    mean_us: float
    wrk_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rps"] = round(self.rps, 1)
        return d


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    *,
    threads: int = 1,
    connections: int = 32,
    duration: float = 10.0,
    workdir: Path,
    extra_lua: str = "",
    timeout_s: int = 5,
    netns: str | None = None,
) -> WrkResult:
    """Run wrk against ``url`` (from network namespace ``netns``, if given); latency
    percentiles come from its done() hook."""
    script = workdir / "wrk_report.lua"
    script.write_text(extra_lua + WRK_REPORT)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        url,
    ]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    cpu = ChildrenCpu()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    wrk_cpu = cpu.stop()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}"
        )
    return WrkResult(**json.loads(line[len("WRK_JSON ") :]), wrk_cpu_s=wrk_cpu)


# --------------------------------------------------------------------- servers


def _run_as_line() -> str:
    # nginx's master drops privileges to "nobody" when root; the temp dir is
    # ours, so keep the workers as ourselves.
    if os.geteuid() == 0:
        return f"user {pwd.getpwuid(0).pw_name};"
    return ""


@contextmanager
def start_nginx(
    workdir: Path,
    *,
    locations: str = "",
    port: int | None = None,
    name: str = "nginx",
    netns: str | None = None,
) -> Iterator[Service]:
    """nginx as a fast upstream: one process (no master), access log off.

    ``location / { return 200 "ok"; }`` is always there; ``locations`` adds
    more (nginx syntax; ``{root}`` is replaced with ``workdir``). With ``netns``
    it runs in that network namespace, on all its addresses (``port`` needed).
    """
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    port = port or free_port()
    host = LOOPBACK if netns is None else "0.0.0.0"
    root = workdir / name
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
{_run_as_line()}
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        {locations.replace("{root}", str(workdir))}
        location / {{ return 200 "ok"; }}
    }}
}}
""")
    argv = [exe, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    with started(argv, log=root / "stderr.log") as (proc, _):
        if netns is None:
            wait_port(LOOPBACK, port, proc=proc, log=root / "stderr.log")
        else:  # not reachable from here: nginx writes its pid file once it listens
            deadline = time.monotonic() + 10
            while not (root / "nginx.pid").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx in {netns} did not start: {root / 'stderr.log'}")
                time.sleep(0.05)
        yield Service(name, proc, host, port, root)


@contextmanager
def start_haproxy(
    workdir: Path,
    upstream: tuple[str, int],
    *,
    frontend_rules: str = "",
    port: int | None = None,
    name: str = "haproxy",
    maxconn: int = 4000,
    timeouts: dict[str, str] | None = None,
    bind_options: str = "",
    server_options: str = "",
    backend_lines: str = "",
) -> Iterator[Service]:
    """haproxy in http mode, one thread, keep-alive both sides, ``frontend_rules`` in force.

    ``timeouts`` replaces or adds ``timeout NAME VALUE`` lines of the defaults (e.g.
    ``{"http-request": "10s"}``); ``bind_options`` and ``server_options`` end the bind and
    server lines (``proto h2`` for HTTP/2 on either side); ``backend_lines`` go into the
    backend (``http-reuse never``).
    """
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = port or free_port()
    root = workdir / name
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "haproxy.cfg"
    all_timeouts = {
        "connect": "5s",
        "client": "300s",
        "server": "300s",
        "http-keep-alive": "300s",
        **(timeouts or {}),
    }
    timeout_lines = "\n".join(f"    timeout {k} {v}" for k, v in all_timeouts.items())
    conf.write_text(f"""
global
    nbthread 1
    maxconn {maxconn}
    pidfile {root}/haproxy.pid

defaults
    mode http
    maxconn {maxconn}
    option http-keep-alive
{timeout_lines}

frontend bench
    bind {LOOPBACK}:{port} {bind_options}
    {frontend_rules}
    default_backend upstream

backend upstream
    {backend_lines}
    server up {upstream[0]}:{upstream[1]} {server_options}
""")
    check = subprocess.run([exe, "-c", "-f", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected its config: {check.stdout}{check.stderr}")
    with started([exe, "-db", "-f", str(conf)], log=root / "stderr.log") as (proc, _):
        wait_port(LOOPBACK, port, proc=proc, log=root / "stderr.log")
        yield Service(name, proc, LOOPBACK, port, root)


@contextmanager
def start_firewall(
    policy_yaml: str,
    upstream: tuple[str, int],
    labels: dict[str, str],
    workdir: Path,
    *,
    flowlog: bool = False,
    launcher: Sequence[str] = ("-m", "l7proxy"),
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    name: str = "l7proxy",
) -> Iterator[Service]:
    """The shipped ``python -m l7proxy firewall`` in front of ``upstream``.

    ``launcher`` replaces ``-m l7proxy`` (e.g. ``["-m", "bench._profile_firewall", OUT]``).
    It listens on an ephemeral port, announced on stdout.
    """
    root = workdir / name
    root.mkdir(parents=True, exist_ok=True)
    policy = root / "policy.yaml"
    policy.write_text(policy_yaml)
    argv = [
        sys.executable,
        *launcher,
        "firewall",
        "--listen",
        f"{LOOPBACK}:0",
        "--upstream",
        f"{upstream[0]}:{upstream[1]}",
        "--labels",
        ",".join(f"{k}={v}" for k, v in labels.items()),
        "--policy",
        str(policy),
        *(["--flowlog", str(root / "flows.jsonl")] if flowlog else []),
        *extra_args,
    ]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with started(
        argv,
        log=root / "stderr.log",
        ready_line=r"l7proxy firewall listening on",
        env=full_env,
        grace=15.0,
    ) as (proc, line):
        host, _, port = line.rsplit(" ", 1)[-1].rpartition(":")
        yield Service(name, proc, host, int(port), root)


# --------------------------------------------------------------------- results


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version (stdout or stderr)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (with the date and the machine) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "benchmark": name,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"python -m bench {name}",
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats get a sensible number of digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "n/a"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
