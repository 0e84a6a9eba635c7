"""``policy suggest`` from flow records to checked YAML, without a proxy.

The records are shaped as the proxy writes them (``source``/``destination`` with
labels, ``l7`` with the request's flow fields). The printed YAML is then read
back by the policy loader and judged by ``policy trace``'s own code, which is
how an operator would check it by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from l7proxy.policy import trace as tracing
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_text
from l7proxy.policy.suggest.check import enforced, replay
from l7proxy.policy.suggest.draft import Limits, SuggestError
from l7proxy.policy.suggest.observed import Selection, SkippedCount, select
from l7proxy.policy.suggest.paths import Bounds
from l7proxy.policy.suggest.suggest import suggest
from tests.support import REPO

DEATHSTAR = {"org": "empire", "class": "deathstar"}
TIEFIGHTER = {"org": "empire", "class": "tiefighter"}
XWING = {"org": "alliance", "class": "xwing"}


def side(labels, ip="10.0.0.2", endpoint=None, identity=300):
    return {"ip": ip, "port": 40000, "identity": identity, "endpoint": endpoint, "labels": labels}


def record(protocol, l7, *, src, dst=None, port=80, verdict="AUDIT", when=1000.0, kind="l7"):
    dst = dst or side(DEATHSTAR, "10.0.0.1", "deathstar", 257)
    return {
        "type": kind,
        "time": when,
        "protocol": protocol,
        "source": src,
        "destination": {**dst, "port": port},
        "l7": l7,
        "verdict": verdict,
    }


def http(method, path, src=None, **kw):
    src = src or side(TIEFIGHTER, endpoint="tiefighter", identity=256)
    return record("http", {"method": method, "path": path, "host": "deathstar"}, src=src, **kw)


HOST = side({"reserved:host": ""}, "127.0.0.1", identity=1)


def verdict(policy_yaml, src, dst, port, **request) -> str:
    """What ``policy trace`` says about one request under ``policy_yaml``."""
    scenario = tracing.build_scenario(
        load_text(policy_yaml),
        [],
        IdentityAllocator(),
        tracing.parse_peer(src),
        tracing.parse_peer(dst),
        port,
    )
    requests = tracing.build_requests(tracing.RequestSpec(**request))
    return tracing.trace(scenario, requests)["verdict"]["verdict"]


def suggest_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``l7proxy policy suggest ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "l7proxy", "policy", "suggest", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_star_wars_traffic_gives_one_policy_that_allows_it_and_nothing_else():
    records = [http("GET", "/v1/")] * 3 + [http("POST", "/v1/request-landing")] * 5
    records += [http("GET", f"/v1/ships/{n}") for n in (4, 8, 15, 16, 23, 42)]
    result = suggest(records)
    assert result.ok and result.policies == 1 and result.observations == 14

    docs = list(yaml.safe_load_all(result.yaml))
    assert [d["metadata"]["name"] for d in docs] == ["suggested-deathstar"]
    spec = docs[0]["spec"]
    assert spec["endpointSelector"] == {"matchLabels": DEATHSTAR}
    assert spec["ingress"][0]["fromEndpoints"] == [{"matchLabels": TIEFIGHTER}]
    assert spec["ingress"][0]["toPorts"][0]["ports"] == [{"port": "80", "protocol": "TCP"}]
    assert spec["ingress"][0]["toPorts"][0]["rules"]["http"] == [
        {"method": "GET", "path": "/v1/"},
        {"method": "GET", "path": "/v1/ships/[0-9]+"},
        {"method": "POST", "path": "/v1/request-landing"},
    ]
    # Comments count what each rule allowed in the replay.
    assert "# 3 requests\n        - method: GET\n          path: /v1/\n" in result.yaml
    assert "# 6 requests, e.g. /v1/ships/" in result.yaml
    assert "# 5 requests\n        - method: POST" in result.yaml

    tie, ds = "org=empire,class=tiefighter", "org=empire,class=deathstar"
    assert verdict(result.yaml, tie, ds, 80, http="GET /v1/ships/2187") == "FORWARDED"
    assert verdict(result.yaml, tie, ds, 80, http="PUT /v1/exhaust-port") == "DENIED"
    assert verdict(result.yaml, tie, ds, 80, http="GET /v1/ships/2187/crew") == "DENIED"
    assert verdict(result.yaml, "org=alliance,class=xwing", ds, 80, http="GET /v1/") == "DROPPED"


def test_report_counts_per_rule_and_says_everything_was_allowed():
    records = [http("GET", "/v1/")] * 2 + [http("POST", "/v1/request-landing")]
    report = suggest(records).report
    assert "replayed through the policy engine, enforced: 3 of 3 allowed" in report
    assert "every observed request allowed" in report
    lines = report.splitlines()
    assert any(line.split()[-4:] == ["http", "GET", "/v1/", "2"] for line in lines), report
    assert any(line.endswith("POST /v1/request-landing  1") for line in lines), report


def test_peers_with_the_same_requests_share_one_rule_and_others_get_their_own():
    other = side({"org": "empire", "class": "interceptor"}, "10.0.0.3", "interceptor", 258)
    xwing = side(XWING, "10.0.0.4", "xwing", 259)
    records = [http("GET", "/v1/"), http("GET", "/v1/", src=other), http("GET", "/v2/", src=xwing)]
    spec = yaml.safe_load(suggest(records).yaml)["spec"]
    assert [i["fromEndpoints"] for i in spec["ingress"]] == [
        [{"matchLabels": {"class": "interceptor", "org": "empire"}}, {"matchLabels": TIEFIGHTER}],
        [{"matchLabels": XWING}],
    ]


def test_outside_peers_are_named_by_address_until_there_are_too_many():
    few = [
        http("GET", "/", src=side({"reserved:world": ""}, f"192.0.2.{n}", identity=2))
        for n in (1, 2)
    ]
    spec = yaml.safe_load(suggest(few, limits=Limits(max_cidrs=2)).yaml)["spec"]
    assert spec["ingress"][0]["fromCIDR"] == ["192.0.2.1/32", "192.0.2.2/32"]
    many = few + [http("GET", "/", src=side({"reserved:world": ""}, "198.51.100.9", identity=2))]
    spec = yaml.safe_load(suggest(many, limits=Limits(max_cidrs=2)).yaml)["spec"]
    assert spec["ingress"][0]["fromEntities"] == ["world"]
    host = yaml.safe_load(suggest([http("GET", "/", src=HOST)]).yaml)["spec"]
    assert host["ingress"][0]["fromEntities"] == ["host"]
    named = side({"cidr:10.9.0.0/16": ""}, "10.9.1.1", identity=16777217)
    cidr = yaml.safe_load(suggest([http("GET", "/", src=named)]).yaml)["spec"]
    assert cidr["ingress"][0]["fromCIDR"] == ["10.9.0.0/16"]


def kafka(api_key, topics, **kw):
    l7 = {"api_key": api_key, "api_version": 7, "client_id": "fleet", "topics": topics}
    return record("kafka", l7, src=HOST, port=9092, **kw)


def test_kafka_roles_topics_and_a_prefix_when_several_topics_share_one():
    records = [kafka(0, [f"orders.{r}"]) for r in ("eu", "us", "asia")]
    records += [kafka(3, []), kafka(18, []), kafka(1, ["billing"]), kafka(2, ["billing"])]
    records += [kafka(19, ["audit-log"]), kafka(3, ["inventory"])]
    result = suggest(records)
    assert result.ok
    rules = yaml.safe_load(result.yaml)["spec"]["ingress"][0]["toPorts"][0]["rules"]["kafka"]
    assert rules == [
        {"role": "produce", "topicPrefix": "orders."},
        {"role": "consume", "topic": "billing"},
        {"apiKey": "metadata", "topic": "inventory"},
        {"apiKey": "createtopics", "topic": "audit-log"},
    ]
    ds = "org=empire,class=deathstar"
    assert verdict(result.yaml, "127.0.0.1", ds, 9092, kafka="produce orders.mars") == "FORWARDED"
    assert verdict(result.yaml, "127.0.0.1", ds, 9092, kafka="produce billing") == "DENIED"
    assert verdict(result.yaml, "127.0.0.1", ds, 9092, kafka="consume orders.eu") == "DENIED"
    assert verdict(result.yaml, "127.0.0.1", ds, 9092, kafka="produce ordersx") == "DENIED"


def test_two_topics_are_not_enough_for_a_prefix():
    records = [kafka(0, ["orders.eu"]), kafka(0, ["orders.us"])]
    rules = yaml.safe_load(suggest(records).yaml)["spec"]["ingress"][0]["toPorts"][0]["rules"]
    assert rules["kafka"] == [
        {"role": "produce", "topic": "orders.eu"},
        {"role": "produce", "topic": "orders.us"},
    ]


def test_grpc_and_cql_rules_are_exact():
    grpc = [
        record(
            "grpc",
            {"service": "grpc.testing.TestService", "method": m, "path": f"/x/{m}"},
            src=HOST,
            port=9000,
        )
        for m in ("EmptyCall", "UnaryCall", "UnaryCall")
    ]
    cql = [
        record("cassandra", {"opcode": "query", "action": a, "table": t}, src=HOST, port=9042)
        for a, t in (("select", "ks.users"), ("insert", "ks.events"), ("use", ""))
    ]
    result = suggest(grpc + cql)
    ports = yaml.safe_load(result.yaml)["spec"]["ingress"][0]["toPorts"]
    assert ports[0]["rules"]["grpc"] == [
        {"service": "grpc.testing.TestService", "method": "EmptyCall"},
        {"service": "grpc.testing.TestService", "method": "UnaryCall"},
    ]
    assert ports[1]["rules"] == {
        "l7proto": "cassandra",
        "l7": [
            {"query_action": "insert", "query_table": "ks\\.events"},
            {"query_action": "select", "query_table": "ks\\.users"},
            {"query_action": "use"},
        ],
    }
    ds = "org=empire,class=deathstar"
    svc = "grpc.testing.TestService"
    assert verdict(result.yaml, "127.0.0.1", ds, 9000, grpc=f"{svc}/UnaryCall") == "FORWARDED"
    assert verdict(result.yaml, "127.0.0.1", ds, 9000, grpc=f"{svc}/StreamingInputCall") == "DENIED"
    assert verdict(result.yaml, "127.0.0.1", ds, 9042, cql="SELECT * FROM ks.usersx") == "DENIED"
    assert verdict(result.yaml, "127.0.0.1", ds, 9042, cql="SELECT * FROM ks.users") == "FORWARDED"


def test_verdict_since_and_endpoint_select_the_records():
    other = side({"app": "api"}, "10.0.0.9", "api", 400)
    records = [
        http("GET", "/old", when=10.0),
        http("GET", "/audited", verdict="AUDIT", when=100.0),
        http("GET", "/forwarded", verdict="FORWARDED", when=100.0),
        http("GET", "/denied", verdict="DENIED", when=100.0),
        http("GET", "/api", dst=other, when=100.0),
        {"type": "limit", "verdict": "DROPPED", "time": 100.0},
    ]
    skipped = SkippedCount()
    chosen = select(
        records, Selection(frozenset({"AUDIT"}), since=50.0, endpoint="deathstar"), skipped
    )
    assert [o.request.path for o in chosen] == ["/audited"]
    assert skipped == {
        "before --since": 1,
        "verdict FORWARDED": 1,
        "verdict DENIED": 1,
        "another endpoint": 1,
        "type limit": 1,
    }
    by_labels = select(records, Selection(endpoint="app=api"), SkippedCount())
    assert [o.request.path for o in by_labels] == ["/api"]


def test_audit_annotation_for_a_staged_roll_out_is_still_checked_as_enforced():
    result = suggest([http("GET", "/v1/")], audit=True)
    policies = load_text(result.yaml)
    assert [p.audit for p in policies] == [True]
    assert result.ok and "enforced: 1 of 1 allowed" in result.report


def test_the_replay_catches_a_policy_that_denies_what_was_seen():
    records = [http("GET", "/v1/"), http("PUT", "/v1/exhaust-port")]
    observations = select(records, Selection(), SkippedCount())
    narrow = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: narrow}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
"""
    result = replay(enforced(narrow), observations)
    assert result.allowed == 1
    [denial] = result.denials
    assert denial.observation.request.method == "PUT"
    assert denial.reason == "no L7 rule matches"
    assert any("method 'PUT' does not match 'GET'" in line for line in denial.trace)


def test_a_request_no_rule_can_express_is_reported_denied():
    # Kafka topic names are [a-zA-Z0-9._-]: a rule cannot name this one.
    result = suggest([kafka(0, ["ok"]), kafka(0, ["not a topic"])])
    assert not result.ok
    assert "1 of 2 NOT allowed" in result.yaml.splitlines()[1]
    assert "denied (1):" in result.report and "topics=not a topic" in result.report


def test_too_many_paths_for_one_method_is_an_error_not_a_wider_rule():
    records = [http("GET", f"/{w}") for w in ("alpha", "beta", "gamma", "delta")]
    with pytest.raises(SuggestError, match="GET has 4 distinct paths .*--max-paths 3"):
        suggest(records, limits=Limits(max_paths=3))


def test_l4_only_audit_reports_become_a_port_rule_without_l7():
    drop = record(
        "tcp", {}, src=side(TIEFIGHTER, endpoint="tiefighter", identity=256), port=443, kind="drop"
    )
    result = suggest([drop, http("GET", "/v1/")])
    ingress = yaml.safe_load(result.yaml)["spec"]["ingress"][0]
    assert ingress["toPorts"] == [
        {
            "ports": [{"port": "80", "protocol": "TCP"}],
            "rules": {"http": [{"method": "GET", "path": "/v1/"}]},
        },
        {"ports": [{"port": "443", "protocol": "TCP"}]},
    ]
    assert result.ok and "1 connection seen at L3/L4 only" in result.yaml
    assert "without L7 rules this allows every request (review)" in result.yaml


def test_command_line_writes_the_file_and_reports_on_stderr(tmp_path):
    log = tmp_path / "flows.jsonl"
    rotated = tmp_path / "flows.jsonl.1"
    rotated.write_text(json.dumps(http("GET", "/v1/")) + "\n")
    log.write_text("".join(json.dumps(http("GET", f"/v1/ships/{n}")) + "\n" for n in (1, 2, 3)))
    out = tmp_path / "suggested.yaml"
    run = suggest_cli("--flowlog", str(log), "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "4 of 4 allowed" in run.stderr
    assert "path: /v1/ships/[0-9]+" in out.read_text()
    validate = subprocess.run(
        [sys.executable, "-m", "l7proxy", "policy", "validate", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert validate.returncode == 0 and "ok: suggested-deathstar" in validate.stdout

    # A suggestion that would deny what was seen is not written, and the exit says so.
    log.write_text(json.dumps(kafka(0, ["not a topic"])) + "\n")
    rotated.unlink()
    out.unlink()
    run = suggest_cli("--flowlog", str(log), "-o", str(out))
    assert run.returncode == 1 and "nothing written" in run.stderr and not out.exists()


def test_bounds_reach_the_path_rules():
    records = [http("GET", f"/v1/ships/{n}") for n in range(5)]
    exact = suggest(records, limits=Limits(bounds=Bounds(min_samples=0)))
    assert exact.yaml.count("path: /v1/ships/") == 5


def test_each_policy_of_several_counts_its_own_rules():
    api = side({"app": "api"}, "10.0.0.9", "api", 400)
    records = [http("GET", "/v1/")] * 2 + [http("GET", "/items", dst=api)] * 3
    result = suggest(records)
    first, second = result.yaml.split("\n---\n")
    assert "name: suggested-api" in first and "# 3 requests\n        - method: GET" in first
    assert "name: suggested-deathstar" in second and "# 2 requests\n        - method: GET" in second


def test_equal_requests_are_one_observation_counted_and_kafka_correlation_ids_do_not_split_them():
    produce = [kafka(0, ["orders"]) for _ in range(4)]
    for n, rec in enumerate(produce):
        rec["l7"]["correlation_id"] = n
    observed = select(produce + [http("GET", "/v1/")] * 3, Selection(), SkippedCount())
    assert sorted(observed.values()) == [3, 4]
    result = suggest(produce + [kafka(0, ["bad topic!"])] * 3)
    assert "4 of 7 allowed" in result.report
    assert "topics=bad topic! clientID=fleet to deathstar:9092 (x3)" in result.report


def test_endpoints_with_the_same_labels_share_one_policy():
    moved = side(DEATHSTAR, "10.0.0.7", "deathstar-2", 257)
    records = [http("GET", "/v1/"), http("POST", "/v1/request-landing", dst=moved)]
    docs = list(yaml.safe_load_all(suggest(records).yaml))
    assert len(docs) == 1
    assert docs[0]["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"] == [
        {"method": "GET", "path": "/v1/"},
        {"method": "POST", "path": "/v1/request-landing"},
    ]


def test_tls_server_names_are_listed_on_the_port():
    hellos = [
        record("tls", {"sni": name, "alpn": ["h2"], "versions": ["TLSv1.3"]}, src=HOST, port=443)
        for name in ("api.example.com", "cdn.example.com", "api.example.com")
    ]
    result = suggest(hellos)
    port = yaml.safe_load(result.yaml)["spec"]["ingress"][0]["toPorts"][0]
    assert port == {
        "ports": [{"port": "443", "protocol": "TCP"}],
        "serverNames": ["api.example.com", "cdn.example.com"],
    }
    assert result.ok and "# 3 requests\n      serverNames:" in result.yaml
    ds = "org=empire,class=deathstar"
    assert verdict(result.yaml, "127.0.0.1", ds, 443, tls="cdn.example.com") == "FORWARDED"
    assert verdict(result.yaml, "127.0.0.1", ds, 443, tls="evil.example.com") == "DENIED"


def test_command_line_filters_since_endpoint_and_verdict(tmp_path):
    now = time.time()
    api = side({"app": "api"}, "10.0.0.9", "api", 400)
    records = [
        http("GET", "/yesterday", when=now - 86400),
        http("GET", "/audited", verdict="AUDIT", when=now - 60),
        http("GET", "/forwarded", verdict="FORWARDED", when=now - 60),
        http("GET", "/other-endpoint", dst=api, when=now - 60),
    ]
    log = tmp_path / "flows.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = subprocess.run(
        [sys.executable, "-m", "l7proxy", "policy", "suggest", "--flowlog", str(log)]
        + ["--since", "1h", "--endpoint", "class=deathstar", "--verdict", "AUDIT"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    rules = yaml.safe_load(run.stdout)["spec"]["ingress"][0]["toPorts"][0]["rules"]
    assert rules == {"http": [{"method": "GET", "path": "/audited"}]}
    assert "left out: 1 another endpoint, 1 before --since, 1 verdict FORWARDED" in run.stderr


def test_egress_rules_for_the_endpoints_that_sent_traffic():
    tie = side(TIEFIGHTER, "10.0.0.2", "tiefighter", 256)
    outside = side({"reserved:world": ""}, "203.0.113.7", identity=2)
    records = [
        http("POST", "/v1/request-landing"),  # tiefighter -> deathstar: both ends local
        record(
            "tls",
            {"sni": "api.stripe.com", "alpn": ["h2"]},
            src=tie,
            dst=outside,
            port=443,
        ),
    ]
    both = Selection(directions=frozenset({"ingress", "egress"}))
    result = suggest(records, both)
    assert result.ok, result.report
    docs = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(result.yaml)}
    assert set(docs) == {"suggested-deathstar", "suggested-tiefighter"}
    assert "egress" not in docs["suggested-deathstar"]
    assert "ingress" not in docs["suggested-tiefighter"]
    assert docs["suggested-tiefighter"]["egress"] == [
        {
            "toEndpoints": [{"matchLabels": DEATHSTAR}],
            "toPorts": [
                {
                    "ports": [{"port": "80", "protocol": "TCP"}],
                    "rules": {"http": [{"method": "POST", "path": "/v1/request-landing"}]},
                }
            ],
        },
        {
            "toCIDR": ["203.0.113.7/32"],
            "toPorts": [
                {"ports": [{"port": "443", "protocol": "TCP"}], "serverNames": ["api.stripe.com"]}
            ],
        },
    ]
    # Each end's rule is counted for its own policy.
    tie_yaml = result.yaml.split("\n---\n")[1]
    assert "# 1 request\n        - method: POST" in tie_yaml
    assert "# 1 request\n      serverNames:" in tie_yaml
    # Ingress only (the default): the world-bound record has no local destination.
    skipped = SkippedCount()
    assert len(select(records, Selection(), skipped)) == 1
    assert skipped == {"destination is not a local endpoint": 1}
    tie, ds = "org=empire,class=tiefighter", "org=empire,class=deathstar"
    assert verdict(result.yaml, tie, ds, 80, http="PUT /v1/exhaust-port") == "DENIED"
    assert verdict(result.yaml, tie, "203.0.113.7", 443, tls="evil.example") == "DENIED"
    assert verdict(result.yaml, tie, "198.51.100.1", 443, tls="api.stripe.com") == "DROPPED"


def test_labels_that_change_with_every_roll_out_are_not_selected():
    # Two generations of the same Deployment on both sides.
    old = side({"app": "web", "pod-template-hash": "6d4cf56db6"}, "10.0.0.5", "web-1", 300)
    new = side({"app": "web", "pod-template-hash": "7f9b8c5d4e"}, "10.0.0.6", "web-2", 301)
    api = {"app": "api", "pod-template-hash": "5c7d9f8b6a"}
    dst = side(api, "10.0.0.9", "api-1", 400)
    dst_new = side({**api, "pod-template-hash": "58b7c9d6f4"}, "10.0.0.10", "api-2", 401)
    records = [http("GET", "/v1/", src=old, dst=dst), http("GET", "/v1/", src=new, dst=dst_new)]
    result = suggest(records)
    [policy] = yaml.safe_load_all(result.yaml)
    assert policy["spec"]["endpointSelector"] == {"matchLabels": {"app": "api"}}
    assert policy["spec"]["ingress"][0]["fromEndpoints"] == [{"matchLabels": {"app": "web"}}]
    assert result.ok and "# 2 requests" in result.yaml
