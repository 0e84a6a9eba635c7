"""``l7proxy policy trace``, run as users run it: the real CLI in a subprocess.

The Star Wars policies from ``policies/`` decide; the trace must name the
rule that decided (or was considered and did not match) and why, and exit
0 (allowed), 1 (denied) or 2 (usage error).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import POLICIES, REPO

L7 = str(POLICIES / "sw-l3-l4-l7.yaml")
L3L4 = str(POLICIES / "sw-l3-l4.yaml")
DENY_ALLIANCE = str(POLICIES / "sw-deny-alliance.yaml")
CASSANDRA_RO = str(POLICIES / "cassandra-readonly.yaml")

DEATHSTAR = "org=empire,class=deathstar"
TIEFIGHTER = "org=empire,class=tiefighter"
XWING = "org=alliance,class=xwing"
LANDING_RULE = "spec.ingress[0].toPorts[0].rules.http[0]"


def trace(*args: str, state_dir: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "l7proxy"]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return subprocess.run(
        [*argv, "policy", "trace", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def trace_json(*args: str, state_dir: Path | None = None) -> tuple[int, dict]:
    run = trace(*args, "--json", state_dir=state_dir)
    assert run.returncode in (0, 1), run.stderr
    return run.returncode, json.loads(run.stdout)


# --------------------------------------------------------------------------- Star Wars


def test_tiefighter_landing_is_allowed_by_the_landing_rule():
    run = trace(
        "--policy",
        L7,
        "--from",
        TIEFIGHTER,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "POST /v1/request-landing deathstar",
    )
    assert run.returncode == 0, run.stderr
    assert "verdict: FORWARDED by policy rule1 rule " + LANDING_RULE in run.stdout
    assert f"rule1 {LANDING_RULE} [POST /v1/request-landing]: MATCH" in run.stdout

    code, result = trace_json(
        "--policy",
        L7,
        "--from",
        TIEFIGHTER,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "POST /v1/request-landing deathstar",
    )
    assert code == 0
    assert result["verdict"] == {
        "verdict": "FORWARDED",
        "allowed": True,
        "policy": "rule1",
        "rule": LANDING_RULE,
        "reason": result["verdict"]["reason"],
    }
    assert result["l3l4"]["allowed"] and result["l3l4"]["parser"] == "http"
    [ingress] = [d for d in result["l3l4"]["directions"] if d["direction"] == "ingress"]
    assert ingress["allowed"] and ingress["reason"] == "allowed by rule1 spec.ingress[0]"
    [l7] = result["l7"]
    assert l7["request"] == {
        "protocol": "http",
        "method": "POST",
        "path": "/v1/request-landing",
        "host": "deathstar",
        "version": "1.1",
    }


def test_exhaust_port_is_denied_naming_the_rule_considered_and_why_it_did_not_match():
    run = trace(
        "--policy",
        L7,
        "--from",
        TIEFIGHTER,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "PUT /v1/exhaust-port",
    )
    assert run.returncode == 1, run.stderr
    considered = [line for line in run.stdout.splitlines() if LANDING_RULE in line]
    assert len(considered) == 1
    assert "no match" in considered[0]
    assert "method 'PUT' does not match 'POST'" in considered[0]
    assert "path '/v1/exhaust-port' does not match '/v1/request-landing'" in considered[0]
    assert run.stdout.rstrip().endswith("verdict: DENIED by policy rule1 (no L7 rule matches)")

    code, result = trace_json(
        "--policy",
        L7,
        "--from",
        TIEFIGHTER,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "PUT /v1/exhaust-port",
    )
    assert code == 1
    assert result["verdict"]["verdict"] == "DENIED" and result["verdict"]["policy"] == "rule1"
    # L3/L4 let it through to the proxy: the denial is an L7 one.
    assert result["l3l4"]["allowed"] is True


def test_xwing_is_dropped_at_l3_l4_before_any_l7_rule():
    for policy in (L3L4, L7):
        code, result = trace_json(
            "--policy",
            policy,
            "--from",
            XWING,
            "--to",
            DEATHSTAR,
            "--port",
            "80",
            "--http",
            "POST /v1/request-landing",
        )
        assert code == 1
        assert result["verdict"]["verdict"] == "DROPPED"
        assert result["l7"] == []
        [ingress] = [d for d in result["l3l4"]["directions"] if d["direction"] == "ingress"]
        assert not ingress["allowed"]
        assert ingress["reason"] == "default deny: no rule allows this peer and port"
        assert ingress["trace"] == [
            "allow rule1 spec.ingress[0]: peer does not match, port matches"
        ]


def test_wrong_port_is_dropped_even_for_the_empire():
    code, result = trace_json(
        "--policy", L3L4, "--from", TIEFIGHTER, "--to", DEATHSTAR, "--port", "443"
    )
    assert code == 1 and result["verdict"]["verdict"] == "DROPPED"
    assert result["l3l4"]["directions"][0]["trace"] == [
        "allow rule1 spec.ingress[0]: peer matches, port does not match"
    ]


def test_l3_l4_policy_alone_forwards_every_request_unparsed():
    code, result = trace_json(
        "--policy",
        L3L4,
        "--from",
        TIEFIGHTER,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "PUT /v1/exhaust-port",
    )
    assert code == 0
    assert result["verdict"]["verdict"] == "FORWARDED"
    assert result["l3l4"]["parser"] is None
    assert result["l7"] == []


def test_deny_wins_over_an_allow_that_matches_the_same_peer():
    run = trace("--policy", DENY_ALLIANCE, "--from", XWING, "--to", DEATHSTAR, "--port", "80")
    assert run.returncode == 1
    # Both rules were considered for the X-wing: the allow matched, the deny won.
    assert "allow deny-alliance spec.ingress[0]: peer matches, port matches" in run.stdout
    assert "deny deny-alliance spec.ingressDeny[0]: peer matches, port matches" in run.stdout
    assert "verdict: DROPPED (L3/L4: denied by deny-alliance spec.ingressDeny[0])" in run.stdout

    code, result = trace_json(
        "--policy", DENY_ALLIANCE, "--from", TIEFIGHTER, "--to", DEATHSTAR, "--port", "80"
    )
    assert code == 0 and result["verdict"]["verdict"] == "FORWARDED"
    # Together with the L7 policy: still dropped for the Alliance, L7-judged for the Empire.
    code, result = trace_json(
        "--policy",
        L7,
        "--policy",
        DENY_ALLIANCE,
        "--from",
        XWING,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "POST /v1/request-landing",
    )
    assert (
        code == 1
        and result["verdict"]["reason"] == "L3/L4: denied by deny-alliance spec.ingressDeny[0]"
    )


def _audited_copy(tmp_path: Path) -> str:
    doc = yaml.safe_load(Path(L7).read_text())
    doc["metadata"]["annotations"] = {"l7proxy.io/audit": "true"}
    path = tmp_path / "sw-l3-l4-l7-audit.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_audit_annotation_turns_would_deny_into_audit_and_allows(tmp_path):
    audited = _audited_copy(tmp_path)
    run = trace(
        "--policy",
        audited,
        "--from",
        TIEFIGHTER,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "PUT /v1/exhaust-port",
    )
    assert run.returncode == 0, run.stderr
    assert "verdict: AUDIT by policy rule1 (no L7 rule matches)" in run.stdout
    assert f"rule1 {LANDING_RULE} [POST /v1/request-landing]: no match" in run.stdout

    code, result = trace_json(
        "--policy", audited, "--from", XWING, "--to", DEATHSTAR, "--port", "80"
    )
    assert code == 0
    assert result["verdict"]["verdict"] == "AUDIT"
    assert result["l3l4"]["audit"] is True

    # What the policy allows is still plainly FORWARDED.
    code, result = trace_json(
        "--policy",
        audited,
        "--from",
        TIEFIGHTER,
        "--to",
        DEATHSTAR,
        "--port",
        "80",
        "--http",
        "POST /v1/request-landing",
    )
    assert code == 0 and result["verdict"]["verdict"] == "FORWARDED"


# --------------------------------------------------------------------------- other protocols


GRPC_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: grpc-echo}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "50051", protocol: TCP}]
      rules:
        grpc:
        - {service: grpc.testing.TestService, method: UnaryCall}
"""

KAFKA_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-orders}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: billing}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: orders}
        - {role: consume, topic: orders, clientID: auditor}
"""


def test_grpc_call_from_loopback_uses_the_host_identity(tmp_path):
    policy = tmp_path / "grpc.yaml"
    policy.write_text(GRPC_POLICY)
    code, result = trace_json(
        "--policy",
        str(policy),
        "--from",
        "127.0.0.1",
        "--to",
        "app=echo",
        "--port",
        "50051",
        "--grpc",
        "grpc.testing.TestService/UnaryCall",
    )
    assert code == 0 and result["from"]["identity"] == 1
    assert result["verdict"]["rule"] == "spec.ingress[0].toPorts[0].rules.grpc[0]"
    assert result["l7"][0]["request"]["path"] == "/grpc.testing.TestService/UnaryCall"
    code, result = trace_json(
        "--policy",
        str(policy),
        "--from",
        "127.0.0.1",
        "--to",
        "app=echo",
        "--port",
        "50051",
        "--grpc",
        "grpc.testing.TestService/StreamingCall",
    )
    assert code == 1 and result["verdict"]["verdict"] == "DENIED"
    assert "'StreamingCall' does not match 'UnaryCall'" in result["l7"][0]["trace"][1]
    # A routable address that no policy names is world: dropped at L3/L4.
    code, result = trace_json(
        "--policy",
        str(policy),
        "--from",
        "192.0.2.7",
        "--to",
        "app=echo",
        "--port",
        "50051",
        "--grpc",
        "grpc.testing.TestService/UnaryCall",
    )
    assert (
        code == 1 and result["from"]["identity"] == 2 and result["verdict"]["verdict"] == "DROPPED"
    )


def test_kafka_roles_and_client_id(tmp_path):
    policy = tmp_path / "kafka.yaml"
    policy.write_text(KAFKA_POLICY)
    common = (
        "--policy",
        str(policy),
        "--from",
        "app=billing",
        "--to",
        "app=kafka",
        "--port",
        "9092",
    )
    code, result = trace_json(*common, "--kafka", "produce orders")
    assert code == 0 and result["verdict"]["rule"] == "spec.ingress[0].toPorts[0].rules.kafka[0]"
    assert result["l7"][0]["request"]["api_key"] == 0 and result["l7"][0]["request"]["topics"] == [
        "orders"
    ]
    code, result = trace_json(*common, "--kafka", "produce payments")
    assert code == 1
    code, result = trace_json(*common, "--kafka", "consume orders")
    assert code == 1 and result["l7"][0]["request"]["api_key"] == 1
    code, result = trace_json(*common, "--kafka", "consume orders auditor")
    assert code == 0 and result["verdict"]["rule"] == "spec.ingress[0].toPorts[0].rules.kafka[1]"
    code, result = trace_json(*common, "--kafka", "fetch orders auditor")
    assert code == 0
    # Metadata is in both roles; with no topic it matches on the API alone.
    code, result = trace_json(*common, "--kafka", "metadata")
    assert code == 0 and result["l7"][0]["request"]["api_key"] == 3


def test_kafka_group_apis_name_a_group_not_a_topic(tmp_path):
    policy = tmp_path / "kafka-groups.yaml"
    policy.write_text(
        KAFKA_POLICY.replace(
            "{role: consume, topic: orders, clientID: auditor}",
            "{role: consume, topic: orders, group: billing-consumers}",
        )
    )
    common = (
        "--policy",
        str(policy),
        "--from",
        "app=billing",
        "--to",
        "app=kafka",
        "--port",
        "9092",
    )
    code, result = trace_json(*common, "--kafka", "joingroup billing-consumers")
    assert code == 0 and result["verdict"]["rule"] == "spec.ingress[0].toPorts[0].rules.kafka[1]"
    assert (
        result["l7"][0]["request"]["api_key"],
        result["l7"][0]["request"]["groups"],
        result["l7"][0]["request"]["topics"],
    ) == (11, ["billing-consumers"], [])
    code, result = trace_json(*common, "--kafka", "joingroup thieves")
    assert code == 1
    assert "group 'thieves' != 'billing-consumers'" in " ".join(result["l7"][0]["trace"])
    code, result = trace_json(*common, "--kafka", "offsetcommit:8 orders group=thieves")
    assert code == 1 and result["l7"][0]["request"]["api_version"] == 8


def test_cql_statements_and_batches_are_classified_by_the_cql_lexer():
    common = (
        "--policy",
        CASSANDRA_RO,
        "--from",
        "app=reporting",
        "--to",
        "app=cassandra",
        "--port",
        "9042",
    )
    code, result = trace_json(
        *common, "--cql", "SELECT * FROM attendance.daily_records WHERE day = '2024-01-01'"
    )
    assert code == 0 and result["verdict"]["rule"] == "spec.ingress[0].toPorts[0].rules.l7[1]"
    assert (
        result["l7"][0]["request"]["action"] == "select"
        and result["l7"][0]["request"]["table"] == "attendance.daily_records"
    )
    code, result = trace_json(
        *common, "--cql", "/* sneaky */ INSERT INTO attendance.daily_records (a) VALUES ('select')"
    )
    assert code == 1 and result["l7"][0]["request"]["action"] == "insert"
    # A batch is judged member by member; one denied member denies the batch.
    code, result = trace_json(
        *common,
        "--cql",
        "BEGIN BATCH INSERT INTO attendance.a (x) VALUES (1); UPDATE attendance.b SET x = 1 WHERE "
        "y = 2; APPLY BATCH",
    )
    assert code == 1
    assert [(e["request"]["action"], e["request"]["table"]) for e in result["l7"]] == [
        ("insert", "attendance.a"),
        ("update", "attendance.b"),
    ]


# --------------------------------------------------------------------------- the agent's state


def test_without_policy_flag_the_agents_state_and_endpoint_names_are_used(tmp_path):
    from l7proxy.node.store import EndpointRecord, Store

    store = Store(tmp_path / "state")
    with store.locked() as st:
        alloc = st.allocator()
        for i, (name, labels) in enumerate(
            (("deathstar", DEATHSTAR), ("tiefighter", TIEFIGHTER), ("xwing", XWING)), start=1
        ):
            label_map = dict(kv.split("=") for kv in labels.split(","))
            alloc.for_labels(label_map)
            st.endpoints.append(
                EndpointRecord(
                    name, i, label_map, f"10.99.0.{9 + i}", f"l7p-test-{name}", f"l7ptest{i}"
                )
            )
        st.identities = alloc.snapshot()
    (store.policy_dir / "sw.yaml").write_text(Path(L7).read_text())

    run = trace(
        "--from",
        "tiefighter",
        "--to",
        "deathstar",
        "--port",
        "80",
        "--http",
        "PUT /v1/exhaust-port",
        state_dir=store.root,
    )
    assert run.returncode == 1, run.stderr
    assert "ingress of deathstar from identity" in run.stdout
    code, result = trace_json(
        "--from",
        "tiefighter",
        "--to",
        "deathstar",
        "--port",
        "80",
        "--http",
        "POST /v1/request-landing",
        state_dir=store.root,
    )
    assert (
        code == 0 and result["to"]["endpoint"] == "deathstar" and result["to"]["ip"] == "10.99.0.10"
    )
    # An endpoint's address resolves to the endpoint itself.
    code, result = trace_json(
        "--from", "10.99.0.12", "--to", "10.99.0.10", "--port", "80", state_dir=store.root
    )
    assert (
        code == 1
        and result["from"]["endpoint"] == "xwing"
        and result["verdict"]["verdict"] == "DROPPED"
    )


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--policy",
                L7,
                "--from",
                TIEFIGHTER,
                "--to",
                DEATHSTAR,
                "--port",
                "80",
                "--http",
                "POST",
            ],
            "expected 'METHOD /path [host]'",
        ),
        (
            [
                "--policy",
                L7,
                "--from",
                TIEFIGHTER,
                "--to",
                DEATHSTAR,
                "--port",
                "80",
                "--grpc",
                "NoMethod",
            ],
            "expected Service/Method",
        ),
        (
            [
                "--policy",
                L7,
                "--from",
                TIEFIGHTER,
                "--to",
                DEATHSTAR,
                "--port",
                "80",
                "--kafka",
                "fly orders",
            ],
            "unknown role or API 'fly'",
        ),
        (
            ["--policy", L7, "--from", "deathstar", "--to", DEATHSTAR, "--port", "80"],
            "not labels (k=v,...), an IP/CIDR, or a known endpoint",
        ),
        (
            ["--policy", L7, "--from", TIEFIGHTER, "--to", DEATHSTAR, "--port", "0"],
            "not a TCP port",
        ),
        (
            [
                "--policy",
                "/nonexistent/policy.yaml",
                "--from",
                TIEFIGHTER,
                "--to",
                DEATHSTAR,
                "--port",
                "80",
            ],
            "no such file or directory",
        ),
        (["--from", TIEFIGHTER, "--to", DEATHSTAR, "--port", "80"], "no agent state"),
    ],
)
def test_usage_errors_exit_2_with_a_reason(tmp_path, args, message):
    run = trace(*args, state_dir=tmp_path / "empty-state")
    assert run.returncode == 2
    assert message in run.stderr
    assert run.stdout == ""
