"""A real node for end-to-end tests: endpoints in namespaces + the real agent.

    with running_node({"deathstar": {...}, "tiefighter": {...}}) as node:
        node.serve_http("deathstar", 80)
        node.import_policy(POLICY)
        assert node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing").status == 200

Everything is created with names unique to this run (the agent's state dir
carries a random instance id) and removed in ``finally``, even when the test
fails or the agent died.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from l7proxy.observe.flowlog import read_records
from tests.support import REPO


def require_kernel() -> None:
    from l7proxy.datapath.loader import kernel_support

    problem = kernel_support()
    if problem:
        pytest.skip(f"needs the kernel datapath: {problem}")
    if shutil.which("curl") is None:
        pytest.skip("needs curl (scripts/setup.sh installs it)")


@dataclass
class CurlResult:
    status: int | None  # None: no answer (timed out / refused)
    body: str
    exit_code: int


L7PROXY = [sys.executable, "-m", "l7proxy"]


class Node:
    def __init__(self, root: Path, l7proxy: list[str] | None = None, cwd: Path = REPO):
        from l7proxy.node.store import Store

        self.root = root
        # How to run the agent and its CLI (an installed wheel's script, for instance).
        self.l7proxy = l7proxy or L7PROXY
        self.cwd = cwd
        self.store = Store(root / "state")
        self.procs: list[subprocess.Popen] = []
        self.agent: subprocess.Popen | None = None

    # ------------------------------------------------------------ processes

    def spawn(
        self, argv: list[str], ready: str | None, name: str, timeout: float = 30
    ) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True
            )
        self.procs.append(proc)
        if ready is None:
            return proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in log.read_text():
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"{name} not ready in {timeout}s:\n{log.read_text()}")

    def start_agent(self, *extra: str) -> subprocess.Popen:
        self.agent = self.spawn(
            [*self.l7proxy, "--state-dir", str(self.store.root), "run", *extra],
            "agent running",
            "agent",
        )
        self.wait_status(lambda s: s is not None)
        return self.agent

    def stop_agent(self, sig: int = signal.SIGTERM) -> int:
        proc, self.agent = self.agent, None
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=20)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        run = subprocess.run(
            [*self.l7proxy, "--state-dir", str(self.store.root), *args],
            capture_output=True,
            text=True,
            cwd=self.cwd,
        )
        if check and run.returncode != 0:
            raise AssertionError(f"l7proxy {' '.join(args)} failed: {run.stderr}")
        return run

    # ------------------------------------------------------------ endpoints and traffic

    def endpoint(self, name: str):
        return self.store.read().endpoint(name)

    def ip(self, name: str) -> str:
        return self.endpoint(name).ip

    def serve_http(self, name: str, port: int = 80) -> None:
        ns = self.endpoint(name).netns
        self.spawn(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "l7proxy.demo.deathstar",
                "--port",
                str(port),
            ],
            "deathstar ready",
            f"http-{name}",
        )

    def run_in(
        self, name: str, argv: list[str], timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.endpoint(name).netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def curl(
        self, src: str, method: str, dst: str, path: str, port: int = 80, timeout: float = 2.0
    ) -> CurlResult:
        run = self.run_in(
            src,
            [
                "curl",
                "-s",
                "-m",
                str(timeout),
                "-w",
                "\n%{http_code}",
                f"-X{method}",
                f"http://{self.ip(dst)}:{port}{path}",
            ],
        )
        body, _, code = run.stdout.rpartition("\n")
        status = int(code) if code.isdigit() and code != "000" else None
        return CurlResult(status, body.strip(), run.returncode)

    # ------------------------------------------------------------ policy and observation

    def import_policy(self, text: str, name: str = "policy") -> None:
        path = self.root / f"{name}.yaml"
        path.write_text(text)
        before = self.status()["policy_revision"]
        self.cli("policy", "import", "--replace", str(path))
        self.wait_status(
            lambda s: s and s["policy_revision"] > before, what="policy to take effect"
        )

    def status(self) -> dict | None:
        from l7proxy.agent.status import read_status

        return read_status(self.store)

    def wait_status(self, predicate, timeout: float = 15, what: str = "agent status") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def kernel_counter(self, name: str) -> int:
        # The agent publishes status once a second; wait for a fresh one.
        seen = self.status()["uptime_s"]
        status = self.wait_status(lambda s: s and s["uptime_s"] > seen)
        return int(status["datapath"]["counters"]["total"][name])

    def flows(self, wait_for=None, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            path = self.store.flowlog
            records = list(read_records(path))  # whole lines only, as ``observe``
            if wait_for is None or any(wait_for(r) for r in records) or time.monotonic() > deadline:
                return records
            time.sleep(0.1)

    # ------------------------------------------------------------ teardown

    def teardown(self) -> None:
        from l7proxy.node import netns
        from l7proxy.node.endpoints import delete_all

        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.store.exists():
            state = self.store.read()
            delete_all(self.store)
            netns.remove_proxy_routing(state.redirect_mark, state.route_table)
            shutil.rmtree(
                f"/sys/fs/bpf/l7proxy-{state.instance}", ignore_errors=True
            )  # pinned maps a killed agent left


@contextmanager
def running_node(
    endpoints: dict[str, dict[str, str]],
    *,
    start_agent: bool = True,
    l7proxy: list[str] | None = None,
    cwd: Path = REPO,
):
    from l7proxy.node.endpoints import add_endpoint

    require_kernel()
    root = Path(tempfile.mkdtemp(prefix="l7node-"))
    node = Node(root, l7proxy, cwd)
    try:
        for name, labels in endpoints.items():
            add_endpoint(node.store, name, labels)
        if start_agent:
            node.start_agent()
        yield node
    finally:
        node.teardown()
        shutil.rmtree(root, ignore_errors=True)
