"""Policy objects from the API, scoped as Cilium scopes them (no API needed)."""

from __future__ import annotations

import pytest

from l7proxy.kube.objects import CCNP, CNP, compile_policy_object, endpoint_labels, pod_from
from l7proxy.policy.errors import PolicyError
from l7proxy.policy.model import LabelSelector, Requirement
from tests.kube.objects import ccnp, cnp, pod

NS = "io.kubernetes.pod.namespace"


def api_object(obj: dict, namespace: str | None = None) -> dict:
    """As the API server returns it: its own metadata and a status beside the user's."""
    meta = obj["metadata"] | {"uid": "u1", "resourceVersion": "7", "generation": 2}
    if namespace:
        meta["namespace"] = namespace
    return obj | {"metadata": meta, "status": {"nodes": {"n1": {"ok": True}}}}


def test_a_cnp_is_scoped_to_its_namespace_and_may_name_another_for_peers() -> None:
    spec = {
        "endpointSelector": {"matchLabels": {"app": "db", f"k8s:{NS}": "elsewhere"}},
        "ingress": [
            {
                "fromEndpoints": [
                    {},
                    {"matchLabels": {"app": "web", f"k8s:{NS}": "frontend"}},
                    {"matchLabels": {"reserved:host": ""}},
                ]
            }
        ],
    }
    [policy] = compile_policy_object(CNP, api_object(cnp("db", spec), "shop"))
    # the subject is always in the policy's own namespace
    assert policy.selector == LabelSelector((("app", "db"), (NS, "shop")))
    assert policy.rules[0].peers.endpoints == (
        LabelSelector(((NS, "shop"),)),  # {}: every pod of this namespace
        LabelSelector((("app", "web"), (NS, "frontend"))),  # it named one: kept
        LabelSelector((("reserved:host", ""),)),  # reserved: untouched
    )
    assert policy.key == "shop/db" and policy.source == "k8s CiliumNetworkPolicy/shop/db"


def test_a_ccnp_selects_any_namespace_but_its_peers_are_pods() -> None:
    spec = {
        "endpointSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"fromEndpoints": [{}]}],
    }
    [policy] = compile_policy_object(CCNP, api_object(ccnp("db", spec)))
    assert policy.selector == LabelSelector((("app", "db"),))
    assert policy.rules[0].peers.endpoints == (LabelSelector((), (Requirement(NS, "Exists"),)),)
    assert policy.namespace == ""


def test_a_bad_object_is_named_with_the_path_and_reason() -> None:
    bad = cnp("x", {"endpointSelector": {}, "ingress": [{"fromEndpoints": "everyone"}]})
    with pytest.raises(PolicyError) as err:
        compile_policy_object(CNP, api_object(bad, "shop"))
    assert str(err.value) == (
        "k8s CiliumNetworkPolicy/shop/x: spec.ingress[0].fromEndpoints: expected a list, got str"
    )


def test_pod_identity_labels() -> None:
    raw = pod("web", node="n1", ip="10.0.0.5", labels={"app": "web"}, serviceAccountName="shop-sa")
    raw["metadata"]["namespace"] = "shop"
    assert endpoint_labels(pod_from(raw), {"team": "a"}) == {
        "app": "web",
        NS: "shop",
        "io.cilium.k8s.namespace.labels.team": "a",
        "io.cilium.k8s.policy.serviceaccount": "shop-sa",
    }
