"""serverNames behind the kernel redirect: curl in one endpoint's namespace, nginx serving
TLS in another's, the real agent between them. An allowed name is relayed and verified end
to end; a denied one gets access_denied from the transparent proxy, and the origin never
sees it."""

from __future__ import annotations

import textwrap

import pytest

from tests.support.node import running_node
from tests.support.tls import make_pki, tls_origin

pytestmark = [pytest.mark.root, pytest.mark.slow]

POLICY = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server-tls}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: client}}]
        toPorts:
        - ports: [{port: "443", protocol: TCP}]
          serverNames: [api.example.com]
    """
)


def test_server_names_behind_the_kernel_redirect(tmp_path):
    pki = make_pki(tmp_path / "pki", ["api.example.com", "other.example.com"])
    with running_node({"server": {"app": "server"}, "client": {"app": "client"}}) as node:
        ip = node.ip("server")
        netns = ["ip", "netns", "exec", node.endpoint("server").netns]
        # Started before the policy, while the host may still reach it to see it listen.
        with tls_origin(tmp_path, pki, host=ip, port=443, prefix=netns):
            node.import_policy(POLICY)

            def curl(name: str):
                return node.run_in(
                    "client",
                    [
                        "curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca),
                        "--resolve", f"{name}:443:{ip}", f"https://{name}/",
                    ],
                )  # fmt: skip

            allowed = curl("api.example.com")
            assert (allowed.returncode, allowed.stdout) == (0, "hello api.example.com HTTP/2.0\n")
            denied = curl("other.example.com")
            assert denied.returncode == 35 and "tlsv1 alert access denied" in denied.stderr

            records = node.flows(wait_for=lambda r: r.get("verdict") == "DENIED")
            tls = [r for r in records if r.get("protocol") == "tls"]
            assert [(r["verdict"], r["l7"]["sni"]) for r in tls] == [
                ("FORWARDED", "api.example.com"),
                ("DENIED", "other.example.com"),
            ]
            assert tls[0]["source"]["labels"] == {"app": "client"}
            assert tls[0]["l7"]["alpn"] == ["h2", "http/1.1"]
            assert tls[1]["reply"] == {"alert": "access_denied"}


TERMINATING = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server-https, namespace: web}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: client}}]
        toPorts:
        - ports: [{port: "443", protocol: TCP}]
          terminatingTLS:
            secret: {name: api-tls}
          originatingTLS:
            secret: {name: origin-ca}
          rules:
            http:
            - method: GET
    """
)


def test_terminating_and_originating_tls_behind_the_kernel_redirect(tmp_path):
    """The transparent proxy terminates the client's TLS with the secret's certificate,
    judges the decrypted requests, and opens its own TLS session to nginx, verified
    against the secret's CA; a denial is a 403 inside the client's session."""
    pki = make_pki(tmp_path / "pki", ["api.example.com"])
    with running_node({"server": {"app": "server"}, "client": {"app": "client"}}) as node:
        secrets = node.store.root / "secrets" / "web"
        (secrets / "api-tls").mkdir(parents=True)
        (secrets / "origin-ca").mkdir()
        (secrets / "api-tls" / "tls.crt").write_bytes(pki.cert.read_bytes())
        (secrets / "api-tls" / "tls.key").write_bytes(pki.key.read_bytes())
        (secrets / "origin-ca" / "ca.crt").write_bytes(pki.ca.read_bytes())
        ip = node.ip("server")
        netns = ["ip", "netns", "exec", node.endpoint("server").netns]
        with tls_origin(tmp_path, pki, host=ip, port=443, prefix=netns):
            node.import_policy(TERMINATING)

            def curl(*args: str):
                return node.run_in(
                    "client",
                    [
                        "curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca),
                        "--resolve", f"api.example.com:443:{ip}", "-w", " %{http_code}",
                        *args, "https://api.example.com/",
                    ],
                )  # fmt: skip

            allowed = curl("--http2")
            assert (allowed.returncode, allowed.stdout) == (
                0,
                "hello api.example.com HTTP/2.0\n 200",
            ), allowed.stderr
            denied = curl("--http1.1", "-X", "DELETE")
            assert (denied.returncode, denied.stdout) == (0, "Access denied 403")

            records = node.flows(wait_for=lambda r: r.get("verdict") == "DENIED")
            http = [r for r in records if r.get("protocol") == "http"]
            assert [(r["verdict"], r["l7"]["method"], r["tls"]["alpn"]) for r in http] == [
                ("FORWARDED", "GET", "h2"),
                ("DENIED", "DELETE", "http/1.1"),
            ]
            assert http[0]["source"]["labels"] == {"app": "client"}
            assert http[0]["reply"]["status"] == 200
            tls = node.wait_status(lambda st: st.get("tls", {}).get("terminating"))["tls"]
            assert (tls["terminating"], tls["originating"]) == (
                ["web/api-tls (http)"],
                ["web/origin-ca"],
            )
            status = node.cli("status").stdout
            assert "TLS (" in status and "terminating web/api-tls (http)" in status
