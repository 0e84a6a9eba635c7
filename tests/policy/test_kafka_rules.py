"""rules.kafka: every field, Cilium's topic semantics, validation with YAML paths."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from l7proxy.policy.engine import Endpoint, compile_policy
from l7proxy.policy.errors import PolicyError, YamlPath
from l7proxy.policy.identity import IdentityAllocator
from l7proxy.policy.load import load_text
from l7proxy.policy.rules import kind
from l7proxy.policy.rules.kafka import ROLES, allowed
from l7proxy.policy.state import PolicyState
from parsers.requests import KafkaRequest

PRODUCE, FETCH, LIST_OFFSETS, METADATA, OFFSET_COMMIT, JOIN_GROUP = 0, 1, 2, 3, 8, 11
INIT_PRODUCER_ID, API_VERSIONS, CREATE_TOPICS, CG_HEARTBEAT = 22, 18, 19, 68


def rule(**fields):
    return kind("kafka").compile(fields, YamlPath(("rules.kafka[0]",)))


def req(
    api_key=PRODUCE, version=9, client_id="app", topics=(), groups=(), txns=(), undecodable=None
):
    return KafkaRequest(
        api_key, version, 1, client_id, tuple(topics), tuple(groups), tuple(txns), undecodable
    )


def test_kind_is_registered_with_kafka_parser():
    assert kind("kafka").parser == "kafka"


def test_empty_rule_allows_everything():
    assert rule().matches(req(topics=["x"]))
    assert rule().describe() == "any"


def test_role_produce_covers_modern_producer_apis():
    r = rule(role="produce")
    for api in (PRODUCE, METADATA, API_VERSIONS, INIT_PRODUCER_ID):
        assert r.matches(req(api_key=api)), api
    assert not r.matches(req(api_key=FETCH))
    assert not r.matches(req(api_key=CREATE_TOPICS))


def test_role_consume_covers_groups_and_kip848():
    r = rule(role="consume")
    for api in (
        FETCH,
        LIST_OFFSETS,
        METADATA,
        OFFSET_COMMIT,
        JOIN_GROUP,
        CG_HEARTBEAT,
        API_VERSIONS,
    ):
        assert r.matches(req(api_key=api)), api
    assert not r.matches(req(api_key=PRODUCE))
    assert CG_HEARTBEAT in ROLES["consume"]


@pytest.mark.parametrize("spelling", ["produce", "Produce", 0, "0"])
def test_api_key_by_cilium_name_kafka_name_or_number(spelling):
    r = rule(apiKey=spelling)
    assert r.matches(req(api_key=PRODUCE)) and not r.matches(req(api_key=FETCH))


def test_api_key_offsets_is_list_offsets_as_in_cilium():
    assert rule(apiKey="offsets").matches(req(api_key=LIST_OFFSETS))


@pytest.mark.parametrize("version", [9, "9"])
def test_api_version_exact(version):
    r = rule(apiKey="produce", apiVersion=version)
    assert r.matches(req(version=9)) and not r.matches(req(version=8))
    assert "apiVersion 8 != 9" in r.explain(req(version=8))


def test_client_id_exact():
    r = rule(clientID="billing")
    assert r.matches(req(client_id="billing"))
    assert not r.matches(req(client_id="billing-2"))
    assert not r.matches(req(client_id=None))


def test_topic_every_topic_must_match():
    r = rule(role="produce", topic="orders")
    assert r.matches(req(topics=["orders"]))
    assert not r.matches(req(topics=["orders", "secrets"]))
    assert "secrets" in r.explain(req(topics=["orders", "secrets"]))
    # Naming no topic (ApiVersions, Metadata for all topics) matches on API alone.
    assert r.matches(req(api_key=API_VERSIONS))


def test_topic_prefix():
    r = rule(topicPrefix="orders.")
    assert r.matches(req(topics=["orders.eu", "orders.us"]))
    assert not r.matches(req(topics=["orders"]))
    assert r.describe() == "topicPrefix=orders."


def test_group_every_group_must_match():
    r = rule(role="consume", group="billing")
    assert r.matches(req(api_key=JOIN_GROUP, groups=["billing"]))
    assert not r.matches(req(api_key=JOIN_GROUP, groups=["other"]))
    assert r.matches(req(api_key=FETCH, topics=["any"]))


def test_transactional_id():
    r = rule(role="produce", transactionalID="tx-1")
    assert r.matches(req(api_key=INIT_PRODUCER_ID, txns=["tx-1"]))
    assert not r.matches(req(api_key=INIT_PRODUCER_ID, txns=["tx-2"]))
    assert r.matches(req(api_key=INIT_PRODUCER_ID))  # idempotent, no transaction


def test_undecodable_request_matches_only_rules_without_resources():
    bad = req(undecodable="garbage", topics=())
    assert rule(role="produce").matches(bad)
    assert not rule(role="produce", topic="orders").matches(bad)
    assert not rule(group="g").matches(bad)
    assert "undecodable" in rule(topic="orders").explain(bad)


def test_covers_and_combined_allow_across_rules():
    a, b = rule(role="produce", topic="a"), rule(role="produce", topic="b")
    both = req(topics=["a", "b"])
    assert not a.matches(both) and not b.matches(both)
    assert a.covers(both) == {"a"} and b.covers(both) == {"b"}
    assert allowed([a, b], both)
    assert not allowed([a, b], req(topics=["a", "c"]))
    # A rule whose other conditions fail covers nothing.
    assert rule(role="consume", topic="a").covers(both) == frozenset()
    assert kind("kafka").combine([a, b], both)


@pytest.mark.parametrize(
    "fields,path,message",
    [
        ({"topik": "x"}, "rules.kafka[0].topik", "unknown field"),
        ({"role": "admin"}, "rules.kafka[0].role", "produce or consume"),
        ({"apiKey": "nosuchapi"}, "rules.kafka[0].apiKey", "unknown Kafka apiKey"),
        ({"apiKey": True}, "rules.kafka[0].apiKey", "API name or number"),
        ({"apiKey": 99999}, "rules.kafka[0].apiKey", "out of range"),
        ({"apiVersion": "two"}, "rules.kafka[0].apiVersion", "integer"),
        ({"apiVersion": 1.5}, "rules.kafka[0].apiVersion", "integer"),
        ({"clientID": 3}, "rules.kafka[0].clientID", "non-empty string"),
        ({"topic": "bad topic!"}, "rules.kafka[0].topic", "legal Kafka name"),
        ({"topic": ""}, "rules.kafka[0].topic", "non-empty string"),
        ({"topicPrefix": "a/b"}, "rules.kafka[0].topicPrefix", "legal Kafka name"),
        ({"group": ["g"]}, "rules.kafka[0].group", "non-empty string"),
        ({"transactionalID": None}, "rules.kafka[0].transactionalID", "non-empty string"),
        ({"role": "produce", "apiKey": "fetch"}, "rules.kafka[0]", "mutually exclusive"),
        ({"topic": "a", "topicPrefix": "a"}, "rules.kafka[0]", "mutually exclusive"),
    ],
)
def test_validation_errors_name_the_yaml_path(fields, path, message):
    with pytest.raises(PolicyError) as err:
        rule(**fields)
    assert err.value.path == path and message in err.value.reason


def test_rule_must_be_a_mapping():
    with pytest.raises(PolicyError, match="expected a mapping"):
        kind("kafka").compile(["role"], YamlPath(("rules.kafka[0]",)))


# ---------------------------------------------------------------------------
# Through the policy loader and engine (the lead's code): a whole CNP.

POLICY = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: kafka}
    spec:
      endpointSelector: {matchLabels: {app: kafka}}
      ingress:
      - toPorts:
        - ports: [{port: "9092", protocol: TCP}]
          rules:
            kafka:
            - {role: produce, topic: orders}
            - {role: produce, topic: audit}
            - {role: consume, topicPrefix: "orders", group: billing}
    """
)


def connection():
    identities = IdentityAllocator()
    broker = Endpoint(
        1, "broker", identities.for_labels({"app": "kafka"}), ipaddress.IPv4Address("10.0.0.1")
    )
    state = PolicyState(compile_policy(load_text(POLICY), [broker], identities))
    return state.connection(state.side("10.0.0.2", 40000), state.side("10.0.0.1", 9092))


def test_policy_engine_allows_a_request_whose_topics_two_rules_cover():
    conn = connection()
    assert conn.decide(req(topics=["orders", "audit"])).allowed
    assert not conn.decide(req(topics=["orders", "secrets"])).allowed
    assert conn.decide(req(api_key=JOIN_GROUP, groups=["billing"])).allowed
    assert not conn.decide(req(api_key=JOIN_GROUP, groups=["intruders"])).allowed


def test_loader_reports_full_yaml_path_for_a_bad_kafka_rule():
    bad = POLICY.replace("role: consume", "role: admin")
    with pytest.raises(PolicyError) as err:
        load_text(bad)
    assert err.value.path.endswith("rules.kafka[2].role")


# ---------------------------------------------------------------------------
# The shipped example policies mean what their comments say.

from tests.support import REPO  # noqa: E402


def example_state():
    from l7proxy.policy.load import load_paths

    identities = IdentityAllocator()
    endpoints = [
        Endpoint(
            i + 1,
            name,
            identities.for_labels({"app": name}),
            ipaddress.IPv4Address(f"10.0.0.{i + 1}"),
        )
        for i, name in enumerate(["kafka", "billing", "analytics", "empire-outpost"])
    ]
    policies = load_paths(
        [REPO / "policies/kafka-orders.yaml", REPO / "policies/kafka-cilium-classic.yaml"]
    )
    state = PolicyState(compile_policy(policies, endpoints, identities))
    return lambda src: state.connection(state.side(src, 40000), state.side("10.0.0.1", 9092))


def test_example_policy_orders():
    conn = example_state()
    billing, analytics = conn("10.0.0.2"), conn("10.0.0.3")
    assert billing.decide(req(topics=["orders"])).allowed
    assert billing.decide(req(api_key=INIT_PRODUCER_ID, txns=["billing-tx"])).allowed
    assert not billing.decide(req(api_key=INIT_PRODUCER_ID, txns=["other-tx"])).allowed
    assert not billing.decide(req(topics=["payroll"])).allowed
    assert not billing.decide(req(api_key=FETCH, topics=["orders"])).allowed
    assert analytics.decide(req(api_key=FETCH, topics=["orders.eu", "orders"])).allowed
    assert not analytics.decide(req(api_key=JOIN_GROUP, groups=["billing"])).allowed
    assert analytics.decide(req(api_key=JOIN_GROUP, groups=["analytics"])).allowed


def test_example_policy_cilium_classic_client_id():
    outpost = example_state()("10.0.0.4")
    assert outpost.decide(
        req(api_key=FETCH, topics=["deathstar-plans"], client_id="outpost")
    ).allowed
    assert not outpost.decide(
        req(api_key=FETCH, topics=["deathstar-plans"], client_id="rebel")
    ).allowed
