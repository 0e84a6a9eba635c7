"""Kubernetes objects for the tests, as a user would write them."""

from __future__ import annotations

from typing import Any


def pod(name: str, *, node: str, ip: str | None, labels: dict[str, str], **spec: Any) -> dict:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "app"}], **spec},
        "status": {"podIP": ip, "phase": "Running"} if ip else {"phase": "Pending"},
    }


def namespace(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": labels}}


def cnp(name: str, spec: dict) -> dict:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def ccnp(name: str, spec: dict) -> dict:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


# Cilium's Star Wars rule: only the empire may land, and only by POST /v1/request-landing.
LANDING = {
    "endpointSelector": {"matchLabels": {"org": "empire", "class": "deathstar"}},
    "ingress": [
        {
            "fromEndpoints": [{"matchLabels": {"org": "empire"}}],
            "toPorts": [
                {
                    "ports": [{"port": "80", "protocol": "TCP"}],
                    "rules": {"http": [{"method": "POST", "path": "/v1/request-landing"}]},
                }
            ],
        }
    ],
}
