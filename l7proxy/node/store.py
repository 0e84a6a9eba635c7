"""The agent's state directory: endpoints, identities, proxy ports, policies.

Everything an agent restart needs to find again lives here, so a restart
re-creates nothing. Read-modify-write goes through an flock so that the CLI
and a running agent never interleave writes.

    STATE/state.json     endpoints, identities, proxy ports, instance config
    STATE/policies/      imported policy files (the agent watches this dir)
    STATE/flows.jsonl    the flow log (rotated: flows.jsonl.N; .flows.jsonl.lock: its writers' lock)
    STATE/status.json    written by the running agent every second
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from l7proxy.policy.identity import IdentityAllocator

FAMILIES = ("http", "kafka", "cassandra", "tls")

# What an endpoint is: a namespace and veth we made (``endpoint add``), or a
# Kubernetes pod whose namespace and veth its CNI made (we only attach to it).
NETNS = "netns"
POD = "pod"


@dataclass
class EndpointRecord:
    name: str
    id: int
    labels: dict[str, str]
    ip: str
    netns: str  # "" for a pod: not ours
    host_ifname: str
    kind: str = NETNS


@dataclass
class AgentState:
    instance: str
    subnet: str
    proxy_mark: int
    redirect_mark: int
    route_table: int
    proxy_ports: dict[str, int]
    endpoints: list[EndpointRecord] = field(default_factory=list)
    identities: list[dict] = field(default_factory=list)

    def endpoint(self, name: str) -> EndpointRecord | None:
        return next((e for e in self.endpoints if e.name == name), None)

    def allocator(self) -> IdentityAllocator:
        alloc = IdentityAllocator()
        alloc.restore(self.identities)
        return alloc

    def next_ip(self) -> str:
        net = ipaddress.IPv4Network(self.subnet)
        used = {e.ip for e in self.endpoints}
        for host in list(net.hosts())[9:]:
            if str(host) not in used:
                return str(host)
        raise RuntimeError(f"no free address left in {self.subnet}")

    def next_id(self) -> int:
        return max((e.id for e in self.endpoints), default=0) + 1


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def policy_dir(self) -> Path:
        return self.root / "policies"

    @property
    def flowlog(self) -> Path:
        return self.root / "flows.jsonl"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def pid_file(self) -> Path:
        return self.root / "agent.pid"

    def exists(self) -> bool:
        return self.state_file.exists()

    @contextlib.contextmanager
    def locked(self) -> Iterator[AgentState]:
        """Read the state under an exclusive lock; write it back on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.policy_dir.mkdir(exist_ok=True)
        with open(self.root / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read() if self.exists() else self._fresh()
            yield state
            self._write(state)

    def read(self) -> AgentState:
        if not self.exists():
            with self.locked() as state:
                return state
        return self._read()

    def _read(self) -> AgentState:
        data = json.loads(self.state_file.read_text())
        data["endpoints"] = [EndpointRecord(**e) for e in data.get("endpoints", [])]
        return AgentState(**data)

    def _write(self, state: AgentState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
        os.replace(tmp, self.state_file)

    def _fresh(self) -> AgentState:
        # Unique per state dir, so two agents (or two test runs) never share
        # namespace names, marks, routing tables or addresses.
        rng = random.Random(secrets.randbits(64))
        instance = secrets.token_hex(2)
        slot = rng.randrange(1, 250)
        return AgentState(
            instance=instance,
            subnet=f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.0/24",
            proxy_mark=0x10000 * slot + 0x100,
            redirect_mark=0x10000 * slot + 0x200,
            route_table=20000 + slot,
            proxy_ports={fam: 0 for fam in FAMILIES},
        )
