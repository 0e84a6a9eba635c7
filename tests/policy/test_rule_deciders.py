"""What a connection calls per request is made for the rules it judges: an HTTP
rule's ``matches`` tests only the fields the rule sets, and a port's decider tries
its rules in one loop (``PortMatcher.deciders``). Both answer as the rules say.

The rule's answers are checked against ``re.fullmatch`` on each field as written;
a port's decisions against the traced path (``decide(request, trace=[])``), which
keeps the whole loop: deny first, then an L4 rule's allow-all, then the first
allow, then the port's default, with header edits and joint rules.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.rules.http import compile_rule
from parsers.requests import GrpcCall, HttpRequest
from tests.policy.test_policy_engine import build, cnp, connect

AT = YamlPath().key("rules").key("http").index(0)

METHODS = ["GET", "GET|HEAD", "P.*"]
PATHS = ["/.*", "/v1/[a-z]+", "/"]
HOSTS = ["api\\.example\\.com", ".*\\.internal"]
HEADERS: list[list[Any]] = [[], ["X-Token"], ["X-Token: s3cret"]]

rule_nodes = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(METHODS),
        "path": st.sampled_from(PATHS),
        "host": st.sampled_from(HOSTS),
        "headers": st.sampled_from(HEADERS),
    },
)
http_requests = st.builds(
    HttpRequest,
    st.sampled_from(["GET", "HEAD", "POST", "PUT"]),
    st.sampled_from(["/", "/v1/items", "/v2", "/v1/", "/v1/items/7"]),
    st.sampled_from(["api.example.com", "db.internal", "x"]),
    st.sampled_from([(), (("x-token", "s3cret"),), (("x-token", "other"),), (("x-other", "1"),)]),
)
requests = http_requests | st.builds(lambda http: GrpcCall("pkg.Svc", "Get", http), http_requests)


def matches_as_written(node: dict[str, Any], request: HttpRequest | GrpcCall) -> bool:
    http = request if isinstance(request, HttpRequest) else request.http
    for name in ("method", "path", "host"):
        if name in node and re.fullmatch(node[name], getattr(http, name)) is None:
            return False
    values = [v for k, v in http.headers if k == "x-token"]
    for header in node.get("headers", []):
        _, _, value = header.partition(": ")
        if not values or (value and value not in values):
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(rule_nodes, requests)
def test_an_http_rule_matches_a_request_when_every_field_it_sets_does(node, request):
    rule = compile_rule(node, AT)

    assert rule.matches(request) == matches_as_written(node, request)
    assert rule.may_edit is False


def test_a_rule_that_may_add_a_header_says_so_and_one_that_logs_does_not():
    adds = compile_rule({"headerMatches": [{"name": "X-Tag", "value": "a", "mismatch": "ADD"}]}, AT)
    logs = compile_rule({"headerMatches": [{"name": "X-Tag", "value": "a", "mismatch": "LOG"}]}, AT)
    fails = compile_rule({"headerMatches": [{"name": "X-Tag", "value": "a"}]}, AT)
    untagged = HttpRequest("GET", "/", "api", ())

    assert (adds.may_edit, logs.may_edit, fails.may_edit) == (True, False, False)
    assert adds.edits(untagged) == (("add", "x-tag", "a"),)
    assert (adds.matches(untagged), logs.matches(untagged), fails.matches(untagged)) == (
        True,
        True,
        False,
    )


def flow(node: dict[str, Any]) -> str:
    return "{" + ", ".join(f'{k}: "{v}"' for k, v in node.items()) + "}"


simple_nodes = st.fixed_dictionaries(
    {}, optional={"method": st.sampled_from(METHODS), "path": st.sampled_from(PATHS)}
)
# A port's allow rules: each an L7 list (one to three rules), or an L4 rule (None: all L7
# allowed); its deny rules: L7 lists too.
allow_lists = st.lists(st.none() | st.lists(simple_nodes, min_size=1, max_size=3), max_size=3)
deny_lists = st.lists(st.lists(simple_nodes, min_size=1, max_size=2), max_size=2)
EDITING = '{headerMatches: [{name: X-Tag, value: "a", mismatch: ADD}]}'


def port_policy(allows: list[Any], denies: list[Any], editing: bool) -> str:
    def port_rule(http: list[str] | None) -> str:
        rules = "" if http is None else f"\n    rules: {{http: [{', '.join(http)}]}}"
        return f'- toPorts:\n  - ports: [{{port: "80", protocol: TCP}}]{rules}'

    ingress = [port_rule(None if nodes is None else [flow(n) for n in nodes]) for nodes in allows]
    if editing:
        ingress.append(port_rule([EDITING]))
    if not ingress:  # (a selected endpoint with no rule on port 80: its default decides)
        ingress.append('- toPorts: [{ports: [{port: "81"}]}]')
    spec = "endpointSelector: {matchLabels: {class: deathstar}}\ningress:\n" + "\n".join(ingress)
    if denies:
        spec += "\ningressDeny:\n" + "\n".join(port_rule([flow(n) for n in d]) for d in denies)
    return cnp(spec)


@settings(max_examples=150, deadline=None)
@given(allow_lists, deny_lists, st.booleans(), st.lists(requests, min_size=1, max_size=6))
def test_a_ports_decider_decides_as_the_whole_loop(allows, denies, editing, sent):
    state = build(port_policy(allows, denies, editing))
    conn = connect(state, "xwing", "deathstar", 80)

    for request in sent:
        assert conn.decide(request) == conn.decide(request, trace=[])
