"""``l7proxy run --ui``: the agent serves the UI for the node's endpoints, with the
kernel's drops on the map beside the proxy's L7 verdicts (namespaces, the BPF
datapath, the real agent, curl)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.support.node import running_node

pytestmark = pytest.mark.root

SHIPS = {
    "deathstar": {"org": "empire", "class": "deathstar", "io.kubernetes.pod.namespace": "empire"},
    "tiefighter": {"org": "empire", "class": "tiefighter", "io.kubernetes.pod.namespace": "empire"},
    "xwing": {"org": "alliance", "class": "xwing", "io.kubernetes.pod.namespace": "rebels"},
}
RULE1_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_the_agent_ui_maps_endpoints_by_namespace_and_explains_kernel_drops():
    with running_node(SHIPS, start_agent=False) as node:
        node.serve_http("deathstar", 80)
        node.start_agent("--ui", "127.0.0.1:0")
        log = (node.root / "agent.log").read_text()
        url = next(line.split(" on ", 1)[1] for line in log.splitlines() if " UI on " in line)
        assert get(url + "api/info")["mode"] == "agent"

        node.import_policy(RULE1_L7)
        assert node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing").status == 200
        assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
        assert node.curl("xwing", "POST", "deathstar", "/v1/request-landing").status is None

        deadline = time.monotonic() + 10
        while True:
            snapshot = get(url + "api/map")
            edges = {e["id"]: e for e in snapshot["edges"]}
            if "ep:xwing->ep:deathstar" in edges and len(snapshot["nodes"]) == 3:
                break
            assert time.monotonic() < deadline, snapshot
            time.sleep(0.3)
        groups = {n["id"]: n["group"] for n in snapshot["nodes"]}
        assert groups == {
            "ep:deathstar": "ns:empire",
            "ep:tiefighter": "ns:empire",
            "ep:xwing": "ns:rebels",
        }
        assert edges["ep:tiefighter->ep:deathstar"]["verdicts"] == {"FORWARDED": 1, "DENIED": 1}
        assert [(x["key"], x["verdicts"]) for x in edges["ep:tiefighter->ep:deathstar"]["l7"]] == [
            ("POST /v1/request-landing", {"FORWARDED": 1}),
            ("PUT /v1/exhaust-port", {"DENIED": 1}),
        ]
        xwing = edges["ep:xwing->ep:deathstar"]
        assert set(xwing["verdicts"]) == {"DROPPED"} and xwing["protocols"].keys() == {"tcp"}

        dropped = get(url + "api/flows?verdict=DROPPED")["flows"]
        assert dropped and {(r["source"].split(":")[0], r["destination"]) for r in dropped} == {
            ("xwing", "deathstar:80")
        }
        explained = get(url + f"api/flows/{dropped[0]['id']}")["explain"]
        assert explained["recorded"]["reason"] == "default-deny"
        trace = explained["trace"]["text"].splitlines()
        assert trace[-1].startswith("verdict: DROPPED (L3/L4: ")
        assert explained["trace"]["command"] == (
            "l7proxy policy trace --from "
            "class=xwing,io.kubernetes.pod.namespace=rebels,org=alliance --to "
            "class=deathstar,io.kubernetes.pod.namespace=empire,org=empire --port 80"
        )

        denied = get(url + "api/flows?verdict=DENIED&endpoint=tiefighter")["flows"]
        assert [r["summary"] for r in denied] == [f"PUT {node.ip('deathstar')}/v1/exhaust-port"]
        explained = get(url + f"api/flows/{denied[0]['id']}")["explain"]
        assert explained["trace"]["text"].splitlines()[-1] == (
            "verdict: DENIED by policy rule1 (no L7 rule matches)"
        )
