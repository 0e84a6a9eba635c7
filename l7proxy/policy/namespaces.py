"""Kubernetes namespaces in selectors, as Cilium scopes a policy read from the API.

A pod's identity carries the label ``k8s:io.kubernetes.pod.namespace`` (stored
here without its ``k8s:`` source, as every label; ``load`` strips the source
from selectors the same way), and its namespace's labels as
``io.cilium.k8s.namespace.labels.<key>``. With those, a selector can name a
namespace, and:

- a ``CiliumNetworkPolicy`` (namespaced) selects pods of its own namespace only:
  its ``endpointSelector`` gets ``io.kubernetes.pod.namespace=<its namespace>``
  (replacing any namespace it names in ``matchLabels``);
  each ``fromEndpoints``/``toEndpoints`` selector that names no namespace, by name
  or by namespace labels, gets the same (so ``{}`` means "every pod of this
  namespace", and ``io.cilium.k8s.namespace.labels.team: a`` "pods of namespaces
  labelled team=a", wherever they are);
- a ``CiliumClusterwideNetworkPolicy``'s peer selectors that name no namespace get
  ``io.kubernetes.pod.namespace Exists``: they match pods, never a peer that is
  not a Kubernetes pod.

Selectors on reserved labels (``reserved:host``…) are left alone, as in Cilium.
Policy files (single-node mode) are not scoped: their endpoints have no namespace.
"""

from __future__ import annotations

from dataclasses import replace

from l7proxy.policy.model import LabelSelector, Peers, Policy, Requirement, Rule

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"


def _names_namespace(selector: LabelSelector) -> bool:
    return any(k == NAMESPACE_LABEL for k, _ in selector.match_labels) or any(
        r.key == NAMESPACE_LABEL for r in selector.match_expressions
    )


def _reserved(selector: LabelSelector) -> bool:
    keys = [k for k, _ in selector.match_labels] + [r.key for r in selector.match_expressions]
    return any(k.startswith("reserved:") for k in keys)


def _names_namespace_labels(selector: LabelSelector) -> bool:
    keys = [k for k, _ in selector.match_labels] + [r.key for r in selector.match_expressions]
    return any(k.startswith(NAMESPACE_LABELS_PREFIX) for k in keys)


def in_namespace(selector: LabelSelector, namespace: str) -> LabelSelector:
    """``selector`` limited to ``namespace``, unless it names a namespace itself, or
    namespaces by their labels."""
    if _names_namespace(selector) or _names_namespace_labels(selector) or _reserved(selector):
        return selector
    labels = tuple(sorted((*selector.match_labels, (NAMESPACE_LABEL, namespace))))
    return replace(selector, match_labels=labels)


def in_any_namespace(selector: LabelSelector) -> LabelSelector:
    """``selector`` limited to pods (unless it names a namespace itself)."""
    if _names_namespace(selector) or _reserved(selector):
        return selector
    exists = Requirement(NAMESPACE_LABEL, "Exists")
    return replace(selector, match_expressions=(*selector.match_expressions, exists))


def scoped(policy: Policy) -> Policy:
    """A policy read from the Kubernetes API, scoped as Cilium scopes it (see above)."""
    ns = policy.namespace
    if ns:
        subject = LabelSelector(
            tuple(
                sorted(
                    (
                        *[(k, v) for k, v in policy.selector.match_labels if k != NAMESPACE_LABEL],
                        (NAMESPACE_LABEL, ns),
                    )
                )
            ),
            policy.selector.match_expressions,
        )

        def peer(s: LabelSelector) -> LabelSelector:
            return in_namespace(s, ns)
    else:
        subject = policy.selector

        def peer(s: LabelSelector) -> LabelSelector:
            return in_any_namespace(s)

    def rule(r: Rule) -> Rule:
        if not r.peers.endpoints:
            return r
        peers = Peers(tuple(peer(s) for s in r.peers.endpoints), r.peers.cidrs, r.peers.entities)
        return replace(r, peers=peers)

    return replace(policy, selector=subject, rules=tuple(rule(r) for r in policy.rules))
