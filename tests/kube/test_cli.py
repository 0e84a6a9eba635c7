"""``l7proxy run``'s Kubernetes options, as parsed."""

from __future__ import annotations

import subprocess
import sys

from l7proxy.cli import build_parser


def test_run_takes_kubernetes_options() -> None:
    args = build_parser().parse_args(
        ["run", "--k8s", "--kubeconfig", "/etc/kube.conf", "--node-name", "worker-1"]
    )
    assert (args.k8s, str(args.kubeconfig), args.node_name) == (True, "/etc/kube.conf", "worker-1")
    assert not build_parser().parse_args(["run"]).k8s


def test_a_kubeconfig_without_k8s_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "l7proxy", "run", "--kubeconfig", "/etc/kube.conf"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "--kubeconfig needs --k8s"
