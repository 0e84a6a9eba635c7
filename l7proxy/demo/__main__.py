"""``make demo``: Cilium's Star Wars scenario, for real, on this machine.

Three endpoints in their own network namespaces, the real agent (BPF
datapath + transparent proxy) as a subprocess, curl as the client, and the
three stages of the getting-started guide. Every stage prints what was tried,
what happened and the flow-log lines that explain it; the run ends with a
table of expected against observed outcomes and exits non-zero on any
difference. Everything is removed afterwards, also on Ctrl-C or SIGTERM.

``--ui ADDR:PORT`` (``make demo-ui``) runs the agent with its web UI there and,
after the stages, keeps the ships flying under the stage 3 policy until Ctrl-C,
so that a person can watch the service map and the flows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from l7proxy.node import netns
from l7proxy.node.endpoints import add_endpoint, delete_all
from l7proxy.node.store import EndpointRecord, Store
from l7proxy.observe.flowlog import format_record

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
SHIPS = {
    "deathstar": {"org": "empire", "class": "deathstar"},
    "tiefighter": {"org": "empire", "class": "tiefighter"},
    "xwing": {"org": "alliance", "class": "xwing"},
}


def say(text: str = "") -> None:
    print(text, flush=True)


def report(results: list[tuple[str, str, str, str]]) -> bool:
    """The expected-against-observed table (stage, attempt, expected, observed);
    True if every outcome is the expected one."""
    say("\n== Expected against observed")
    width = max(len(r[1]) for r in results)
    say(f"  {'stage':<12} {'attempt':<{width}}  {'expected':<18} {'observed':<18} ok")
    ok_all = True
    for stage, attempt, expected, observed in results:
        ok = expected == observed
        ok_all &= ok
        say(
            f"  {stage:<12} {attempt:<{width}}  {expected:<18} {observed:<18} "
            f"{'yes' if ok else 'NO'}"
        )
    say(
        "\nAll outcomes as expected."
        if ok_all
        else "\nSOME OUTCOMES DIFFER FROM WHAT WAS EXPECTED."
    )
    return ok_all


class Demo:
    def __init__(self, ui: str | None = None) -> None:
        self.ui = ui  # ADDR:PORT of the agent's web UI, or None
        self.root = Path(tempfile.mkdtemp(prefix="l7proxy-demo-"))
        self.store = Store(self.root / "state")
        self.procs: list[subprocess.Popen] = []
        self.results: list[tuple[str, str, str, str]] = []
        self.flow_offset = 0

    # ---------------------------------------------------------------- plumbing

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, "-m", "l7proxy", "--state-dir", str(self.store.root), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
        )

    def start(
        self, argv: list[str], ready: str, log: Path, timeout: float = 30
    ) -> subprocess.Popen:
        out = open(log, "w")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in log.read_text():
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited early:\n{log.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {ready!r}:\n{log.read_text()}")

    def endpoint(self, name: str) -> EndpointRecord:
        record = self.store.read().endpoint(name)
        if record is None:
            raise RuntimeError(f"endpoint {name} is gone from {self.store.root}")
        return record

    def curl(self, ship: str, method: str, path: str) -> tuple[str, str]:
        ip = self.endpoint("deathstar").ip
        ns = self.endpoint(ship).netns
        argv = [
            "curl",
            "-s",
            "-m",
            "3",
            "-w",
            "\\n%{http_code}",
            f"-X{method}",
            f"http://{ip}{path}",
        ]
        say(f"  $ {ship}: curl -s -X{method} http://deathstar{path}")
        run = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
        if run.returncode == 28:
            say("    -> no answer (timed out after 3 s)")
            return "timeout", ""
        body, _, code = run.stdout.rpartition("\n")
        say(f"    -> HTTP {code}: {body.strip()}")
        return code, body.strip()

    def kernel_denied(self) -> int:
        status = json.loads(self.cli("status", "--json").stdout or "{}")
        return int(status.get("datapath", {}).get("counters", {}).get("total", {}).get("denied", 0))

    def flows_since_last(self) -> list[dict]:
        time.sleep(1.3)  # the agent flushes its flow log every second
        path = self.store.flowlog
        lines = path.read_text().splitlines() if path.exists() else []
        new, self.flow_offset = lines[self.flow_offset :], len(lines)
        return [json.loads(line) for line in new if line.strip()]

    def check(self, stage: str, attempt: str, expected: str, observed: str) -> None:
        self.results.append((stage, attempt, expected, observed))

    def show_flows(self) -> None:
        records = self.flows_since_last()
        say("  flow log:" if records else "  flow log: (no records)")
        for rec in records[-6:]:
            say("    " + format_record(rec))

    # ---------------------------------------------------------------- scenario

    def run(self) -> bool:
        say("== Setting up: three endpoints, each in its own network namespace")
        for name, labels in SHIPS.items():
            rec = add_endpoint(self.store, name, labels)
            say(
                f"  {name:<10} {rec.ip:<15} netns {rec.netns:<24} labels "
                f"{','.join(f'{k}={v}' for k, v in labels.items())}"
            )
        ds = self.endpoint("deathstar")
        self.start(
            ["ip", "netns", "exec", ds.netns, PY, "-m", "l7proxy.demo.deathstar", "--port", "80"],
            "deathstar ready",
            self.root / "deathstar.log",
        )
        say("  deathstar serves HTTP on port 80 (POST /v1/request-landing, PUT /v1/exhaust-port)")
        agent = self.start(
            [
                PY,
                "-m",
                "l7proxy",
                "--state-dir",
                str(self.store.root),
                "run",
                *(["--ui", self.ui] if self.ui else []),
            ],
            "agent running",
            self.root / "agent.log",
        )
        say(
            f"  agent started (pid {agent.pid}): BPF datapath attached, transparent proxy listening"
        )

        say("\n== Stage 1: no policy. Both ships can land.")
        for ship in ("tiefighter", "xwing"):
            code, body = self.curl(ship, "POST", "/v1/request-landing")
            self.check(
                "1 no policy",
                f"{ship} POST /v1/request-landing",
                "landed",
                "landed" if code == "200" and "landed" in body else f"{code} {body}",
            )
        self.show_flows()

        say("\n== Stage 2: L3/L4 policy rule1: only org=empire may reach deathstar on TCP/80")
        say("  $ l7proxy policy import policies/sw-l3-l4.yaml")
        self.import_policy("policies/sw-l3-l4.yaml")
        before = self.kernel_denied()
        code, body = self.curl("tiefighter", "POST", "/v1/request-landing")
        self.check(
            "2 L3/L4",
            "tiefighter POST /v1/request-landing",
            "landed",
            "landed" if code == "200" and "landed" in body else f"{code} {body}",
        )
        code, body = self.curl("xwing", "POST", "/v1/request-landing")
        self.check(
            "2 L3/L4",
            "xwing POST /v1/request-landing",
            "timeout",
            "timeout" if code == "timeout" else f"{code} {body}",
        )
        time.sleep(1.2)
        after = self.kernel_denied()
        say(f"  kernel drop counter: {before} -> {after}")
        self.check(
            "2 L3/L4",
            "kernel drop counter rises",
            "rises",
            "rises" if after > before else f"{before} -> {after}",
        )
        self.show_flows()

        say(
            "\n== Stage 3: L7 policy: the same rule, plus rules.http [{method: POST, path: "
            "/v1/request-landing}]"
        )
        say("  $ l7proxy policy import policies/sw-l3-l4-l7.yaml")
        self.import_policy("policies/sw-l3-l4-l7.yaml")
        code, body = self.curl("tiefighter", "POST", "/v1/request-landing")
        self.check(
            "3 L7",
            "tiefighter POST /v1/request-landing",
            "landed",
            "landed" if code == "200" and "landed" in body else f"{code} {body}",
        )
        code, body = self.curl("tiefighter", "PUT", "/v1/exhaust-port")
        self.check("3 L7", "tiefighter PUT /v1/exhaust-port", "403 Access denied", f"{code} {body}")
        code, body = self.curl("xwing", "POST", "/v1/request-landing")
        self.check(
            "3 L7",
            "xwing POST /v1/request-landing",
            "timeout",
            "timeout" if code == "timeout" else f"{code} {body}",
        )
        self.show_flows()
        return self.report()

    def keep_flying(self) -> None:
        """Until Ctrl-C: every few seconds the ships try again (landing, the exhaust
        port, the X-wing that the kernel drops), for the UI to show."""
        log = (self.root / "agent.log").read_text()
        url = next((line.split(" on ", 1)[1] for line in log.splitlines() if " UI on " in line), "")
        say(f"\n== The web UI: {url}")
        say("  The ships keep flying under the stage 3 policy. Ctrl-C stops and cleans up.")
        ip = self.endpoint("deathstar").ip
        tries = [
            ("tiefighter", "POST", "/v1/request-landing"),
            ("tiefighter", "PUT", "/v1/exhaust-port"),
            ("tiefighter", "GET", "/v1/"),
            ("xwing", "POST", "/v1/request-landing"),
        ]
        rounds = 0
        while True:
            for ship, method, path in tries:
                ns = self.endpoint(ship).netns
                argv = [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "1",
                    f"-X{method}",
                    f"http://{ip}{path}",
                ]
                subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True)
            rounds += 1
            if rounds % 10 == 1:
                say(f"  {rounds} rounds of traffic so far; the UI is at {url}")
            time.sleep(2)

    def import_policy(self, path: str) -> None:
        run = self.cli("policy", "import", "--replace", str(REPO / path))
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        time.sleep(1.0)  # the agent notices the change within 0.2 s and updates the maps in place

    def report(self) -> bool:
        return report(self.results)

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.store.exists():
            delete_all(self.store)
        shutil.rmtree(self.root, ignore_errors=True)
        say("cleaned up: agent stopped, endpoints and namespaces removed")


def main() -> int:
    from l7proxy.datapath.loader import kernel_support

    parser = argparse.ArgumentParser(prog="python -m l7proxy.demo")
    parser.add_argument(
        "--ui",
        metavar="ADDR:PORT",
        help="run the agent with its web UI here and keep the traffic going until Ctrl-C",
    )
    args = parser.parse_args()

    problem = kernel_support()
    if problem:
        say(f"The demo needs the kernel datapath: {problem}.")
        return 2
    if shutil.which("curl") is None:
        say("The demo needs curl (make demo installs it).")
        return 2
    # SIGTERM gets the same clean-up as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    netns.ensure_forwarding()
    demo = Demo(ui=args.ui)
    try:
        ok = demo.run()
        if args.ui:
            try:
                demo.keep_flying()
            except KeyboardInterrupt:  # how a person ends it: not a failure
                say("\nstopped")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        demo.cleanup()


if __name__ == "__main__":
    sys.exit(main())
