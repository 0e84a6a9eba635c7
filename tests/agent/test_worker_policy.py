"""What the agent says to one ``run --workers`` worker, and what it answers.

A real worker process (``python -m l7proxy run --worker-of …``) on a listening
socket of ours, driven through ``AgentWorkers`` as the agent drives it: the
first policy before it listens, a policy it cannot apply (a TLS secret that is
not there: it keeps the last one and says why), a good one again, and the
drain that ends it. The datapath is not needed: the worker only proxies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
from pathlib import Path

from l7proxy.agent.workers import AgentWorkers
from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_text
from l7proxy.proxy.server import make_listener
from tests.support import REPO

PLAIN = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET}]
"""
# The same, terminating TLS with a secret the worker's secrets directory lacks.
TERMINATING = PLAIN.replace(
    '    - ports: [{port: "80", protocol: TCP}]\n',
    '    - ports: [{port: "80", protocol: TCP}]\n'
    "      terminatingTLS: {secret: {name: missing-cert}}\n",
)


def compiled(text: str, revision: int):
    identities = IdentityAllocator()
    api = Endpoint(
        1, "api", identities.for_labels({"app": "api"}), ipaddress.IPv4Address("10.3.0.1")
    )
    return compile_policy(load_text(text), [api], identities, revision=revision)


async def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_worker_applies_each_policy_keeps_the_last_good_one_and_drains(
    tmp_path: Path, monkeypatch
):
    state_dir = tmp_path / "state"
    sock = make_listener("127.0.0.1", 0, reuse_port=True)

    def command(worker: int, families: list[str], fds: list[int]) -> list[str]:
        spec = ",".join(f"{f}={fd}" for f, fd in zip(families, fds, strict=True))
        return [sys.executable, "-m", "l7proxy", "--state-dir", str(state_dir), "run"] + [
            "--tls-secrets-dir",
            str(tmp_path / "secrets"),
            "--worker-of",
            spec,
            "--worker-id",
            str(worker),
        ]

    monkeypatch.chdir(REPO)  # python -m l7proxy: this checkout
    workers = AgentWorkers({"http": [sock]}, 1, command)
    try:
        assert await workers.start(compiled(PLAIN, 1))
        await wait_for(lambda: workers.applied.get(0) == 1, "revision 1 applied")
        assert workers.in_sync and workers.serving
        (pid,) = [w["pid"] for w in workers.status()]

        workers.publish(compiled(TERMINATING, 2))
        await wait_for(lambda: 0 in workers.rejected, "revision 2 refused")
        assert workers.rejected[0].startswith("2: ")
        assert "missing-cert" in workers.rejected[0]
        assert workers.applied[0] == 1 and not workers.in_sync  # the last good one stays
        assert workers.status()[0]["policy_error"] == workers.rejected[0]

        workers.publish(compiled(PLAIN, 3))
        await wait_for(lambda: workers.applied.get(0) == 3, "revision 3 applied")
        assert workers.in_sync and 0 not in workers.rejected
        assert [w["pid"] for w in workers.status()] == [pid]  # the same process throughout

        report = await workers.drain(2.0, asyncio.Event())
        assert report == {
            "connections": 0,
            "closed_by_client": 0,
            "reset_after_reply": 0,
            "quiet_reset": 0,
            "cut": 0,
        }
        assert workers.drained == {0: report}
        assert workers.supervisor.workers[0].proc.returncode == 0
    finally:
        await workers.stop()
        sock.close()
