"""nghttp and h2load (nghttp2-client) through the firewall to nghttpd (nghttp2-server), h2c."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

from tests.support.firewall import running_firewall
from tests.support.h2c_server import h2c_server

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("nghttp", "h2load", "nghttpd")),
    reason="needs nghttp2-client and nghttp2-server (apt)",
)

LABELS = {"app": "static"}
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: static-site}}
spec:
  endpointSelector: {{matchLabels: {{app: static}}}}
  ingress:
    - toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
            http:
              - {{method: GET, path: "/public/.*"}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def nghttpd(docroot) -> int:
    port = free_port()
    proc = subprocess.Popen(
        ["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", str(docroot), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("nghttpd did not start")
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    docroot = tmp_path_factory.mktemp("htdocs")
    (docroot / "public").mkdir()
    (docroot / "public" / "small.txt").write_bytes(b"hello over h2c\n")
    (docroot / "public" / "big.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    (docroot / "private.txt").write_bytes(b"secret\n")
    with (
        nghttpd(docroot) as port,
        running_firewall(POLICY.format(port=port), ("127.0.0.1", port), LABELS) as fw,
    ):
        yield docroot, port, fw


def nghttp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nghttp", *args], capture_output=True, timeout=60)


def test_nghttp_downloads_identically_through_the_proxy(site):
    docroot, port, fw = site
    for path in ("/public/small.txt", "/public/big.bin"):
        direct = nghttp(f"http://127.0.0.1:{port}{path}")
        proxied = nghttp(f"http://{fw.host}:{fw.port}{path}")
        assert proxied.returncode == 0, proxied.stderr
        assert proxied.stdout == direct.stdout == (docroot / path.lstrip("/")).read_bytes()


def test_nghttp_denied_path_gets_403(site):
    _, port, fw = site
    direct = nghttp(f"http://127.0.0.1:{port}/private.txt")
    assert direct.stdout == b"secret\n"
    verbose = nghttp("-v", f"http://{fw.host}:{fw.port}/private.txt")
    assert b":status: 403" in verbose.stdout
    assert verbose.stdout.rstrip().endswith(b"Access denied") or b"Access denied" in verbose.stdout


def test_nghttp_many_concurrent_streams_on_one_connection(site):
    docroot, _, fw = site
    # nghttp fetches a repeated URI once: make each one distinct.
    urls = [f"http://{fw.host}:{fw.port}/public/small.txt?n={i}" for i in range(50)]
    urls += [f"http://{fw.host}:{fw.port}/private.txt?n={i}" for i in range(10)]
    result = nghttp("-v", *urls)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b":status: 200") == 50
    assert result.stdout.count(b":status: 403") == 10


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize(
    "stream_window",
    [2**31 - 1, 0],
    ids=["windows-wide-open-and-reads-nothing", "a-connection-window-and-no-stream-window"],
)
def test_a_client_that_reads_nothing_does_not_grow_the_proxys_memory(site, stream_window):
    # The client opens its connection window as wide as HTTP/2 allows and asks for
    # 96 copies of a 256 MiB file at once, then reads nothing. With stream windows
    # as wide, the server may send gigabytes: the proxy stops reading it once its
    # write buffer toward the client is full. With stream windows shut, the
    # server may fill the relay's buffer on every stream: the connection cap
    # (4 MiB) stops it, not 96 x 1 MiB.
    docroot, _, fw = site
    with open(docroot / "public" / "huge.bin", "wb") as huge:
        huge.truncate(256 << 20)
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.local_settings = Settings(
        client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: stream_window}
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    for n in range(96):
        request = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"static"),
            (b":path", f"/public/huge.bin?n={n}".encode()),
        ]
        conn.send_headers(1 + 2 * n, request, end_stream=True)
    before = rss(fw.proc.pid)
    with socket.create_connection((fw.host, fw.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(conn.data_to_send())
        time.sleep(3)  # the server sends as long as anything reads it
        grown = rss(fw.proc.pid) - before
    assert grown < 12 << 20, f"the proxy grew by {grown >> 20} MiB"


def h2load_summary(output: str) -> dict[str, int]:
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", output
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    assert m and codes, output
    return {
        "total": int(m[1]),
        "done": int(m[3]),
        "succeeded": int(m[4]),
        "failed": int(m[5]),
        "2xx": int(codes[1]),
        "4xx": int(codes[3]),
    }


def test_h2load_all_requests_complete(site):
    _, _, fw = site
    run = subprocess.run(
        [
            "h2load",
            "-n",
            "2000",
            "-c",
            "4",
            "-m",
            "32",
            f"http://{fw.host}:{fw.port}/public/small.txt",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = h2load_summary(run.stdout)
    assert summary == {
        "total": 2000,
        "done": 2000,
        "succeeded": 2000,
        "failed": 0,
        "2xx": 2000,
        "4xx": 0,
    }


def test_h2load_mixed_allowed_and_denied(site):
    _, _, fw = site
    base = f"http://{fw.host}:{fw.port}"
    run = subprocess.run(
        [
            "h2load",
            "-n",
            "400",
            "-c",
            "2",
            "-m",
            "16",
            f"{base}/public/small.txt",
            f"{base}/private.txt",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = h2load_summary(run.stdout)
    assert summary["done"] == 400 and summary["2xx"] == 200 and summary["4xx"] == 200


def test_nghttp_h2c_upgrade_through_the_proxy():
    """HTTP/1.1 Upgrade: h2c, the first request judged as HTTP/1.1 and the rest as HTTP/2.

    nghttpd does not do the upgrade (it speaks HTTP/2 first), hence tests.support.h2c_server.
    """
    with (
        h2c_server() as port,
        running_firewall(POLICY.format(port=port), ("127.0.0.1", port), LABELS) as fw,
    ):
        direct = nghttp(
            "-u", f"http://127.0.0.1:{port}/public/a", f"http://127.0.0.1:{port}/public/b"
        )
        assert direct.stdout == b"h2c /public/a\nh2c /public/b\n"
        proxied = nghttp(
            "-u", f"http://{fw.host}:{fw.port}/public/a", f"http://{fw.host}:{fw.port}/public/b"
        )
        assert proxied.returncode == 0, proxied.stderr
        assert proxied.stdout == direct.stdout
        versions = sorted((r["l7"]["path"], r["l7"]["version"]) for r in fw.flows(wait_for=2))
        assert versions == [("/public/a", "1.1"), ("/public/b", "2")]
        # A refused upgrade request is answered as HTTP/1.1 and never upgraded.
        denied = nghttp("-uv", f"http://{fw.host}:{fw.port}/private")
        assert b"403" in denied.stdout and b"h2c /private" not in denied.stdout
