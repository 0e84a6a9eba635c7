"""deploy/kubernetes/: every manifest parses into the official client's models, with
nothing lost on the way (the client drops a misspelt field silently, so each document
must come back out of its model unchanged), and says what the agent needs.

No cluster is reachable here; this is what CI can check.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from tests.support import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
MODELS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("v1", "Namespace"): "V1Namespace",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "V1CustomResourceDefinition",
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}[{i}]", doc)
        for path in sorted(DEPLOY.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc
    ]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


@pytest.mark.parametrize("where,doc", documents(), ids=[w for w, _ in documents()])
async def test_every_manifest_parses_into_the_clients_model_unchanged(
    where: str, doc: dict[str, Any]
) -> None:
    model = MODELS[(doc["apiVersion"], doc["kind"])]
    async with client.ApiClient() as api:
        parsed = api.deserialize(SimpleNamespace(data=json.dumps(doc)), model)
        assert type(parsed).__name__ == model
        assert api.sanitize_for_serialization(parsed) == doc


def test_the_cluster_role_grants_exactly_what_the_agent_uses() -> None:
    [role] = by_kind("ClusterRole")
    grants = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    reads = {
        (group, resource, verb)
        for group, resource in [
            ("", "pods"),
            ("", "namespaces"),
            ("cilium.io", "ciliumnetworkpolicies"),
            ("cilium.io", "ciliumclusterwidenetworkpolicies"),
        ]
        for verb in ("get", "list", "watch")
    }
    status_writes = {
        ("cilium.io", "ciliumnetworkpolicies/status", "patch"),
        ("cilium.io", "ciliumclusterwidenetworkpolicies/status", "patch"),
    }
    assert grants == reads | status_writes
    # the verbs the source's code calls: list+watch per kind, status by merge patch
    source = (REPO / "l7proxy" / "kube" / "source.py").read_text()
    verbs = set(re.findall(r"\b(?:core|custom)\.([a-z]+)_\w+", source))
    assert verbs == {"list", "patch"}  # watches are lists with watch=true


def test_the_daemonset_runs_the_agent_as_the_other_files_expect() -> None:
    [ds] = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    assert pod["hostNetwork"] is True
    [account] = by_kind("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    caps = agent["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN"]}
    assert not agent["securityContext"]["privileged"]
    assert {"run", "--k8s"} <= set(agent["args"])
    metrics = next(a for a in agent["args"] if a.startswith("--metrics="))
    host, port = metrics.removeprefix("--metrics=").split(":")
    for probe in (agent["readinessProbe"], agent["livenessProbe"]):
        assert probe["httpGet"] == {"host": host, "path": "/healthz", "port": int(port)}
    state = next(a for a in agent["args"] if a.startswith("--state-dir="))
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts["state"] == state.removeprefix("--state-dir=")
    assert mounts["bpffs"] == "/sys/fs/bpf"
    [config] = by_kind("ConfigMap")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["etcd-config"]["configMap"]["name"] == config["metadata"]["name"]
    assert yaml.safe_load(config["data"]["etcd.config"])["endpoints"]
    # the agent reads the ConfigMap where it is mounted
    etcd_config = next(a for a in agent["args"] if a.startswith("--etcd-config="))
    config_dir, _, config_file = etcd_config.removeprefix("--etcd-config=").rpartition("/")
    assert mounts["etcd-config"] == config_dir and config_file in config["data"]


def test_the_crds_serve_the_kinds_the_agent_watches_with_a_status_subresource() -> None:
    served = {
        (crd["spec"]["group"], crd["spec"]["names"]["plural"], crd["spec"]["scope"])
        for crd in by_kind("CustomResourceDefinition")
        if all("status" in v["subresources"] for v in crd["spec"]["versions"])
    }
    assert served == {
        ("cilium.io", "ciliumnetworkpolicies", "Namespaced"),
        ("cilium.io", "ciliumclusterwidenetworkpolicies", "Cluster"),
    }


def test_the_containerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert sources
    for names in sources:
        for name in names:
            assert (REPO / name).exists(), name
    assert Path(REPO / "pyproject.toml").read_text().count("kubernetes_asyncio==") == 1


def test_tls_secrets_are_read_from_one_namespace_into_memory_only() -> None:
    [role] = by_kind("Role")
    [binding] = by_kind("RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "l7proxy-secrets"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "l7proxy", "namespace": "kube-system"}
    ]
    [daemonset] = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    assert "--tls-secrets-dir=/run/l7proxy/secrets" in agent["args"]
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/run/l7proxy/secrets")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
