"""``l7proto: cassandra`` rules: compilation, validation, matching, and a whole policy."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.errors import PolicyError, YamlPath
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_paths, load_text
from l7proxy.policy.rules import kind
from l7proxy.policy.rules.cassandra import compile_rule
from l7proxy.policy.state import PolicyState
from parsers.requests import CqlRequest
from tests.support import REPO


def q(action: str, table: str, opcode: str = "query") -> CqlRequest:
    return CqlRequest(opcode=opcode, action=action, table=table)


def test_registered_as_generic_kind_for_the_cassandra_parser():
    k = kind("cassandra")
    assert k is not None and k.generic and k.parser == "cassandra"


@pytest.mark.parametrize(
    "rule, request_, expected",
    [
        ({"query_action": "select", "query_table": r"ks\..*"}, q("select", "ks.t"), True),
        ({"query_action": "select", "query_table": r"ks\..*"}, q("insert", "ks.t"), False),
        ({"query_action": "select", "query_table": r"ks\..*"}, q("select", "other.t"), False),
        # full match, not search
        ({"query_table": "ks.t"}, q("select", "ks.tt"), False),
        ({"query_table": "ks.t"}, q("select", "xks.t"), False),
        ({"query_table": "ks.t"}, q("delete", "ks.t"), True),
        # a statement naming no table does not match a table rule
        ({"query_table": ".*"}, q("create-role", ""), False),
        ({"query_table": ".*"}, q("unknown", ""), False),
        # no keys: anything
        ({}, q("unknown", ""), True),
        ({"query_action": "create-role"}, q("create-role", ""), True),
        # keyspace statements match on the keyspace name
        ({"query_action": "use", "query_table": "ks"}, q("use", "ks"), True),
        (
            {"query_action": "drop-keyspace", "query_table": "prod.*"},
            q("drop-keyspace", "staging"),
            False,
        ),
        # prepared statements are judged by their statement's action, whatever the opcode
        ({"query_action": "select"}, q("select", "ks.t", opcode="execute"), True),
        # case matters for quoted names: the regex sees them as written
        ({"query_table": "ks.users"}, q("select", "ks.Users"), False),
    ],
)
def test_matches(rule, request_, expected):
    compiled = compile_rule(rule, YamlPath(("l7[0]",)))
    assert compiled.matches(request_) is expected
    assert (compiled.explain(request_) == "matches") is expected


def test_explain_and_describe_say_what_failed():
    rule = compile_rule({"query_action": "select", "query_table": r"ks\.public"}, YamlPath())
    assert rule.describe() == r"query_action=select query_table=ks\.public"
    assert rule.explain(q("insert", "ks.public")) == "query_action insert != select"
    assert "ks.secret" in rule.explain(q("select", "ks.secret"))
    assert compile_rule({}, YamlPath()).describe() == "any CQL statement"


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"query_action": "selec"}, "unknown query_action 'selec'"),
        (
            {"query_action": "truncate"},
            "unknown query_action 'truncate'",
        ),  # Cilium spells it truncate-table
        ({"query_action": 3}, "unknown query_action 3"),
        ({"query_table": "ks.(unclosed"}, "invalid regex"),
        ({"query_table": ""}, "non-empty regex"),
        ({"query_table": ["ks"]}, "non-empty regex"),
        ({"query_action": "create-role", "query_table": "ks.t"}, "names no table"),
        ({"query_action": "select", "table": "ks.t"}, "unknown field 'table'"),
        ("select", "expected a mapping"),
    ],
)
def test_invalid_rules_are_rejected_with_their_path(rule, message):
    with pytest.raises(PolicyError) as err:
        compile_rule(rule, YamlPath(("spec", ".ingress[0]", ".l7[0]")))
    assert message in str(err.value)
    assert "spec.ingress[0].l7[0]" in str(err.value)


POLICY = textwrap.dedent(
    """\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: cql}
    spec:
      endpointSelector: {matchLabels: {app: cassandra}}
      ingress:
      - toPorts:
        - ports: [{port: "9042", protocol: TCP}]
          rules:
            l7proto: cassandra
            l7:
            - query_action: select
              query_table: "ks\\\\.public"
            - query_action: insert
    """
)


def decide(policy_text: str, request: CqlRequest):
    identities = IdentityAllocator()
    endpoint = Endpoint(
        1,
        "cassandra",
        identities.for_labels({"app": "cassandra"}),
        ipaddress.IPv4Address("10.0.0.2"),
    )
    state = PolicyState(compile_policy(load_text(policy_text), [endpoint], identities))
    conn = state.connection(state.side("10.0.0.1", 40000), state.side("10.0.0.2", 9042))
    return conn.decide(request)


def test_a_whole_policy_decides_cql_requests():
    assert decide(POLICY, q("select", "ks.public")).allowed
    assert decide(POLICY, q("insert", "any.table")).allowed
    denied = decide(POLICY, q("select", "ks.secret"))
    assert not denied.allowed and denied.policy == "cql"


def test_a_bad_rule_in_a_policy_names_its_yaml_path():
    with pytest.raises(PolicyError) as err:
        load_text(POLICY.replace("query_action: insert", "query_action: upsert"))
    assert "l7[1].query_action" in str(err.value)


def test_shipped_example_policies_load():
    paths = sorted(REPO.glob("policies/cassandra-*.yaml"))
    assert paths, "policies/cassandra-*.yaml missing"
    for path in paths:
        assert load_paths([path])


def test_a_deny_section_wins_over_an_allow_all_rule():
    policy = POLICY.replace("- query_action: insert", "- {}") + (
        "  ingressDeny:\n"
        "  - toPorts:\n"
        '    - ports: [{port: "9042", protocol: TCP}]\n'
        "      rules:\n"
        "        l7proto: cassandra\n"
        "        l7:\n"
        "        - query_action: truncate-table\n"
    )
    assert decide(policy, q("delete", "ks.anything")).allowed
    assert not decide(policy, q("truncate-table", "ks.anything")).allowed
