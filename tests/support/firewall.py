"""Run the real ``l7proxy firewall`` as a subprocess in front of a test server.

    with running_firewall(POLICY_YAML, upstream=("127.0.0.1", port), labels={"app": "api"}) as fw:
        requests.get(f"http://{fw.host}:{fw.port}/")
        assert fw.flows()[-1]["verdict"] == "FORWARDED"

The subprocess is the shipped command line, not an in-process shortcut, so
tests exercise what users run. It is always killed on exit.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from l7proxy.observe.flowlog import read_records
from tests.support import REPO

# A protected service (labels app=api) that the host may send GET requests, on {port}.
GET_ONLY_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
      rules:
        http:
        - method: GET
"""


class RunningFirewall:
    def __init__(
        self,
        proc: subprocess.Popen,
        host: str,
        port: int,
        flowlog: Path,
        policy: Path,
        workdir: Path,
    ):
        self.proc = proc
        self.host = host
        self.port = port
        self.flowlog = flowlog
        self.policy = policy
        self.workdir = workdir

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def flows(self, wait_for: int = 0, timeout: float = 5.0) -> list[dict]:
        """Flow records so far; with ``wait_for``, wait until at least that many exist."""
        deadline = time.monotonic() + timeout
        while True:
            # What ``l7proxy observe`` reads: whole lines only (the log is appended
            # in batches, and its last line may be half written).
            records = list(read_records(self.flowlog))
            if len(records) >= wait_for or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def wait_flows(
        self,
        keep: Callable[[dict], bool],
        *,
        count: int = 1,
        since: int = 0,
        timeout: float = 10.0,
    ) -> list[dict]:
        """The records from the ``since``-th on that ``keep`` selects, once there are
        ``count`` of them: the log is written in batches, and an earlier test's
        records may land late. After ``timeout``, what there is (the caller's
        assertions say what is missing)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.flows()[since:] if keep(r)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def replace_policy(self, text: str) -> None:
        """Rewrite the policy file in place (the firewall polls and reloads)."""
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.policy)

    def stderr_text(self) -> str:
        return self._stderr.read_text() if hasattr(self, "_stderr") else ""


@contextmanager
def running_firewall(
    policy_yaml: str,
    upstream: tuple[str, int],
    labels: dict[str, str],
    *,
    extra_args: list[str] = (),
    listen_host: str = "127.0.0.1",
):
    workdir = Path(tempfile.mkdtemp(prefix="l7fw-"))
    policy = workdir / "policy.yaml"
    policy.write_text(policy_yaml)
    flowlog = workdir / "flows.jsonl"
    stderr = workdir / "stderr.log"
    argv = [
        sys.executable,
        "-m",
        "l7proxy",
        "firewall",
        "--listen",
        f"{listen_host}:0",
        "--upstream",
        f"{upstream[0]}:{upstream[1]}",
        "--labels",
        ",".join(f"{k}={v}" for k, v in labels.items()),
        "--policy",
        str(policy),
        "--flowlog",
        str(flowlog),
        *extra_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, env=env, text=True
        )
    try:
        try:
            line = _read_ready_line(proc, timeout=20)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{stderr.read_text()}") from None
        hostport = line.rsplit(" ", 1)[-1]
        host, _, port = hostport.rpartition(":")
        fw = RunningFirewall(proc, host, int(port), flowlog, policy, workdir)
        fw._stderr = stderr
        yield fw
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _read_ready_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"firewall exited with {proc.returncode} before listening")
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if "listening on" in line:
                return line.strip()
    raise RuntimeError("firewall did not report listening in time")
