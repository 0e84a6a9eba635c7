"""``pip install .`` into a fresh virtualenv, outside the checkout, gives a working product.

The wheel is built from a copy of the tracked files (so nothing in the work tree
leaks in), installed without its dependencies into a new venv whose only view of
them is a path entry to the test venv's site-packages (a plain path, so the
checkout's editable install is not loaded). Every command then runs from a
directory outside the checkout: the firewall answers real HTTP, and the agent
compiles the BPF program it ships and enforces an L7 policy between namespaces.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support import POLICIES, REPO
from tests.support.node import running_node


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The venv's bin/ directory, with l7proxy installed from its wheel."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in tracked)):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target, follow_symlinks=False)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                venv / "bin" / "python",
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(wheels), str(source)],
        check=True,
        cwd=root,
    )
    (wheel,) = wheels.glob("l7proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "l7proxy/datapath/sockmap.c" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        + ["install", "-q", "--no-deps", str(wheel)],
        check=True,
        cwd=root,
    )
    yield venv / "bin"


def outside_checkout(bin_dir: Path) -> Path:
    return bin_dir.parent.parent


def test_the_installed_package_is_imported_from_the_venv_not_the_checkout(installed: Path) -> None:
    where = subprocess.run(
        [installed / "python", "-c", "import l7proxy.datapath.loader as m; print(m.BPF_SOURCE)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=outside_checkout(installed),
    ).stdout.strip()
    program = Path(where)
    assert program.is_file() and not program.is_symlink()
    assert not program.is_relative_to(REPO)
    assert program.read_bytes() == (REPO / "bpf" / "sockmap.c").read_bytes()


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"hello from upstream"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


FIREWALL_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: wheel}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "UPSTREAM_PORT", protocol: TCP}]
      rules:
        http: [{method: GET, path: /public}]
"""


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply


def test_the_installed_firewall_forwards_and_denies(installed: Path, tmp_path: Path) -> None:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    policy = tmp_path / "policy.yaml"
    policy.write_text(FIREWALL_POLICY.replace("UPSTREAM_PORT", str(upstream.server_address[1])))
    argv = [str(installed / "l7proxy"), "firewall", "--listen", "127.0.0.1:0"]
    argv += ["--upstream", f"127.0.0.1:{upstream.server_address[1]}"]
    argv += ["--labels", "app=api", "--policy", str(policy), "--ui", "127.0.0.1:0"]
    firewall = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert firewall.stdout is not None
        line = firewall.stdout.readline()
        assert "listening on" in line, firewall.stderr.read() if firewall.stderr else line
        port = int(line.rsplit(":", 1)[1])
        ui = firewall.stdout.readline().strip().rsplit(" ", 1)[-1]  # "l7proxy UI on URL"
        page = urllib.request.urlopen(ui, timeout=10).read().decode()  # the package's static files
        script = urllib.request.urlopen(ui + "static/ui.js", timeout=10).read().decode()
        allowed = exchange(port, b"GET /public HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        denied = exchange(port, b"GET /admin HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    finally:
        firewall.terminate()
        firewall.wait(timeout=10)
        upstream.shutdown()
    assert allowed.startswith(b"HTTP/1.1 200 ")
    assert allowed.endswith(b"hello from upstream")
    assert denied.startswith(b"HTTP/1.1 403 ")
    assert '<svg id="map"' in page and "new EventSource(" in script


SHIPS = {
    "deathstar": {"org": "empire", "class": "deathstar"},
    "tiefighter": {"org": "empire", "class": "tiefighter"},
}


@pytest.mark.root
def test_the_installed_agent_loads_its_bpf_program_and_enforces_l7(installed: Path) -> None:
    with running_node(
        SHIPS, l7proxy=[str(installed / "l7proxy")], cwd=outside_checkout(installed)
    ) as node:
        node.serve_http("deathstar")
        node.import_policy((POLICIES / "sw-l3-l4-l7.yaml").read_text())
        landing = node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing")
        exhaust = node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port")
        assert node.status()["datapath"]["loaded"]
    assert landing.status == 200
    assert exhaust.status == 403
