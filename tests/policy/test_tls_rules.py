"""toPorts[].serverNames: Cilium's SNI patterns, compiled once at load, validated with YAML
paths, judged by the port's matcher on the ClientHello, and explained by ``policy trace``."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap

import pytest

from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.errors import PolicyError, YamlPath
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_paths, load_text
from l7proxy.policy.rules import kind
from l7proxy.policy.state import PolicyState
from parsers.requests import TlsClientHello
from tests.support import POLICIES, REPO


def names(*patterns: object):
    return kind("serverNames").compile(list(patterns), YamlPath(("toPorts[0].serverNames",)))


def hello(sni: str, ech: bool = False) -> TlsClientHello:
    return TlsClientHello(sni, ("h2",), ("TLSv1.3",), ech)


def test_the_kind_is_a_port_field_parsed_as_tls():
    k = kind("serverNames")
    assert (k.parser, k.request_types, k.port_field) == ("tls", (TlsClientHello,), True)


# (pattern, server names it matches, server names it does not)
MATCHING = [
    (
        "api.example.com",
        ["api.example.com", "API.Example.COM"],
        ["example.com", "x.api.example.com"],
    ),
    (
        "*.example.com",
        ["a.example.com", "A-B_c.EXAMPLE.com"],
        ["example.com", "a.b.example.com", ".example.com", "aexample.com"],
    ),
    (
        "**.example.com",
        ["a.example.com", "a.b.c.example.com"],
        ["example.com", "example.com.evil", "aexample.com"],
    ),
    ("*.internal", ["db.internal"], ["internal", "a.b.internal"]),
]


@pytest.mark.parametrize("pattern, yes, no", MATCHING, ids=[m[0] for m in MATCHING])
def test_cilium_patterns(pattern, yes, no):
    rule = names(pattern)
    for name in yes:
        assert rule.matches(hello(name)), name
    for name in no:
        assert not rule.matches(hello(name)), name


def test_no_name_matches_nothing_not_even_a_wildcard():
    rule = names("**.example.com", "api.example.com")
    assert not rule.matches(hello(""))
    assert rule.explain(hello("")) == "the ClientHello names no server"


def test_explain_names_the_pattern_and_says_when_the_name_is_echs_outer_one():
    rule = names("API.example.com", "*.svc.example.com")
    assert rule.describe() == "serverNames api.example.com, *.svc.example.com"
    assert rule.explain(hello("a.svc.example.com")) == (
        "server name 'a.svc.example.com' matches '*.svc.example.com'"
    )
    assert rule.explain(hello("public.example.net", ech=True)) == (
        "server name 'public.example.net' (the outer name: the client uses ECH) "
        "matches none of them"
    )
    assert rule.edits(hello("api.example.com")) == ()


@pytest.mark.parametrize(
    "value, path, reason",
    [
        ("api.example.com", "toPorts[0].serverNames", "expected a list of server names"),
        ([""], "toPorts[0].serverNames[0]", "expected a server name"),
        (["ok.example", 443], "toPorts[0].serverNames[1]", "expected a server name, got 443"),
        (["*"], "toPorts[0].serverNames[0]", "leave serverNames out"),
        (["**"], "toPorts[0].serverNames[0]", "leave serverNames out"),
        (["a.*.example.com"], "toPorts[0].serverNames[0]", "whole leftmost label"),
        (["*api.example.com"], "toPorts[0].serverNames[0]", "whole leftmost label"),
        (["api.example.com."], "toPorts[0].serverNames[0]", "ends with a dot"),
        (["10.1.2.3"], "toPorts[0].serverNames[0]", "is an IP address"),
        (["*.10.1.2.3"], "toPorts[0].serverNames[0]", "is an IP address"),
        (["::1"], "toPorts[0].serverNames[0]", "is an IP address"),
        (["b\u00fccher.example"], "toPorts[0].serverNames[0]", "xn--bcher-kva.example"),
        (["a..example.com"], "toPorts[0].serverNames[0]", "not a DNS name"),
        (["a b.example.com"], "toPorts[0].serverNames[0]", "not a DNS name"),
        (["x" * 64 + ".example.com"], "toPorts[0].serverNames[0]", "not a DNS name"),
    ],
)
def test_bad_names_are_refused_at_load_with_their_path(value, path, reason):
    with pytest.raises(PolicyError) as err:
        kind("serverNames").compile(value, YamlPath(("toPorts[0].serverNames",)))
    assert err.value.path == path
    assert reason in err.value.reason


# --------------------------------------------------------------------------- the loader

DOC = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: sni}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - PORTRULE
"""


def port_rule(body: str) -> str:
    return DOC.replace("PORTRULE", textwrap.indent(body, "      ").lstrip())


@pytest.mark.parametrize(
    "body, path, reason",
    [
        (
            'ports: [{port: "443"}]\nserverNames: [a.example]\nrules: {http: [{method: GET}]}',
            "spec.ingress[0].toPorts[0].serverNames",
            "serverNames and rules.http on one port",
        ),
        (
            "serverNames: [a.example]",
            "spec.ingress[0].toPorts[0].serverNames",
            "serverNames need toPorts[].ports",
        ),
        (
            'ports: [{port: "443", endPort: 444}]\nserverNames: [a.example]',
            "spec.ingress[0].toPorts[0].ports",
            "serverNames apply to single TCP ports only",
        ),
        (
            'ports: [{port: "443"}]\nterminatingTLS: {secret: {name: tls}}',
            "spec.ingress[0].toPorts[0].rules",
            "need L7 rules that name the protocol inside the TLS",
        ),
        (
            'ports: [{port: "443"}]\noriginatingTLS: {secret: {name: ca}}\nrules: {http: [{}]}',
            "spec.ingress[0].toPorts[0].originatingTLS",
            "originatingTLS needs terminatingTLS",
        ),
        (
            'ports: [{port: "443"}]\nterminatingTLS: {secret: {name: tls}}\n'
            "serverNames: [a.example]\nrules: {http: []}",
            "spec.ingress[0].toPorts[0].rules",
            "the rules for the cleartext must be written out",
        ),
        (
            'ports: [{port: "443"}]\nterminatingTLS: {secret: {name: Api_TLS}}\n'
            "rules: {http: [{}]}",
            "spec.ingress[0].toPorts[0].terminatingTLS.secret.name",
            "'Api_TLS' is not a Kubernetes object name",
        ),
        (
            'ports: [{port: "443"}]\nterminatingTLS: {certificate: tls.crt}\nrules: {http: [{}]}',
            "spec.ingress[0].toPorts[0].terminatingTLS.secret",
            "required",
        ),
        (
            'ports: [{port: "443"}]\nterminatingTLS: {secret: {name: t}, privateKey: ../k}\n'
            "rules: {http: [{}]}",
            "spec.ingress[0].toPorts[0].terminatingTLS.privateKey",
            "'../k' is not an item of a secret",
        ),
        (
            'ports: [{port: "443"}]\nterminatingTLS: {secret: {name: t}, key: tls.key}\n'
            "rules: {http: [{}]}",
            "spec.ingress[0].toPorts[0].terminatingTLS.key",
            "unknown field",
        ),
        (
            'ports: [{port: "443"}]\nserverNames: [ok.example, "a.*.example"]',
            "spec.ingress[0].toPorts[0].serverNames[1]",
            "whole leftmost label",
        ),
        (
            'ports: [{port: "443"}]\nrules: {serverNames: [a.example]}',
            "spec.ingress[0].toPorts[0].rules.serverNames",
            "unknown field",
        ),
    ],
)
def test_the_loader_refuses_naming_file_path_and_reason(body, path, reason):
    with pytest.raises(PolicyError) as err:
        load_text(port_rule(body), source="sni.yaml")
    assert (err.value.file, err.value.path) == ("sni.yaml", path)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"sni.yaml: {path}: ")


def test_a_port_with_server_names_is_parsed_as_tls_with_one_compiled_rule():
    (policy,) = load_text(
        port_rule('ports: [{port: "443"}]\nserverNames: [a.example, "*.b.example"]')
    )
    (pr,) = policy.rules[0].to_ports
    assert pr.parser == "tls"
    (ref,) = pr.l7
    assert ref.path == "spec.ingress[0].toPorts[0].serverNames"
    assert ref.rule.describe() == "serverNames a.example, *.b.example"


def test_an_empty_list_restricts_nothing_as_in_cilium():
    (policy,) = load_text(port_rule('ports: [{port: "443"}]\nserverNames: []'))
    (pr,) = policy.rules[0].to_ports
    assert (pr.parser, pr.l7) == (None, ())


def test_the_example_policies_validate():
    assert {p.name for p in load_paths(sorted(POLICIES.glob("tls-*.yaml")))} == {
        "payments-egress-tls",
        "tls-frontend",
        "orders-https",
        "kafka-tls",
        "payments-egress-https",
    }


# --------------------------------------------------------------------------- the engine


def frontend():
    identities = IdentityAllocator()
    ep = Endpoint(
        1,
        "frontend",
        identities.for_labels({"app": "tls-frontend"}),
        ipaddress.IPv4Address("10.0.0.1"),
    )
    compiled = compile_policy(
        load_paths([POLICIES / "tls-sni-ingress.yaml"]),
        [ep],
        identities,
        host_prefixes=[ipaddress.IPv4Network("127.0.0.0/8")],
    )
    state = PolicyState(compiled)
    return compiled, state.connection(state.side("127.0.0.1", 40000), state.side("10.0.0.1", 443))


def test_the_port_is_parsed_as_tls_and_redirected_to_the_tls_listener():
    compiled, conn = frontend()
    assert conn.l4.allowed and conn.parser == "tls"
    redirects = {
        (e.port_lo, e.action, e.proxy_port) for e in compiled.kernel_entries({"tls": 15443})
    }
    assert redirects == {(443, "redirect", 15443)}


@pytest.mark.parametrize(
    "sni, allowed, rule, reason",
    [
        (
            "www.example.com",
            True,
            "spec.ingress[0].toPorts[0].serverNames",
            "allowed by serverNames",
        ),
        ("a.b.apps.example.com", True, "spec.ingress[0].toPorts[0].serverNames", "allowed by"),
        (
            "admin.apps.example.com",
            False,
            "spec.ingressDeny[0].toPorts[0].serverNames",
            "denied by L7 deny rule",
        ),
        (
            "ADMIN.apps.example.com",
            False,
            "spec.ingressDeny[0].toPorts[0].serverNames",
            "denied by",
        ),
        ("example.com", False, "", "no L7 rule matches"),
        ("", False, "", "no L7 rule matches"),
    ],
)
def test_each_name_is_judged_once_by_the_ports_rules(sni, allowed, rule, reason):
    _, conn = frontend()
    decision = conn.decide(hello(sni))
    assert (decision.allowed, decision.rule) == (allowed, rule)
    assert reason in decision.reason
    assert decision.policy == "tls-frontend"


def test_an_l4_rule_on_the_same_port_allows_every_name():
    doc = port_rule('ports: [{port: "443"}]\nserverNames: [a.example]').replace(
        "  ingress:\n", '  ingress:\n  - toPorts: [{ports: [{port: "443"}]}]\n'
    )
    identities = IdentityAllocator()
    ep = Endpoint(
        1, "api", identities.for_labels({"app": "api"}), ipaddress.IPv4Address("10.0.0.1")
    )
    state = PolicyState(compile_policy(load_text(doc), [ep], identities))
    conn = state.connection(state.side("10.9.9.9", 1), state.side("10.0.0.1", 443))
    assert conn.decide(hello("anything.example")).allowed


def test_rules_of_other_kinds_never_judge_a_client_hello():
    doc = DOC.replace(
        "PORTRULE",
        '{ports: [{port: "443"}], serverNames: [a.example]}\n'
        '    - {ports: [{port: "443"}], rules: {http: [{method: GET}]}}',
    )
    identities = IdentityAllocator()
    ep = Endpoint(
        1, "api", identities.for_labels({"app": "api"}), ipaddress.IPv4Address("10.0.0.1")
    )
    state = PolicyState(compile_policy(load_text(doc), [ep], identities))
    conn = state.connection(state.side("10.9.9.9", 1), state.side("10.0.0.1", 443))
    trace: list[str] = []
    assert conn.decide(hello("a.example"), trace).allowed
    assert not conn.decide(hello("b.example")).allowed
    assert any("http rules on this port do not judge TlsClientHello requests" in t for t in trace)


# --------------------------------------------------------------------------- policy trace


def trace_json(*args: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "l7proxy", "policy", "trace", "--json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}


EGRESS = ("--policy", str(POLICIES / "tls-sni-egress.yaml"), "--from", "app=payments")
EGRESS += ("--to", "203.0.113.7", "--port", "443")


def test_trace_explains_an_allowed_name_with_the_pattern_that_matched():
    code, result = trace_json(*EGRESS, "--tls", "my-bucket.s3.amazonaws.com h2,http/1.1")
    assert code == 0
    (entry,) = result["l7"]
    assert entry["request"] == {
        "protocol": "tls",
        "sni": "my-bucket.s3.amazonaws.com",
        "alpn": ["h2", "http/1.1"],
        "versions": ["TLSv1.3", "TLSv1.2"],
        "ech": False,
    }
    assert entry["summary"] == "tls sni=my-bucket.s3.amazonaws.com alpn=h2,http/1.1"
    assert entry["trace"][-1].endswith(
        "MATCH (server name 'my-bucket.s3.amazonaws.com' matches '*.s3.amazonaws.com')"
    )
    assert result["verdict"]["rule"] == "spec.egress[0].toPorts[0].serverNames"


@pytest.mark.parametrize(
    "tls, why",
    [
        ("a.b.s3.amazonaws.com", "server name 'a.b.s3.amazonaws.com' matches none of them"),
        ("-", "the ClientHello names no server"),
        (
            "cover.example.net http/1.1 ech",
            "server name 'cover.example.net' (the outer name: the client uses ECH) matches none",
        ),
    ],
)
def test_trace_explains_a_denied_name(tls, why):
    code, result = trace_json(*EGRESS, "--tls", tls)
    assert code == 1
    assert why in result["l7"][0]["trace"][-1]
    assert result["verdict"]["verdict"] == "DENIED"
    assert result["verdict"]["reason"] == "no L7 rule matches"


def test_trace_refuses_a_malformed_tls_argument():
    proc = subprocess.run(
        [sys.executable, "-m", "l7proxy", "policy", "trace", *EGRESS, "--tls", "a b c d"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "expected 'SERVER-NAME [ALPN,...] [ech]'" in proc.stderr


def test_trace_names_the_secrets_of_a_terminated_port_and_judges_the_cleartext():
    code, result = trace_json(
        "--policy", str(POLICIES / "tls-terminate-http.yaml"), "--from", "203.0.113.9",
        "--to", "app=orders", "--port", "8443", "--http", "DELETE /v1/orders",
    )  # fmt: skip
    assert code == 1
    assert result["l3l4"]["tls"] == {
        "terminating": "shop/orders-tls",
        "originating": "shop/orders-ca",
    }
    assert result["l3l4"]["parser"] == "http"
    assert result["verdict"]["verdict"] == "DENIED"


def test_server_names_on_a_terminated_port_join_the_rules_of_the_cleartext():
    (policy,) = load_text(
        port_rule(
            'ports: [{port: "443"}]\nterminatingTLS: {secret: {name: tls}}\n'
            "serverNames: [a.example]\nrules: {http: [{method: GET}]}"
        )
    )
    (pr,) = policy.rules[0].to_ports
    assert pr.parser == "http"  # the cleartext's engine
    assert pr.tls is not None and pr.tls.server_names
    assert [ref.kind.key for ref in pr.l7] == ["http", "serverNames"]
