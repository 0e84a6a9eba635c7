"""``policy suggest`` on a real node: Star Wars endpoints, the agent, its own flow log.

The firewall test (``tests/policy/test_suggest_e2e.py``) sees every client as the
host; here the clients are endpoints, so the suggestion names them by their labels
(``fromEndpoints``), and the kernel enforces L3/L4 for them once it is imported.
"""

from __future__ import annotations

import textwrap

import pytest
import yaml

from tests.support.node import running_node

pytestmark = pytest.mark.root

SHIPS = {
    "deathstar": {"org": "empire", "class": "deathstar"},
    "tiefighter": {"org": "empire", "class": "tiefighter"},
    "xwing": {"org": "alliance", "class": "xwing"},
    "ywing": {"org": "alliance", "class": "ywing"},
}
# Audit mode, every endpoint allowed at L3/L4 and every request parsed: the one L7
# rule allows GET /v1/, the rest is logged AUDIT and let through.
OBSERVE = textwrap.dedent(
    """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: observe-deathstar
      annotations: {l7proxy.io/audit: "true"}
    spec:
      endpointSelector: {matchLabels: {org: empire, class: deathstar}}
      ingress:
      - fromEndpoints: [{}]
        toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http: [{method: GET, path: /v1/}]
    """
)


def traffic(node) -> list[tuple[str, str, str, int | None]]:
    calls = [("tiefighter", "POST", "/v1/request-landing")] * 2 + [
        ("tiefighter", "GET", "/v1/"),
        ("xwing", "GET", "/v1/"),
        ("xwing", "GET", "/v1/"),
    ]
    return [(src, m, p, node.curl(src, m, "deathstar", p).status) for src, m, p in calls]


def test_suggest_from_the_agents_flow_log_names_peers_by_labels_and_enforces_them():
    with running_node(SHIPS) as node:
        node.serve_http("deathstar", 80)
        node.import_policy(OBSERVE)
        assert [status for *_, status in traffic(node)] == [200, 200, 200, 200, 200]
        node.flows(wait_for=lambda r: r["type"] == "l7" and r["source"]["endpoint"] == "xwing")

        out = node.root / "suggested.yaml"
        run = node.cli("policy", "suggest", "--direction", "both", "-o", str(out))
        assert "enforced: 10 of 10 allowed" in run.stderr  # each request, at both ends
        policies = {p["metadata"]["name"]: p["spec"] for p in yaml.safe_load_all(out.read_text())}
        assert sorted(policies) == [
            "suggested-deathstar",
            "suggested-tiefighter",
            "suggested-xwing",
        ]
        ingress = policies["suggested-deathstar"]["ingress"]
        assert [(i["fromEndpoints"], i["toPorts"][0]["rules"]["http"]) for i in ingress] == [
            (
                [{"matchLabels": {"class": "tiefighter", "org": "empire"}}],
                [
                    {"method": "GET", "path": "/v1/"},
                    {"method": "POST", "path": "/v1/request-landing"},
                ],
            ),
            (
                [{"matchLabels": {"class": "xwing", "org": "alliance"}}],
                [{"method": "GET", "path": "/v1/"}],
            ),
        ]
        [xwing_egress] = policies["suggested-xwing"]["egress"]
        assert xwing_egress["toEndpoints"] == [{"matchLabels": SHIPS["deathstar"]}]
        assert xwing_egress["toPorts"][0]["rules"]["http"] == [{"method": "GET", "path": "/v1/"}]

        node.import_policy(out.read_text(), name="suggested")
        assert [status for *_, status in traffic(node)] == [200, 200, 200, 200, 200]
        # Never observed: another request from a known peer (L7, the proxy's 403) ...
        exhaust = node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port")
        assert (exhaust.status, exhaust.body) == (403, "Access denied")
        landing = node.curl("xwing", "POST", "deathstar", "/v1/request-landing")
        assert (landing.status, landing.body) == (403, "Access denied")
        # ... a peer that never talked to the Death Star (its ingress, in the kernel), and
        # a ship calling where it never called (its own egress, in the kernel).
        assert node.curl("ywing", "GET", "deathstar", "/v1/").status is None
        assert node.curl("tiefighter", "GET", "xwing", "/v1/").status is None
        drops = node.flows(
            wait_for=lambda r: r["type"] == "drop" and r["source"]["endpoint"] == "tiefighter"
        )
        dropped = {
            (r["source"]["endpoint"], r["destination"]["endpoint"], r["direction"])
            for r in drops
            if r["type"] == "drop" and r["verdict"] == "DROPPED"
        }
        assert dropped >= {("ywing", "deathstar", "ingress"), ("tiefighter", "xwing", "egress")}
