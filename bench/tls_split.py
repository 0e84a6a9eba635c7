"""Where a full TLS handshake's CPU goes: l7proxy against haproxy and against a bare
Python TLS server with l7proxy's own context, by process and by library.

    python -m bench.tls_split [--handshakes 300] [--rounds 2] [--no-perf]

``bench.tls`` finds that a handshake costs l7proxy about twice haproxy's CPU, and
``bench.tls_instructions`` that it executes only ~1.07x haproxy's instructions. This
splits the gap. In front of nginx (the certificate and GET-only rule of ``bench/tls.py``):

- ``l7proxy``: ``firewall --tls-cert``; ``l7proxy-cleartext``: the same without TLS;
- ``haproxy``: one thread, ``ssl crt``, ``http-reuse never`` (a server connection per
  client, as l7proxy makes);

and, answering by themselves (no upstream):

- ``bare-uvloop``: Python and uvloop with the ``ssl.SSLContext`` l7proxy builds
  (``l7proxy.proxy.tls.ServerTls``): accept, handshake, read a request head, write a
  fixed 200, close; what the event loop's TLS costs without l7proxy's own work;
- ``haproxy-local``: haproxy with the same bind answering ``http-request return``.

The client is ``bench.tls_instructions``'s (Python ``ssl``, one connection at a time,
a full TLS 1.3 handshake, a GET, ``Connection: close``). Each server's user and system
time and minor page faults are read from ``/proc`` around ``--handshakes`` connections,
``--rounds`` times interleaved (medians). The key exchange group and the cipher each
server negotiates are read with ``openssl s_client``, so that like is compared with like.
Then, where ``perf`` can sample (``-e cpu-clock``, a software clock: no hardware counters
needed), one more pass per server under ``perf record`` splits its time by library:
held next to the instruction counts by library of ``bench.tls_instructions``, it says
which code runs slower, not only which runs more. Printed only; docs/tls.md has the
figures and what they mean.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    Service,
    cpu_times,
    markdown_table,
    median,
    start_firewall,
    start_haproxy,
    start_nginx,
    started,
)
from bench.conn_cost import LINGER_WAIT
from bench.tls import (
    HAPROXY_RULES,
    NAME,
    firewall_tls_args,
    haproxy_tls_bind,
    make_certificate,
    policy_yaml,
)
from bench.tls_instructions import new_connections

WARM_UP = 20
PERF_HZ = 4000
LOCAL_ANSWER = "http-request return status 200 content-type text/plain string ok"
BARE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.tls_split", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--handshakes", type=int, default=300, help="connections per measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved measurements (medians)")
    p.add_argument("--no-perf", action="store_true", help="skip the split by library")
    p.add_argument("--serve-bare", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------- the bare server


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass; it has write/close.
        self.transport = transport
        self.head = b""

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(BARE_RESPONSE)
            self.transport.close()


def serve_bare(cert: Path, key: Path) -> int:
    """The bare server (a child process): prints ``listening PORT``, serves until killed."""
    import uvloop

    from l7proxy.proxy.tls import KeyPair, ServerFiles, ServerTls

    files = ServerFiles((KeyPair(cert, key),), None, "--serve-bare")
    context = ServerTls(files, ("http/1.1",)).context

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Answer, LOOPBACK, 0, ssl=context, backlog=1024)
        print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(serve())
    return 0


@contextmanager
def start_bare(workdir: Path, cert: Path, key: Path) -> Iterator[Service]:
    argv = [sys.executable, "-m", "bench.tls_split", "--serve-bare", str(cert), str(key)]
    with started(argv, log=workdir / "bare.log", ready_line=r"^listening \d+") as (proc, line):
        yield Service("bare-uvloop", proc, LOOPBACK, int(line.split()[1]), workdir)


# --------------------------------------------------------------------- measuring


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[7])  # field 10 of proc(5)


def negotiated(port: int) -> str:
    """The key exchange group and cipher suite a server picks for ``openssl s_client``."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", NAME],
        input="",
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    group = re.search(r"Server Temp Key: ([^,\n]+)", out)
    cipher = re.search(r"Cipher is (\S+)", out)
    return f"{group[1] if group else '?'}, {cipher[1] if cipher else '?'}"


def measure(service: Service, client: ssl.SSLContext | None, n: int) -> dict[str, float]:
    new_connections(service.port, client, WARM_UP)
    time.sleep(LINGER_WAIT)  # the warm-up's lingering closes end outside the window
    faults0, (user0, sys0) = minor_faults(service.pid), cpu_times(service.pid)
    began = time.monotonic()
    new_connections(service.port, client, n)
    elapsed = time.monotonic() - began
    time.sleep(LINGER_WAIT)
    faults1, (user1, sys1) = minor_faults(service.pid), cpu_times(service.pid)
    return {
        "per_s": n / elapsed,
        "user_us": 1e6 * (user1 - user0) / n,
        "sys_us": 1e6 * (sys1 - sys0) / n,
        "faults": (faults1 - faults0) / n,
    }


def perf_usable() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(
        ["perf", "stat", "-e", "cpu-clock", "true"], capture_output=True, text=True
    )
    return probe.returncode == 0


def by_library(service: Service, client: ssl.SSLContext | None, n: int, out: Path) -> dict:
    """µs per handshake by shared object, from ``perf record -e cpu-clock`` samples."""
    new_connections(service.port, client, WARM_UP)
    time.sleep(LINGER_WAIT)
    argv = ["perf", "record", "-e", "cpu-clock", "-F", str(PERF_HZ), "-p", str(service.pid)]
    perf = subprocess.Popen([*argv, "-o", str(out)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # attached
        new_connections(service.port, client, n)
        time.sleep(LINGER_WAIT)
    finally:
        perf.send_signal(2)
        perf.wait(30)
    report = subprocess.run(
        ["perf", "report", "-i", str(out), "--no-children", "--sort", "dso", "--stdio", "-n"],
        capture_output=True,
        text=True,
    ).stdout
    split: dict[str, float] = {}
    for samples, dso in re.findall(r"^\s+[\d.]+%\s+(\d+)\s+(\S+)", report, re.M):
        name = dso.strip("[]").split(".cpython")[0].split(".so")[0]
        split[name] = split.get(name, 0.0) + int(samples) * 1e6 / PERF_HZ / n
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_bare:
        return serve_bare(Path(args.serve_bare[0]), Path(args.serve_bare[1]))
    with tempfile.TemporaryDirectory(prefix="bench-tls-split-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        ca, cert, key, combined = make_certificate(workdir)
        nginx = stack.enter_context(start_nginx(workdir))
        upstream = (LOOPBACK, nginx.port)
        tls_args = firewall_tls_args(cert, key)
        bind = haproxy_tls_bind(combined)
        policy = policy_yaml(nginx.port)
        services = [
            stack.enter_context(
                start_firewall(policy, upstream, {"app": "bench"}, workdir, extra_args=tls_args)
            ),
            stack.enter_context(
                start_firewall(
                    policy, upstream, {"app": "bench"}, workdir, name="l7proxy-cleartext"
                )
            ),
            stack.enter_context(
                start_haproxy(
                    workdir,
                    upstream,
                    frontend_rules=HAPROXY_RULES,
                    bind_options=bind,
                    backend_lines="http-reuse never",
                )
            ),
            stack.enter_context(start_bare(workdir, cert, key)),
            stack.enter_context(
                start_haproxy(
                    workdir,
                    upstream,
                    frontend_rules=LOCAL_ANSWER,
                    bind_options=bind,
                    name="haproxy-local",
                )
            ),
        ]
        client = ssl.create_default_context(cafile=str(ca))

        def client_of(service: Service) -> ssl.SSLContext | None:
            return None if service.name == "l7proxy-cleartext" else client

        agreed = {s.name: negotiated(s.port) if client_of(s) else "cleartext" for s in services}
        runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in services}
        for _ in range(args.rounds):
            for service in services:
                runs[service.name].append(measure(service, client_of(service), args.handshakes))
        splits: dict[str, dict[str, float]] = {}
        if not args.no_perf and perf_usable():
            for service in services:
                out = workdir / f"perf-{service.name}.data"
                splits[service.name] = by_library(service, client_of(service), args.handshakes, out)
    print(report(agreed, runs, splits, args))
    return 0


def report(
    agreed: dict[str, str],
    runs: dict[str, list[dict[str, float]]],
    splits: dict[str, dict[str, float]],
    args: argparse.Namespace,
) -> str:
    def med(name: str, key: str) -> float:
        return median([r[key] for r in runs[name]])

    rows: list[list[Any]] = [
        [
            name,
            agreed[name],
            f"{med(name, 'per_s'):,.0f}",
            f"{med(name, 'user_us'):,.0f}",
            f"{med(name, 'sys_us'):,.0f}",
            f"{med(name, 'faults'):.2f}",
            " / ".join(f"{r['user_us']:,.0f}" for r in runs[name]),
        ]
        for name in runs
    ]
    text = (
        f"{args.handshakes} connections one at a time, {args.rounds} rounds (medians)\n\n"
        + markdown_table(
            [
                "server",
                "key exchange, cipher",
                "connections/s",
                "user µs",
                "system µs",
                "minor faults",
                "user µs, each round",
            ],
            rows,
        )
    )
    if splits:
        split_rows = [
            [name, f"{sum(split.values()):,.0f}"]
            + [", ".join(f"{lib} {us:,.0f}" for lib, us in list(split.items())[:7])]
            for name, split in splits.items()
        ]
        text += (
            f"\n\nunder perf record -e cpu-clock -F {PERF_HZ} (which adds its own), "
            "µs per connection by library:\n\n"
            + markdown_table(["server", "total", "by library"], split_rows)
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
