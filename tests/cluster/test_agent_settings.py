"""``l7proxy run --etcd``/``--etcd-config``: where etcd is, read as the agent reads it,
and the labels an agent writes there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from l7proxy.agent.cluster import (
    ClusterSettingsError,
    EtcdSettings,
    parse_endpoints,
    read_etcd_config,
)
from l7proxy.cli import build_parser
from l7proxy.cli.agent import cluster_config
from l7proxy.cluster.keys import with_source, without_source
from tests.support import REPO


def test_the_deploy_configmap_is_what_the_agent_reads(tmp_path: Path) -> None:
    configmap = yaml.safe_load((REPO / "deploy/kubernetes/configmap.yaml").read_text())
    mounted = tmp_path / "etcd.config"
    mounted.write_text(configmap["data"]["etcd.config"])
    assert read_etcd_config(mounted) == EtcdSettings(
        (("etcd-0.etcd.kube-system.svc", 2379),), prefix="cilium/state", cluster="default"
    )


def test_endpoints_as_urls_or_host_and_port() -> None:
    assert parse_endpoints("http://10.0.0.1:2380, 10.0.0.2:2379,etcd-2") == (
        ("10.0.0.1", 2380),
        ("10.0.0.2", 2379),
        ("etcd-2", 2379),
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("endpoints: []\n", "endpoints: expected a non-empty list of URLs"),
        ("endpoints: [ftp://x]\n", "scheme must be http or https"),
        ("endpoints: [https://x:2379]\n", "TLS to etcd is not supported yet"),
        ("endpoints: [http://x:99999]\n", "out of range"),
        ("endpoints: [x]\nprefx: a\n", "unknown keys ['prefx']"),
        ("- x\n", "expected a mapping with 'endpoints'"),
    ],
)
def test_a_bad_config_file_says_where_and_why(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "etcd.config"
    path.write_text(text)
    with pytest.raises(ClusterSettingsError) as err:
        read_etcd_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert why in str(err.value)


def test_command_line_settings_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "etcd.config"
    path.write_text("endpoints: [http://10.0.0.9:2379]\nprefix: p/state\ncluster: east\n")
    args = build_parser().parse_args(
        ["run", "--k8s", "--node-name", "n1", "--etcd-config", str(path), "--cluster-name", "west"]
    )
    config = cluster_config(args)
    assert (config.node, config.etcd, config.prefix, config.cluster) == (
        "n1",
        ("10.0.0.9", 2379),
        "p/state",
        "west",
    )
    assert config.lease_ttl == 900 and config.gc_every is None
    args = build_parser().parse_args(
        ["run", "--etcd", "127.0.0.1:3379", "--etcd-config", str(path), "--kvstore-lease-ttl", "6"]
    )
    config = cluster_config(args)
    assert (config.etcd, config.prefix, config.lease_ttl) == (("127.0.0.1", 3379), "p/state", 6)
    assert cluster_config(build_parser().parse_args(["run"])) is None


def test_cluster_options_without_etcd_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "l7proxy", "run", "--cluster-name", "west"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "--cluster-name needs --etcd or --etcd-config"


def test_a_bad_prefix_is_refused_before_anything_starts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "l7proxy", "run", "--etcd", "x", "--kvstore-prefix", "/a/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "prefix '/a/' must not start or end with '/'" in done.stderr


def test_labels_in_etcd_carry_cilium_s_k8s_source() -> None:
    local = {"app": "web", "io.kubernetes.pod.namespace": "default", "reserved:host": ""}
    stored = with_source(local)
    assert stored == {
        "k8s:app": "web",
        "k8s:io.kubernetes.pod.namespace": "default",
        "reserved:host": "",
    }
    assert without_source(stored) == local
    assert without_source({"any:app": "x", "container:b": "y"}) == {"app": "x", "b": "y"}
