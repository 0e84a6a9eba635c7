"""End to end on this node: namespaces, the BPF datapath, the real agent, curl.

Each test builds its own endpoints (unique names), runs the real
``l7proxy run``, and removes everything afterwards, even on failure.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support.node import running_node

pytestmark = pytest.mark.root

SHIPS = {
    "deathstar": {"org": "empire", "class": "deathstar"},
    "tiefighter": {"org": "empire", "class": "tiefighter"},
    "xwing": {"org": "alliance", "class": "xwing"},
}
RULE1_L4 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
RULE1_L7 = RULE1_L4.replace(
    '    toPorts: [{ports: [{port: "80", protocol: TCP}]}]',
    '    toPorts:\n    - ports: [{port: "80", protocol: TCP}]\n      rules:\n        http: '
    "[{method: POST, path: /v1/request-landing}]",
)
OPEN_L7 = RULE1_L7.replace("{method: POST, path: /v1/request-landing}", "{path: /v1/.*}")


@pytest.fixture
def node():
    with running_node(SHIPS) as n:
        n.serve_http("deathstar", 80)
        yield n


def test_no_policy_means_no_proxy_and_everyone_lands(node):
    for ship in ("tiefighter", "xwing"):
        reply = node.curl(ship, "POST", "deathstar", "/v1/request-landing")
        assert reply.status == 200 and reply.body == f"Ship landed (seen from {node.ip(ship)})"
    assert node.status()["proxy"]["connections_total"] == 0  # never left the kernel


def test_l3_l4_drop_happens_in_the_kernel(node):
    node.import_policy(RULE1_L4)
    denied_before = node.kernel_counter("denied")

    xwing = node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=2)
    assert (xwing.status, xwing.exit_code) == (None, 28)  # curl: operation timed out

    assert node.kernel_counter("denied") > denied_before
    drops = node.flows(wait_for=lambda r: r["type"] == "drop")
    drop = next(r for r in drops if r["type"] == "drop")
    assert (drop["verdict"], drop["reason"]) == ("DROPPED", "default-deny")
    assert (
        drop["source"]["endpoint"],
        drop["destination"]["endpoint"],
        drop["destination"]["port"],
    ) == ("xwing", "deathstar", 80)
    # Replies of the allowed flow pass, and the proxy never saw any of it.
    tie = node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing")
    assert tie.status == 200
    assert node.status()["proxy"]["connections_total"] == 0


def test_l7_allow_and_deny_with_source_preserved(node):
    node.import_policy(RULE1_L7)

    landing = node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing")
    assert landing.status == 200
    assert (
        landing.body == f"Ship landed (seen from {node.ip('tiefighter')})"
    )  # the server sees the real client

    exhaust = node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port")
    assert (exhaust.status, exhaust.body) == (403, "Access denied")

    records = node.flows(wait_for=lambda r: r.get("verdict") == "DENIED")
    l7 = [r for r in records if r["type"] == "l7"]
    assert [
        (r["verdict"], r["l7"]["method"], r["l7"]["path"], r["reply"].get("status")) for r in l7
    ] == [
        ("FORWARDED", "POST", "/v1/request-landing", 200),
        ("DENIED", "PUT", "/v1/exhaust-port", 403),
    ]
    assert all(r["policy"] == "rule1" for r in l7)
    assert l7[0]["rule"] == "spec.ingress[0].toPorts[0].rules.http[0]"
    assert l7[0]["source"]["labels"] == {"org": "empire", "class": "tiefighter"}


KEEPALIVE_CLIENT = textwrap.dedent(
    """
    import http.client, sys
    conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
    for line in sys.stdin:
        method, path = line.split()
        conn.request(method, path)
        r = conn.getresponse()
        print(r.status, r.read().decode().strip(), flush=True)
    """
)


def test_policy_change_while_a_connection_stays_open(node):
    node.import_policy(RULE1_L7)
    client = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            node.endpoint("tiefighter").netns,
            sys.executable,
            "-c",
            KEEPALIVE_CLIENT,
            node.ip("deathstar"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        client.stdin.write("PUT /v1/exhaust-port\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "403 Access denied"

        node.import_policy(OPEN_L7)  # maps and proxy policy change in place

        client.stdin.write("PUT /v1/exhaust-port\n")
        client.stdin.flush()
        assert (
            client.stdout.readline().strip() == "503 Panic: deathstar exploded"
        )  # same connection, new policy
    finally:
        client.stdin.close()
        client.wait(timeout=10)
    assert client.returncode == 0
    l7 = [
        r
        for r in node.flows(wait_for=lambda r: r.get("verdict") == "FORWARDED")
        if r["type"] == "l7"
    ]
    assert [(r["verdict"], r["reply"]["status"]) for r in l7] == [
        ("DENIED", 403),
        ("FORWARDED", 503),
    ]
    assert l7[0]["source"]["port"] == l7[1]["source"]["port"]  # one connection


def test_proxy_gone_means_redirected_flows_fail_closed(node):
    node.import_policy(RULE1_L7)
    assert node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing").status == 200
    # Kill the agent outright: tc programs stay attached, the listener is gone.
    node.stop_agent(signal.SIGKILL)
    bypass = node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing", timeout=2)
    assert bypass.status is None  # refused or dropped, never let through to the server
    still_dropped = node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=2)
    assert still_dropped.status is None
    # A new agent replaces what the dead one left attached and serves again.
    node.start_agent()
    assert node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing").status == 200
    assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403


def test_agent_restart_finds_endpoints_and_policy_again(node):
    node.import_policy(RULE1_L7)
    identities = {e["name"]: e["identity"] for e in node.status()["endpoints"]}
    node.stop_agent()
    # Stopped cleanly: programs detached, no policy in force.
    assert node.curl("xwing", "POST", "deathstar", "/v1/request-landing").status == 200
    node.start_agent()
    assert {e["name"]: e["identity"] for e in node.status()["endpoints"]} == identities
    assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
    assert (
        node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=1.5).status is None
    )


def test_bad_policy_import_is_rejected_and_the_last_good_one_stays(node):
    node.import_policy(RULE1_L7)
    bad = node.root / "bad.yaml"
    bad.write_text(RULE1_L7.replace("method: POST", "method: '(POST'"))
    run = node.cli("policy", "import", "--replace", str(bad), check=False)
    assert run.returncode == 1
    assert f"{bad}: spec.ingress[0].toPorts[0].rules.http[0].method: invalid regex" in run.stderr
    assert node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port").status == 403
    assert [p["name"] for p in node.status()["policies"]] == ["rule1"]


def test_a_failing_test_still_removes_everything():
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, ".")
        from tests.support.node import running_node
        try:
            with running_node({"a": {"app": "a"}}, start_agent=True) as node:
                print(node.endpoint("a").netns, node.endpoint("a").host_ifname, flush=True)
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        """
    )
    from tests.support.node import REPO

    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert run.returncode == 0, run.stderr
    ns, ifname = run.stdout.split()
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode != 0


def test_audit_mode_logs_would_be_denials_and_lets_traffic_through(node):
    audited = RULE1_L7.replace(
        "metadata: {name: rule1}",
        'metadata: {name: rule1, annotations: {l7proxy.io/audit: "true"}}',
    )
    node.import_policy(audited)
    # L3/L4: the kernel marks the would-be drop as audited and passes the flow.
    assert node.curl("xwing", "POST", "deathstar", "/v1/request-landing").status == 200
    # L7: the request is judged, logged as AUDIT, and forwarded.
    exhaust = node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port")
    assert (exhaust.status, exhaust.body) == (503, "Panic: deathstar exploded")
    records = node.flows(wait_for=lambda r: r["type"] == "l7" and r["verdict"] == "AUDIT")
    kernel = [r for r in records if r["type"] == "drop"]
    assert kernel and all(r["verdict"] == "AUDIT" for r in kernel)
    assert kernel[0]["source"]["endpoint"] == "xwing"
    l7 = [r for r in records if r["type"] == "l7"]
    assert [(r["verdict"], r["l7"]["method"], r["reply"]["status"], r["policy"]) for r in l7] == [
        ("AUDIT", "PUT", 503, "rule1")
    ]
    assert node.kernel_counter("audited") >= 1


def test_l7_deny_rule_wins_over_an_allow_with_real_traffic(node):
    allow_all_but_deny_put = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-exhaust}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  ingressDeny:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: PUT, path: /v1/exhaust-port}]
"""
    node.import_policy(allow_all_but_deny_put)
    status = node.status()
    assert status["maps_in_sync"] and status["listeners_up"] and status["healthy"]
    # The L4 allow alone would let everything through; the L7 deny rule pulls the port into the
    # proxy.
    assert node.curl("tiefighter", "POST", "deathstar", "/v1/request-landing").status == 200
    denied = node.curl("tiefighter", "PUT", "deathstar", "/v1/exhaust-port")
    assert (denied.status, denied.body) == (403, "Access denied")
    records = node.flows(wait_for=lambda r: r.get("verdict") == "DENIED")
    deny = next(r for r in records if r.get("verdict") == "DENIED")
    assert (deny["policy"], deny["rule"]) == (
        "no-exhaust",
        "spec.ingressDeny[0].toPorts[0].rules.http[0]",
    )
    assert (
        node.curl("xwing", "POST", "deathstar", "/v1/request-landing", timeout=1.5).status is None
    )  # still L3 default deny
