"""Transparent mode with workers: does the kernel spread flows that tc redirects
with ``bpf_sk_assign`` over a ``SO_REUSEPORT`` group of listeners?

    python -m bench reuseport_redirect [--connections 400] [--listeners 1,2,4]

Root only. One run makes a namespace with a veth (unique names, removed at the
end whatever happens), attaches ``bench/reuseport_redirect.c`` at tc ingress of
the veth's host side (the agent's redirect, reduced: an established socket of
the tuple, else the one listener registered in a sockhash), the policy route
that makes marked packets local, and ``--listeners`` transparent listeners (1, 2 and 4 in turn) on
one port in one reuseport group, only the first of which is in the sockhash.
A client in the namespace then opens ``--connections`` connections to
10.213.8.9:80, each sending its number; the listeners accept, read and answer.

Reported: how many connections each listener accepted. If the kernel honours
the group, the connections spread over all listeners although the program only
ever names the first; if it does not, the first takes them all (or the assign
fails: then the connections time out). Results go to
``bench/results/reuseport_redirect.json``.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import write_results

NAME = "reuseport_redirect"
SOURCE = Path(__file__).with_suffix(".c")
MARK = 0x7A1
TABLE = 177
PORT_OF_LISTENERS = 15999
CLIENT = """
import socket, sys
count = int(sys.argv[1])
answers = 0
for n in range(count):
    with socket.create_connection(("10.213.8.9", 80), timeout=5) as s:
        s.sendall(b"%d\\n" % n)
        if s.recv(64) == b"ok %d\\n" % n:
            answers += 1
print(answers)
"""


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reuseport_redirect")
    argv = [] if argv is None else argv
    p.add_argument("--connections", type=int, default=400)
    p.add_argument(
        "--listeners",
        type=lambda t: [int(n) for n in t.split(",")],
        default=[1, 2, 4],
        help="group sizes to try, e.g. 1,2,4",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("reuseport_redirect needs root (namespaces, tc, BPF)", file=sys.stderr)
        return 1
    from bcc import BPF  # the experiment's own program; the agent loads its own in datapath/

    from l7proxy.datapath.bpfsys import sockhash_put

    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"rpx{tag}", f"rpxh{tag}", f"rpxp{tag}"
    listeners: list[socket.socket] = []
    result: dict[str, Any] = {}
    try:
        ip("netns", "add", ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", "10.213.7.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", "10.213.7.2/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "route", "add", "default", "via", "10.213.7.1")
        ip("rule", "add", "fwmark", str(MARK), "lookup", str(TABLE))
        ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(TABLE))

        bpf = BPF(src_file=str(SOURCE).encode(), cflags=[f"-DMARK={MARK}"])
        fn = bpf.load_func(b"redirect", BPF.SCHED_CLS)
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=host_if)[0]
            ipr.tc("add", "clsact", index)
            ipr.tc(
                "add-filter",
                "bpf",
                index,
                ":1",
                fd=fn.fd,
                name=fn.name,
                parent="ffff:fff2",
                classid=1,
                direct_action=True,
            )
        runs = []
        for count in args.listeners:
            for _ in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
                s.bind(("0.0.0.0", PORT_OF_LISTENERS))
                s.listen(4096)
                s.setblocking(False)
                listeners.append(s)
            # Only the first listener is ever named to the kernel.
            sockhash_put(_map_fd(bpf, b"listener"), 0, listeners[0].fileno())
            before = (bpf[b"assigned"][0].value, bpf[b"assigned"][1].value)
            client = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, str(args.connections)],
                stdout=subprocess.PIPE,
                text=True,
            )
            accepted = serve(listeners, client, args.connections)
            answered = int(client.stdout.read().strip() or 0) if client.stdout else 0
            client.wait(timeout=30)
            counts = bpf[b"assigned"]
            run = {
                "listeners": count,
                "connections": args.connections,
                "answered": answered,
                "accepted_by_listener": accepted,
                "packets_assigned": counts[0].value - before[0],
                "assign_errors": counts[1].value - before[1],
                "spread": all(n > 0 for n in accepted),
            }
            print(run, flush=True)
            runs.append(run)
            for s in listeners:
                s.close()
            listeners.clear()
        result = {"kernel": os.uname().release, "listener_in_the_sockhash": 0, "runs": runs}
    finally:
        for s in listeners:
            s.close()
        ip("link", "del", host_if, check=False)
        ip("netns", "del", ns, check=False)
        ip("rule", "del", "fwmark", str(MARK), "lookup", str(TABLE), check=False)
        ip("route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", str(TABLE), check=False)
    path = write_results(NAME, result)
    print(f"results: {path}")
    runs = result.get("runs", [])
    return 0 if runs and all(r["answered"] == args.connections for r in runs) else 1


def _map_fd(bpf: Any, name: bytes) -> int:
    # bcc 0.26 cannot wrap a sockhash (KERNEL-NOTES: "Unknown table type 18"),
    # but it knows the map's fd.
    from bcc import lib

    return int(lib.bpf_table_fd(bpf.module, name))


def serve(listeners: list[socket.socket], client: subprocess.Popen, expected: int) -> list[int]:
    """Accept, read a number, answer ``ok N``; count the accepts per listener."""
    accepted = [0] * len(listeners)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(listeners):
        sel.register(s, selectors.EVENT_READ, i)
    deadline = time.monotonic() + 60
    while sum(accepted) < expected and time.monotonic() < deadline and client.poll() is None:
        for key, _ in sel.select(timeout=0.2):
            try:
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            accepted[key.data] += 1
            with conn:
                conn.settimeout(5)
                data = conn.recv(64)
                conn.sendall(b"ok " + data)
    return accepted


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
