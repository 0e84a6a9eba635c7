"""Policy semantics, table-driven: who may talk to whom, on which port, with which request."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from l7proxy.policy.engine import Endpoint, PolicyEntry, compile_policy
from l7proxy.policy.identity import HOST, WORLD, IdentityAllocator
from l7proxy.policy.load import load_text
from l7proxy.policy.state import PolicyState
from parsers.requests import GrpcCall, HttpRequest

ENDPOINTS = {
    "deathstar": ({"org": "empire", "class": "deathstar"}, "10.9.0.10"),
    "tiefighter": ({"org": "empire", "class": "tiefighter"}, "10.9.0.11"),
    "xwing": ({"org": "alliance", "class": "xwing"}, "10.9.0.12"),
}


def cnp(spec: str, name: str = "p", annotations: str = "") -> str:
    meta = f"metadata:\n  name: {name}\n" + (
        f"  annotations:\n    {annotations}\n" if annotations else ""
    )
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        + meta
        + "spec:\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def build(*docs: str, audit: bool = False) -> PolicyState:
    identities = IdentityAllocator()
    endpoints = [
        Endpoint(i + 1, name, identities.for_labels(labels), ipaddress.IPv4Address(ip))
        for i, (name, (labels, ip)) in enumerate(ENDPOINTS.items())
    ]
    policies = [p for d in docs for p in load_text(d)]
    return PolicyState(compile_policy(policies, endpoints, identities, audit_all=audit))


def connect(state: PolicyState, src: str, dst: str, port: int):
    def ip(name):
        return ENDPOINTS[name][1] if name in ENDPOINTS else name

    return state.connection(state.side(ip(src), 40000), state.side(ip(dst), port))


def http(method: str, path: str, host: str = "deathstar", headers=()) -> HttpRequest:
    return HttpRequest(method, path, host, tuple(headers))


RULE1_L4 = cnp(
    """
    endpointSelector: {matchLabels: {org: empire, class: deathstar}}
    ingress:
    - fromEndpoints: [{matchLabels: {org: empire}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """,
    name="rule1",
)
RULE1_L7 = cnp(
    """
    endpointSelector: {matchLabels: {org: empire, class: deathstar}}
    ingress:
    - fromEndpoints: [{matchLabels: {org: empire}}]
      toPorts:
      - ports: [{port: "80", protocol: TCP}]
        rules:
          http: [{method: POST, path: /v1/request-landing}]
    """,
    name="rule1",
)


@pytest.mark.parametrize(
    "docs, src, dst, port, allowed, parser",
    [
        ((), "xwing", "deathstar", 80, True, None),  # no policy: everything flows
        ((RULE1_L4,), "tiefighter", "deathstar", 80, True, None),
        ((RULE1_L4,), "xwing", "deathstar", 80, False, None),  # default deny once selected
        ((RULE1_L4,), "tiefighter", "deathstar", 81, False, None),  # wrong port
        (
            (RULE1_L4,),
            "deathstar",
            "xwing",
            80,
            True,
            None,
        ),  # xwing is not selected: its ingress is open
        ((RULE1_L7,), "tiefighter", "deathstar", 80, True, "http"),
        ((RULE1_L7,), "xwing", "deathstar", 80, False, None),
    ],
)
def test_l3_l4_verdicts(docs, src, dst, port, allowed, parser):
    conn = connect(build(*docs), src, dst, port)
    assert (conn.l4.allowed, conn.parser) == (allowed, parser)


def test_star_wars_l7_rule_allows_landing_and_denies_exhaust_port():
    conn = connect(build(RULE1_L7), "tiefighter", "deathstar", 80)
    landing = conn.decide(http("POST", "/v1/request-landing"))
    assert landing.allowed and landing.policy == "rule1"
    assert landing.rule == "spec.ingress[0].toPorts[0].rules.http[0]"
    exhaust = conn.decide(http("PUT", "/v1/exhaust-port"))
    assert not exhaust.allowed and exhaust.verdict == "DENIED"
    assert exhaust.reason == "no L7 rule matches"


def test_empty_l7_list_allows_every_request():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: []}}]
        """
    )
    conn = connect(build(doc), "xwing", "deathstar", 80)
    assert conn.parser == "http"
    assert conn.decide(http("DELETE", "/anything")).allowed


def test_l4_rule_on_same_port_allows_all_l7_for_its_peers():
    l4_for_alliance = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - fromEndpoints: [{matchLabels: {org: alliance}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        """,
        name="alliance-l4",
    )
    state = build(RULE1_L7, l4_for_alliance)
    assert connect(state, "xwing", "deathstar", 80).decide(http("PUT", "/v1/exhaust-port")).allowed
    assert (
        not connect(state, "tiefighter", "deathstar", 80)
        .decide(http("PUT", "/v1/exhaust-port"))
        .allowed
    )


def test_deny_wins_over_allow_at_l3():
    deny_alliance = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - fromEntities: [all]
        ingressDeny:
        - fromEndpoints: [{matchLabels: {org: alliance}}]
        """
    )
    state = build(deny_alliance)
    assert not connect(state, "xwing", "deathstar", 80).l4.allowed
    assert connect(state, "tiefighter", "deathstar", 80).l4.allowed


def test_l7_deny_rule_wins_over_l7_allow():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{path: "/v1/.*"}]}}]
        ingressDeny:
        - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: PUT}]}}]
        """
    )
    conn = connect(build(doc), "tiefighter", "deathstar", 80)
    assert conn.decide(http("GET", "/v1/x")).allowed
    denied = conn.decide(http("PUT", "/v1/x"))
    assert not denied.allowed and denied.rule == "spec.ingressDeny[0].toPorts[0].rules.http[0]"


@pytest.mark.parametrize(
    "selector, src, allowed",
    [
        ("{matchExpressions: [{key: org, operator: In, values: [empire]}]}", "tiefighter", True),
        ("{matchExpressions: [{key: org, operator: In, values: [empire]}]}", "xwing", False),
        ("{matchExpressions: [{key: org, operator: NotIn, values: [empire]}]}", "xwing", True),
        ("{matchExpressions: [{key: class, operator: Exists}]}", "xwing", True),
        ("{matchExpressions: [{key: rebel, operator: DoesNotExist}]}", "tiefighter", True),
        ("{matchExpressions: [{key: class, operator: DoesNotExist}]}", "tiefighter", False),
        ("{matchLabels: {'k8s:org': alliance}}", "xwing", True),
        ("{}", "xwing", True),  # the empty selector selects every endpoint
    ],
)
def test_selectors(selector, src, allowed):
    doc = cnp(
        f"""
        endpointSelector: {{matchLabels: {{class: deathstar}}}}
        ingress:
        - fromEndpoints: [{selector}]
        """
    )
    assert connect(build(doc), src, "deathstar", 80).l4.allowed is allowed


def test_empty_ingress_rule_is_default_deny():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress: [{}]
        """
    )
    assert not connect(build(doc), "tiefighter", "deathstar", 80).l4.allowed


@pytest.mark.parametrize(
    "src_ip, allowed",
    [("192.0.2.7", True), ("192.0.2.130", False), ("198.51.100.1", False)],
)
def test_cidr_set_with_except(src_ip, allowed):
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - fromCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
        """
    )
    assert connect(build(doc), src_ip, "deathstar", 80).l4.allowed is allowed


def test_world_and_host_entities():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - fromEntities: [world]
        """
    )
    state = build(doc)
    assert state.side("198.51.100.1", 1).identity == WORLD
    assert connect(state, "198.51.100.1", "deathstar", 80).l4.allowed
    assert not connect(state, "tiefighter", "deathstar", 80).l4.allowed


@pytest.mark.parametrize(
    "port, allowed", [(8079, False), (8080, True), (8090, True), (8091, False)]
)
def test_port_ranges(port, allowed):
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - toPorts: [{ports: [{port: "8080", endPort: 8090, protocol: TCP}]}]
        """
    )
    assert connect(build(doc), "xwing", "deathstar", port).l4.allowed is allowed


def test_egress_policy_of_the_source_applies_too():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: tiefighter}}
        egress:
        - toEndpoints: [{matchLabels: {class: deathstar}}]
          toPorts: [{ports: [{port: "80"}], rules: {http: [{method: GET}]}}]
        """
    )
    state = build(doc)
    conn = connect(state, "tiefighter", "deathstar", 80)
    assert conn.parser == "http"
    assert conn.decide(http("GET", "/")).allowed
    assert not conn.decide(http("POST", "/")).allowed
    assert not connect(state, "tiefighter", "xwing", 80).l4.allowed


def test_audit_annotation_allows_but_marks_would_deny():
    doc = RULE1_L7.replace(
        "metadata:\n  name: rule1\n",
        'metadata:\n  name: rule1\n  annotations:\n    l7proxy.io/audit: "true"\n',
    )
    state = build(doc)
    xwing = connect(state, "xwing", "deathstar", 80)
    assert xwing.l4.allowed and xwing.l4.audit
    decision = connect(state, "tiefighter", "deathstar", 80).decide(http("PUT", "/v1/exhaust-port"))
    assert (decision.allowed, decision.audit, decision.verdict) == (True, True, "AUDIT")


def test_global_audit_flag():
    decision = connect(build(RULE1_L7, audit=True), "tiefighter", "deathstar", 80).decide(
        http("PUT", "/v1/exhaust-port")
    )
    assert decision.verdict == "AUDIT"


def test_header_presence_and_header_matches_with_mismatch_actions():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - toPorts:
          - ports: [{port: "80"}]
            rules:
              http:
              - path: /needs-token
                headers: ["X-Token"]
              - path: /tagged
                headerMatches: [{name: X-Fleet, value: imperial, mismatch: REPLACE}]
        """
    )
    conn = connect(build(doc), "tiefighter", "deathstar", 80)
    assert not conn.decide(http("GET", "/needs-token")).allowed
    assert conn.decide(http("GET", "/needs-token", headers=[("x-token", "abc")])).allowed
    tagged = conn.decide(http("GET", "/tagged", headers=[("x-fleet", "rebel")]))
    assert tagged.allowed and tagged.edits == (("replace", "x-fleet", "imperial"),)
    assert conn.decide(http("GET", "/tagged", headers=[("x-fleet", "imperial")])).edits == ()


def test_http_rules_apply_to_grpc_calls_through_their_path():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - toPorts: [{ports: [{port: "80"}], rules: {http: [{method: POST, path: "/pkg.Svc/Get"}]}}]
        """
    )
    conn = connect(build(doc), "tiefighter", "deathstar", 80)
    call = GrpcCall("pkg.Svc", "Get", http("POST", "/pkg.Svc/Get"))
    assert conn.decide(call).allowed
    assert not conn.decide(GrpcCall("pkg.Svc", "Put", http("POST", "/pkg.Svc/Put"))).allowed


def test_policy_change_is_seen_by_the_next_request_of_an_open_connection():
    state = build(RULE1_L7)
    conn = connect(state, "tiefighter", "deathstar", 80)
    assert not conn.decide(http("PUT", "/v1/exhaust-port")).allowed
    opened = build(RULE1_L7.replace("method: POST, path: /v1/request-landing", "path: /v1/.*"))
    state.swap(opened.current)
    assert conn.decide(http("PUT", "/v1/exhaust-port")).allowed


def test_a_request_judged_again_gets_the_current_policys_decision():
    # A keep-alive client repeating a head hands the engine the same request object:
    # the connection remembers its last decision, never past a policy change.
    state = build(RULE1_L7)
    conn = connect(state, "tiefighter", "deathstar", 80)
    exhaust = http("PUT", "/v1/exhaust-port")
    landing = http("POST", "/v1/request-landing")
    assert not conn.decide(exhaust).allowed
    assert not conn.decide(exhaust).allowed
    assert conn.decide(landing).allowed
    state.swap(
        build(RULE1_L7.replace("method: POST, path: /v1/request-landing", "path: /v1/.*")).current
    )
    assert conn.decide(exhaust).allowed
    state.swap(build(RULE1_L7).current)
    assert not conn.decide(exhaust).allowed
    trace: list[str] = []
    assert not conn.decide(exhaust, trace).allowed and trace  # a trace is always made afresh


def test_trace_records_every_rule_considered():
    conn = connect(build(RULE1_L7), "tiefighter", "deathstar", 80)
    trace: list[str] = []
    conn.decide(http("PUT", "/v1/exhaust-port"), trace)
    text = "\n".join(trace)
    assert "ingress of deathstar" in text
    assert "method 'PUT' does not match 'POST'" in text
    assert "no match" in text


def test_kernel_entries_for_star_wars_rule():
    state = build(RULE1_L7)
    compiled = state.current
    tiefighter = compiled.endpoints_by_ip["10.9.0.11"].identity.number
    deathstar = compiled.endpoints_by_ip["10.9.0.10"].id
    entries = compiled.kernel_entries({"http": 15001})
    # org=empire selects both empire identities: deathstar and tiefighter.
    assert PolicyEntry(deathstar, "ingress", tiefighter, 6, 80, 80, "redirect", 15001) in entries
    assert all(e.action == "redirect" and e.endpoint_id == deathstar for e in entries)
    assert {e.identity for e in entries} == {
        tiefighter,
        compiled.endpoints_by_ip["10.9.0.10"].identity.number,
    }


def test_host_prefixes_map_to_host_identity():
    identities = IdentityAllocator()
    compiled = compile_policy(
        [], [], identities, host_prefixes=[ipaddress.IPv4Network("127.0.0.0/8")]
    )
    assert compiled.ipcache.lookup("127.0.0.1") == HOST
    assert compiled.ipcache.lookup(ipaddress.IPv4Address("127.0.0.9")) == HOST
    assert compiled.ipcache.lookup("8.8.8.8") == WORLD
    # Only the strict dotted quad is an address: these are nobody we know.
    for loose in ("127.0.0.01", "127.1", "127.0.0.1 ", "::1", "", "localhost"):
        assert compiled.ipcache.lookup(loose) == WORLD, loose


def test_an_l7_deny_rule_alone_puts_an_l4_allowed_port_under_its_parser():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        ingressDeny:
        - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: PUT}]}}]
        """
    )
    conn = connect(build(doc), "tiefighter", "deathstar", 80)
    assert (conn.l4.allowed, conn.parser) == (True, "http")
    assert conn.decide(http("GET", "/")).allowed
    assert not conn.decide(http("PUT", "/")).allowed


def test_each_request_meets_only_the_rules_written_for_its_type():
    doc = cnp(
        """
        endpointSelector: {matchLabels: {class: deathstar}}
        ingress:
        - toPorts:
          - ports: [{port: "80", protocol: TCP}]
            rules:
              grpc: [{service: empire.Fleet, method: Dock}]
              http: [{method: GET, path: /healthz}]
        """
    )
    conn = connect(build(doc), "xwing", "deathstar", 80)
    trace: list[str] = []
    assert conn.decide(http("GET", "/healthz"), trace).allowed
    assert "  grpc rules on this port do not judge HttpRequest requests: skipped" in trace
    assert not any("[grpc " in line for line in trace)
    # A gRPC call meets both kinds: its own, and the HTTP rules through its HTTP head.
    dock = HttpRequest("POST", "/empire.Fleet/Dock", "deathstar", (), "2")
    assert conn.decide(GrpcCall("empire.Fleet", "Dock", dock)).rule.endswith("rules.grpc[0]")
    health = HttpRequest("GET", "/healthz", "deathstar", (), "2")
    assert conn.decide(GrpcCall("grpc.health.v1.Health", "Check", health)).allowed
    refused = conn.decide(GrpcCall("empire.Fleet", "Undock", dock))
    assert (refused.allowed, refused.reason) == (False, "no L7 rule matches")


def test_the_datapath_writes_the_entries_the_engine_computes():
    from l7proxy.datapath import loader

    assert loader.PolicyEntry is PolicyEntry  # one definition, no conversion
    entries = build(RULE1_L7).current.kernel_entries({"http": 15001})
    assert loader.compile_policy(entries)
