"""Restarts that lose nothing: a new agent takes over from a running one.

Endpoints in namespaces, the real agent, the Star Wars rule1 L7 policy, and a
load loop in the client's namespace while a second ``l7proxy run`` takes over
(docs/restarts.md). No request may fail; judging must go on (403, drops);
the keep-alive connection opened before the restart must keep working while
the old agent drains, and be closed between requests when it is done.
"""

from __future__ import annotations

import ast
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.e2e.test_agent_e2e import RULE1_L7, SHIPS
from tests.support.node import running_node

DRAIN_SECONDS = 4

# Runs inside the tiefighter namespace until the stop file appears (or a
# minute passes): fresh connections alternating an allowed POST and a denied
# PUT, and one keep-alive connection reused like an HTTP client pool does
# (a connection the server closed while idle is noticed and replaced before
# reuse, one whose response said "Connection: close" is closed by http.client
# and replaced; a request that still meets a closed connection is retried once
# and counted). Prints one JSON summary.
LOAD_CLIENT = textwrap.dedent(
    """
    import http.client, json, os, select, socket, sys, threading, time
    host, stop_path = sys.argv[1], sys.argv[2]
    deadline = time.monotonic() + 60
    CASES = [("POST", "/v1/request-landing", 200), ("PUT", "/v1/exhaust-port", 403)]
    out = {"fresh_ok": 0, "fresh_denied": 0, "keepalive_ok": 0, "keepalive_connections": 1,
           "idle_closes_seen": 0, "told_to_close": 0, "retried": 0, "failures": []}
    lock = threading.Lock()

    def running():
        return not os.path.exists(stop_path) and time.monotonic() < deadline

    def fail(what):
        with lock:
            out["failures"].append(f"{time.time():.3f} {what}")

    def ask(conn, method, path):
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read().decode().strip()

    def fresh():
        i = 0
        while running():
            method, path, want = CASES[i % 2]
            i += 1
            conn = http.client.HTTPConnection(host, 80, timeout=5)
            # Our own socket, so a failure can name its port even if connect() fails.
            sock = conn.sock = socket.socket()
            sock.settimeout(5)
            try:
                sock.connect((host, 80))
                status, body = ask(conn, method, path)
                if status != want or (want == 403 and body != "Access denied"):
                    fail(f"fresh {method} {path}: {status} {body!r}")
                elif want == 200:
                    out["fresh_ok"] += 1
                else:
                    out["fresh_denied"] += 1
            except Exception as exc:
                port = sock.getsockname()[1]
                fail(f"fresh {method} {path} from port {port}: {exc!r}")
            finally:
                conn.close()

    def closed_by_peer(conn):
        if conn.sock is None:
            return True
        readable, _, _ = select.select([conn.sock], [], [], 0)
        if not readable:
            return False
        try:
            return conn.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def keepalive():
        conn = http.client.HTTPConnection(host, 80, timeout=5)
        while running():
            if conn.sock is None and out["keepalive_ok"]:
                out["told_to_close"] += 1  # http.client closed it after Connection: close
                out["keepalive_connections"] += 1
            elif conn.sock is not None and closed_by_peer(conn):
                out["idle_closes_seen"] += 1
                conn.close()
                out["keepalive_connections"] += 1
            try:
                status, _ = ask(conn, "POST", "/v1/request-landing")
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                out["retried"] += 1
                conn.close()
                out["keepalive_connections"] += 1
                try:
                    status, _ = ask(conn, "POST", "/v1/request-landing")
                except Exception as exc:
                    fail(f"keepalive retry: {exc!r}")
                    continue
            except Exception as exc:
                fail(f"keepalive: {exc!r}")
                conn.close()
                continue
            if status != 200:
                fail(f"keepalive: {status}")
            else:
                out["keepalive_ok"] += 1
            time.sleep(0.005)

    threads = [threading.Thread(target=f) for f in (fresh, keepalive)]
    for t in threads:
        t.start()
    print("load running", flush=True)
    for t in threads:
        t.join()
    print(json.dumps(out), flush=True)
    """
)

# One keep-alive connection driven line by line from stdin:
#   REQ METHOD PATH -> "<status> <body> | <local port>"
#   PEEK            -> "open" or "closed" (ended by the peer, noticed without sending)
#   REBIND          -> "<seconds>" or "timeout": close it and connect again from the
#                      same local port (what a client cycling through its ports does)
KEEPALIVE_CLIENT = textwrap.dedent(
    """
    import http.client, select, socket, sys, time
    conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "REBIND":
            port = conn.sock.getsockname()[1]
            conn.close()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", port))
            sock.settimeout(3)
            started = time.monotonic()
            try:
                sock.connect((sys.argv[1], 80))
            except TimeoutError:
                print("timeout", flush=True)
                continue
            conn.sock = sock
            print(f"{time.monotonic() - started:.3f}", flush=True)
            continue
        if words[0] == "CONNECT":  # open the connection, say nothing
            conn.connect()
            print("connected", flush=True)
            continue
        if words[0] == "PEEK":
            readable, _, _ = select.select([conn.sock], [], [], 1.0)
            try:
                gone = bool(readable) and conn.sock.recv(1, socket.MSG_PEEK) == b""
            except ConnectionResetError:
                gone = True
            print("closed" if gone else "open", flush=True)
            continue
        conn.request(words[1], words[2])
        r = conn.getresponse()
        print(r.status, r.read().decode().strip(), "|", conn.sock.getsockname()[1], flush=True)
    """
)

pytestmark = pytest.mark.root


@pytest.fixture
def node():
    with running_node(SHIPS) as n:
        pins = _pin_dir(n)
        n.serve_http("deathstar", 80)
        n.import_policy(RULE1_L7)
        yield n
    assert not pins.exists(), "pinned maps left behind"


def _pin_dir(node) -> Path:
    from l7proxy.datapath import pins

    return pins.pin_dir(node.store.read().instance)


def _filters(node, name: str) -> list[tuple[str, str, int]]:
    dev = node.endpoint(name).host_ifname
    run = subprocess.run(
        ["bpftool", "-j", "net", "show", "dev", dev], capture_output=True, text=True, check=True
    )
    return sorted((f["kind"], f["name"], f["id"]) for f in json.loads(run.stdout)[0]["tc"])


def _counters(node) -> dict:
    status = node.status()
    return status["datapath"]["counters"]["total"] if status else {}


def _successor(node, *extra: str) -> subprocess.Popen:
    """Start a second ``l7proxy run`` on the same state dir (it takes over)."""
    argv = [sys.executable, "-m", "l7proxy", "--state-dir", str(node.store.root), "run", *extra]
    proc = node.spawn(argv, "agent running", f"agent-{len(node.procs)}", timeout=60)
    node.agent = proc
    return proc


def spawn_load(node, stop_file: Path) -> subprocess.Popen:
    """LOAD_CLIENT from the tiefighter to the deathstar, until ``stop_file`` appears;
    its summary is the last line of ``load.log``."""
    return node.spawn(
        [
            "ip",
            "netns",
            "exec",
            node.endpoint("tiefighter").netns,
            sys.executable,
            "-c",
            LOAD_CLIENT,
            node.ip("deathstar"),
            str(stop_file),
        ],
        "load running",
        "load",
    )


def drain_report(node) -> dict:
    """What the first agent printed when its drain ended (``l7proxy drained: {...}``)."""
    drained = [
        line
        for line in (node.root / "agent.log").read_text().splitlines()
        if line.startswith("l7proxy drained:")
    ]
    assert drained, "the old agent did not report its drain"
    return ast.literal_eval(drained[0].removeprefix("l7proxy drained:").strip())


class Keepalive:
    def __init__(self, node, src: str, dst: str):
        argv = [
            "ip",
            "netns",
            "exec",
            node.endpoint(src).netns,
            sys.executable,
            "-c",
            KEEPALIVE_CLIENT,
            node.ip(dst),
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def say(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_takeover_under_load_fails_no_request(node):
    before = node.status()
    identities = {e["name"]: e["identity"] for e in before["endpoints"]}
    old = node.agent
    keepalive = Keepalive(node, "tiefighter", "deathstar")
    stop_file = node.root / "stop-load"
    load = spawn_load(node, stop_file)
    try:
        landed = keepalive.say("REQ POST /v1/request-landing")
        assert landed.startswith(f"200 Ship landed (seen from {node.ip('tiefighter')})")
        port_before = landed.rsplit("|", 1)[1].strip()
        assert keepalive.say("REQ PUT /v1/exhaust-port") == f"403 Access denied | {port_before}"
        time.sleep(1.0)  # load against the old agent alone

        timeline = {"successor started": time.time()}
        new = _successor(node, "--drain-timeout", str(DRAIN_SECONDS))
        timeline["successor running"] = time.time()
        after = node.wait_status(lambda s: s and s["pid"] == new.pid, what="the successor's status")

        # The old agent drains: the connection it accepted before still works, judged as before.
        assert old.poll() is None
        assert keepalive.say("REQ PUT /v1/exhaust-port") == f"403 Access denied | {port_before}"
        assert keepalive.say("REQ POST /v1/request-landing").endswith(f"| {port_before}")
        # New connections meet the successor, which judges them the same way.
        assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
        assert (
            node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=1.5).status
            is None
        )

        assert old.wait(timeout=DRAIN_SECONDS + 20) == 0
        timeline["old agent gone"] = time.time()
        # Ended by the drain while idle, between requests: the client sees it before reusing it.
        assert keepalive.say("PEEK") == "closed"
        # The successor alone: still judged, still dropped in the kernel.
        assert (
            node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").body == "Access denied"
        )
        assert (
            node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=1.5).status
            is None
        )
    finally:
        stop_file.touch()
        load.wait(timeout=30)
        keepalive.close()

    summary = json.loads((node.root / "load.log").read_text().splitlines()[-1])
    print("load during takeover:", summary)
    assert summary["failures"] == [], (timeline, _counters(node))
    assert (
        summary["fresh_ok"] > 20 and summary["fresh_denied"] > 20 and summary["keepalive_ok"] > 20
    )
    assert summary["keepalive_connections"] >= 2  # the drain closed the first one at its deadline
    drain = drain_report(node)
    print("old agent's drain:", drain)
    assert drain["cut"] == 0  # nothing was in flight when the old agent let go

    # State carried over: identities, policy revisions continue, the successor serves.
    assert {e["name"]: e["identity"] for e in after["endpoints"]} == identities
    assert after["policy_revision"] > before["policy_revision"]
    assert after["datapath"]["policy_revision"] > before["datapath"]["policy_revision"]
    status = node.wait_status(
        lambda s: s and s["proxy"]["connections_total"] > 0, what="the successor to proxy"
    )
    # Exactly one filter per hook, running the successor's programs.
    programs = status["datapath"]["programs"]
    for ship in SHIPS:
        kinds = [kind for kind, _, _ in _filters(node, ship)]
        assert kinds == ["clsact/egress", "clsact/ingress"], ship
    assert {i for _, _, i in _filters(node, "deathstar")} == {
        programs["from_endpoint"],
        programs["to_endpoint"],
    }
    assert set(programs.values()).isdisjoint(before["datapath"]["programs"].values())


def test_restart_after_kill_keeps_one_filter_per_hook_and_a_full_stop_unpins(node):
    assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
    revision = node.status()["datapath"]["policy_revision"]
    node.stop_agent(signal.SIGKILL)
    assert _pin_dir(node).is_dir()  # a killed agent leaves its maps for the next one

    node.start_agent()  # no one answers on the control socket: a plain start on the pinned maps
    status = node.status()
    assert status["datapath"]["policy_revision"] > revision
    assert status["datapath"]["maps"]["policy"][0] > 0
    for ship in SHIPS:
        assert [kind for kind, _, _ in _filters(node, ship)] == [
            "clsact/egress",
            "clsact/ingress",
        ], ship
    assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
    assert (
        node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=1.5).status is None
    )

    assert node.stop_agent() == 0  # SIGTERM, no successor: a full stop
    assert not _pin_dir(node).exists()
    for ship in SHIPS:
        assert _filters(node, ship) == [], ship
    assert not (node.store.root / "agent.sock").exists()
    assert (
        node.curl("xwing", "POST", "deathstar", "/v1/request-landing").status == 200
    )  # no policy without an agent


def test_after_a_sigkill_a_client_reusing_the_port_of_a_connection_it_had_connects_at_once(
    node,
):
    """issue 14, finding 12: the kernel closes a killed agent's sockets. With a FIN,
    our side of a keep-alive connection went FIN_WAIT2 then TIME_WAIT on the client's
    4-tuple, and a later SYN from the same port, handed to the new agent's listener,
    was dropped as its duplicate: a connect timeout, for up to a minute. Accepted
    sockets are reset when the process dies instead (docs/restarts.md)."""
    keepalive = Keepalive(node, "tiefighter", "deathstar")
    try:
        assert keepalive.say("REQ POST /v1/request-landing").startswith("200 ")
        node.stop_agent(signal.SIGKILL)
        assert keepalive.say("PEEK") == "closed"  # the client sees it end, and closes it

        node.start_agent()
        took = keepalive.say("REBIND")
        assert took != "timeout", "the SYN from the same port met a TIME_WAIT of the dead agent"
        assert float(took) < 1.0
        assert keepalive.say("REQ POST /v1/request-landing").startswith("200 ")
    finally:
        keepalive.close()


def test_after_a_sigkill_a_client_reusing_the_port_of_a_connection_that_never_spoke_connects(
    node,
):
    """The same, for a connection the agent held as a bare socket because its client
    had not spoken yet (``l7proxy/proxy/silent.py``): it is reset when the process dies
    too, so its 4-tuple is free at once."""
    keepalive = Keepalive(node, "tiefighter", "deathstar")
    try:
        assert keepalive.say("CONNECT") == "connected"
        time.sleep(0.2)  # accepted by the agent, and held silent
        node.stop_agent(signal.SIGKILL)
        assert keepalive.say("PEEK") == "closed"

        node.start_agent()
        took = keepalive.say("REBIND")
        assert took != "timeout", "the SYN from the same port met a TIME_WAIT of the dead agent"
        assert float(took) < 1.0
        assert keepalive.say("REQ POST /v1/request-landing").startswith("200 ")
    finally:
        keepalive.close()


def test_takeover_flag_without_a_running_agent_is_refused(node):
    node.stop_agent()
    run = node.cli("run", "--takeover", check=False)
    assert run.returncode == 1
    assert "no running agent" in run.stderr
    assert not _pin_dir(node).exists()


def test_control_socket_passes_a_listening_socket_that_keeps_its_queue(tmp_path):
    from l7proxy.agent.handover import ControlServer, Predecessor

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    drains = []
    server = ControlServer(
        tmp_path / "agent.sock",
        hello=lambda: {"pid": 1, "listeners": {"http": port}, "policy_revision": 7},
        listeners=lambda: (["http"], [listener.fileno()]),
        drain=lambda timeout, cluster: (
            drains.append((timeout, cluster)) or {"draining": True, "connections": 0}
        ),
    )
    server.start()
    try:
        # A connection queued before the handover is accepted after it, by the successor.
        early = socket.create_connection(("127.0.0.1", port))
        pred = Predecessor.connect(tmp_path / "agent.sock")
        assert pred.info == {"pid": 1, "listeners": {"http": port}, "policy_revision": 7}
        (inherited,) = pred.listeners()["http"]
        listener.close()
        late = socket.create_connection(("127.0.0.1", port))
        inherited.setblocking(True)
        inherited.settimeout(5)
        accepted = [inherited.accept()[0] for _ in range(2)]
        assert sorted(c.getpeername()[1] for c in accepted) == sorted(
            c.getsockname()[1] for c in (early, late)
        )
        assert pred.drain(2.5, {"etcd": "10.0.0.5:2379"}) == {"draining": True, "connections": 0}
        assert drains == [(2.5, {"etcd": "10.0.0.5:2379"})]  # a successor in cluster mode
        pred.close()
        for s in (*accepted, early, late, inherited):
            s.close()
    finally:
        server.close()
    assert not (tmp_path / "agent.sock").exists()
    assert Predecessor.connect(tmp_path / "agent.sock") is None


# --------------------------------------------------------------------------- busy keep-alive

# issue 14, finding 12: a raw HTTP server (no framework between the socket and
# the answer) and the load of the held-out restart check.
BUSY_POLICY = RULE1_L7.replace(
    "[{method: POST, path: /v1/request-landing}]",
    "[{method: POST, path: /v1/request-landing}, {method: GET, path: '/v1/download.*'}]",
)
BUSY_TAKEOVERS = 3
BUSY_DRAIN_SECONDS = 2
BUSY_KEEPALIVE = 16

# Answers every request at once on a kept-alive connection: "ok <method> <peer>", or
# for GET /v1/download?kb=N, N KiB of a fixed pattern in 64 KiB pieces 10 ms apart
# (a slow download, checked byte for byte by the client).
RAW_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    PIECE = bytes(range(256)) * 256

    async def serve(reader, writer):
        peer = writer.get_extra_info("peername")[0].encode()
        try:
            while True:
                head = await reader.readuntil(b"\\r\\n\\r\\n")
                line, *fields = head.decode("latin-1").split("\\r\\n")
                method, target, _ = line.split(" ", 2)
                length, close = 0, False
                for field in fields:
                    name, _, value = field.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection" and "close" in value.lower():
                        close = True
                if length:
                    await reader.readexactly(length)
                if target.startswith("/v1/download?kb="):
                    pieces = int(target.rsplit("=", 1)[1]) // 64
                    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n"
                                 % (pieces * len(PIECE)))
                    for _ in range(pieces):
                        writer.write(PIECE)
                        await writer.drain()
                        await asyncio.sleep(0.01)
                else:
                    body = b"ok " + method.encode() + b" " + peer
                    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
                                 % (len(body), body))
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, "0.0.0.0", 80, backlog=4096)
        print("raw server ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())
    """
)

# The held-out check's client mix, in the tiefighter namespace, until the stop file
# appears: BUSY_KEEPALIVE keep-alive connections each sending a request every 2 ms
# (every tenth one denied: 403), checked before each reuse as HTTP client pools do
# (a connection the peer ended is replaced; one that answered "Connection: close" is
# closed by http.client itself); short connections alternating an allowed POST and a
# denied PUT; and a slow download on a keep-alive connection, checked byte for byte.
# Nothing is retried: every exception is a failed request. Prints one JSON summary.
BUSY_CLIENT = textwrap.dedent(
    """
    import http.client, json, os, select, socket, sys, threading, time
    host, stop_path, keepalive = sys.argv[1], sys.argv[2], int(sys.argv[3])
    deadline = time.monotonic() + 150
    PIECE = bytes(range(256)) * 256
    out = {"ok": 0, "denied": 0, "downloads": 0, "keepalive_connections": 0, "failures": []}
    lock = threading.Lock()

    def running():
        return not os.path.exists(stop_path) and time.monotonic() < deadline

    def count(key):
        with lock:
            out[key] += 1

    def fail(what, port):
        with lock:
            out["failures"].append(f"{time.time():.3f} port {port}: {what}")

    def closed_by_peer(conn):
        if conn.sock is None:
            return True
        if not select.select([conn.sock], [], [], 0)[0]:
            return False
        try:
            return conn.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def reuse(conn, kept):
        # What a pool does before reusing a connection: a closed one is replaced.
        if closed_by_peer(conn):
            conn.close()
            conn.sock = socket.create_connection((host, 80), timeout=5)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kept:
                count("keepalive_connections")

    def ask(conn, method, path, want, kept=False):
        port = None
        try:
            reuse(conn, kept)
            port = conn.sock.getsockname()[1]
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
        except Exception as exc:
            fail(f"{method} {path}: {exc!r}", port)
            conn.close()
            return None
        if response.status != want:
            fail(f"{method} {path}: {response.status} {body[:60]!r}", port)
            return None
        return body

    def keepalive_loop():
        conn = http.client.HTTPConnection(host, 80, timeout=5)
        i = 0
        while running():
            i += 1
            if i % 10 == 0:
                if ask(conn, "PUT", "/v1/exhaust-port", 403, kept=True) is not None:
                    count("denied")
            elif ask(conn, "POST", "/v1/request-landing", 200, kept=True) is not None:
                count("ok")
            time.sleep(0.002)
        conn.close()

    def short_loop():
        i = 0
        while running():
            i += 1
            conn = http.client.HTTPConnection(host, 80, timeout=5)
            if i % 2:
                if ask(conn, "POST", "/v1/request-landing", 200) is not None:
                    count("ok")
            elif ask(conn, "PUT", "/v1/exhaust-port", 403) is not None:
                count("denied")
            conn.close()

    def download_loop():
        conn = http.client.HTTPConnection(host, 80, timeout=5)
        while running():
            body = ask(conn, "GET", "/v1/download?kb=512", 200)
            if body is not None:
                if body == PIECE * 8:
                    count("downloads")
                else:
                    fail(f"download corrupted: {len(body)} bytes", None)
        conn.close()

    loops = [keepalive_loop] * keepalive + [short_loop, short_loop, download_loop]
    threads = [threading.Thread(target=loop) for loop in loops]
    for t in threads:
        t.start()
    print("load running", flush=True)
    for t in threads:
        t.join()
    print(json.dumps(out), flush=True)
    """
)


@pytest.fixture
def busy_node():
    with running_node(SHIPS) as n:
        pins = _pin_dir(n)
        n.spawn(
            ["ip", "netns", "exec", n.endpoint("deathstar").netns, sys.executable, "-c"]
            + [RAW_SERVER],
            "raw server ready",
            "raw-server",
        )
        n.import_policy(BUSY_POLICY)
        yield n
    assert not pins.exists(), "pinned maps left behind"


def _drain_reports(node) -> list[dict]:
    reports = []
    for log in sorted(node.root.glob("agent*.log")):
        for line in log.read_text().splitlines():
            if line.startswith("l7proxy drained:"):
                reports.append(ast.literal_eval(line.removeprefix("l7proxy drained:").strip()))
    return reports


def test_takeovers_under_busy_keep_alive_traffic_fail_no_request(busy_node):
    """issue 14, finding 12: at each drain deadline, 16 keep-alive connections
    are each sending a request every 2 ms. Ending them between requests with a
    reset lost requests already on the wire; the drain must end each one the
    way HTTP/1.1 allows (``Connection: close`` on a response, the client closes)."""
    node = busy_node
    stop_file = node.root / "stop-load"
    load = node.spawn(
        ["ip", "netns", "exec", node.endpoint("tiefighter").netns, sys.executable, "-c"]
        + [BUSY_CLIENT, node.ip("deathstar"), str(stop_file), str(BUSY_KEEPALIVE)],
        "load running",
        "busy-load",
    )
    timeline: list[tuple[str, float]] = []
    try:
        time.sleep(1.0)  # load against the first agent alone
        for _ in range(BUSY_TAKEOVERS):
            old = node.agent
            timeline.append(("successor started", time.time()))
            new = _successor(node, "--drain-timeout", str(BUSY_DRAIN_SECONDS))
            node.wait_status(lambda s, pid=new.pid: s and s["pid"] == pid, what="the successor")
            assert old.wait(timeout=BUSY_DRAIN_SECONDS + 20) == 0
            timeline.append(("old agent gone", time.time()))
            time.sleep(1.0)  # the successor alone, before it is replaced in turn
    finally:
        stop_file.touch()
        load.wait(timeout=30)

    summary = json.loads((node.root / "busy-load.log").read_text().splitlines()[-1])
    drains = _drain_reports(node)
    print("load:", {k: v for k, v in summary.items() if k != "failures"})
    print("drains:", drains)
    failures = summary["failures"]
    assert failures == [], (len(failures), failures[:5], drains, timeline)
    assert len(drains) == BUSY_TAKEOVERS
    assert [d["cut"] for d in drains] == [0] * BUSY_TAKEOVERS
    assert summary["ok"] > 1000 and summary["denied"] > 100 and summary["downloads"] > 3
    # Each takeover ended the old agent's keep-alive connections: they were replaced.
    assert summary["keepalive_connections"] >= BUSY_KEEPALIVE * (BUSY_TAKEOVERS + 1)
