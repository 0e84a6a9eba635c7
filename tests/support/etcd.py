"""A real etcd (Debian's ``etcd-server``, 3.4) for the tests, its data on tmpfs.

    with running_etcd() as etcd:          # or the ``etcd`` fixture of tests/cluster
        etcd.host, etcd.port               # a client port that was free
        etcd.restart()                     # stop and start again on the same data
        etcd.compact()                     # compact away all history up to now

Each server gets its own data directory under /dev/shm and two free ports;
it is stopped, and its data removed, when the context exits, however it exits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
TMPFS = Path("/dev/shm")


def available() -> str | None:
    """None if etcd can run here, else why not (for pytest.skip)."""
    if not os.access(ETCD, os.X_OK):
        return f"no etcd at {ETCD}: install Debian's etcd-server (scripts/setup.sh does)"
    if not TMPFS.is_dir():
        return f"no tmpfs at {TMPFS} for etcd's data"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EtcdServer:
    data: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.data.with_suffix(".log")

    def argv(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            ETCD,
            "--name=test",
            f"--data-dir={self.data}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=warn",
            "--log-outputs=stderr",
        ]

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "etcd is already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"etcd did not become healthy on {self.endpoint}:\n{tail}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=0.5) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        """Stop (SIGTERM, or SIGKILL with ``kill``) and start again on the same data."""
        self.stop(kill=kill)
        if down_for:
            time.sleep(down_for)
        self.start()

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [ETCDCTL, f"--endpoints={self.endpoint}", *args],
            env=dict(os.environ, ETCDCTL_API="3"),
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def revision(self) -> int:
        status = json.loads(self.ctl("endpoint", "status", "-w", "json"))
        return int(status[0]["Status"]["header"]["revision"])

    def compact(self) -> int:
        """Compact all history up to the current revision; returns that revision."""
        revision = self.revision()
        self.ctl("compaction", "--physical", str(revision))
        return revision


@contextmanager
def running_etcd(host: str = "127.0.0.1") -> Iterator[EtcdServer]:
    """``host``: the address to listen on (a test cluster's bridge, for its nodes)."""
    data = Path(tempfile.mkdtemp(prefix="l7proxy-etcd-", dir=TMPFS))
    server = EtcdServer(data, host=host)
    try:
        server.start()
        yield server
    finally:
        server.stop(kill=True)
        shutil.rmtree(data, ignore_errors=True)
        server.log.unlink(missing_ok=True)
