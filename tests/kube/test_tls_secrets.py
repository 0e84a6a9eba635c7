"""Kubernetes Secrets as the proxy's TLS files: the agent's source watches the Secrets of
one namespace through the official client, against the API test double on a real etcd, and
writes them where the TLS store reads them; a renewed Secret is a new certificate for new
connections, a deleted one is gone, and another namespace's Secrets are never read."""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from l7proxy.kube.secrets import SecretFiles
from l7proxy.policy.load import load_text
from l7proxy.proxy.tls import TlsStore
from tests.cluster.conftest import eventually
from tests.kube.test_source import source_on
from tests.support.kube_api_double import KubeApiDouble
from tests.support.tls import make_leaf, make_pki

pytestmark = pytest.mark.cluster

NS = "l7proxy-secrets"
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-tls, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "443", protocol: TCP}]
      terminatingTLS:
        secret: {namespace: l7proxy-secrets, name: api-tls}
      rules:
        http: [{}]
"""


def tls_secret(name: str, cert: Path, key: Path, namespace: str = NS) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(cert.read_bytes()).decode(),
            "tls.key": base64.b64encode(key.read_bytes()).decode(),
        },
    }


def served_certificate(store: TlsStore) -> bytes:
    """The certificate the policy's context serves, read through a real handshake."""
    (policy,) = load_text(POLICY)
    server = store.server_context(policy.rules[0].to_ports[0].tls.terminating, "http")
    assert server is not None
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = server.wrap_bio(bios[0], bios[1], server_side=True)
    c = client_ctx.wrap_bio(bios[2], bios[3], server_hostname="api.example.com")
    for _ in range(4):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
    return c.getpeercert(binary_form=True)


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


async def test_secrets_of_the_namespace_become_the_tls_files_and_follow_renewals(
    kube_api: KubeApiDouble, kubeclient: client.ApiClient, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki", ["api.example.com"])
    renewed = make_leaf(pki, "renewed", dns=["api.example.com"])
    core = client.CoreV1Api(kubeclient)
    for ns in (NS, "shop"):
        await core.create_namespace({"metadata": {"name": ns}})
    await core.create_namespaced_secret(NS, tls_secret("api-tls", pki.cert, pki.key))
    # Elsewhere: never read (the agent's Role does not even allow it).
    await core.create_namespaced_secret("shop", tls_secret("api-tls", pki.cert, pki.key, "shop"))
    secrets_dir = tmp_path / "secrets"
    files = SecretFiles(secrets_dir, NS)
    async with source_on(kube_api, tmp_path, secrets=files) as (_source, changes):
        directory = secrets_dir / NS / "api-tls"
        assert (directory / "tls.crt").read_bytes() == pki.cert.read_bytes()
        assert os.stat(directory / "tls.key").st_mode & 0o777 == 0o600
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert not (secrets_dir / "shop").exists()

        store = TlsStore(secrets_dir)
        store.update(load_text(POLICY))
        assert served_certificate(store) == der(pki.cert)

        # A renewal (cert-manager replaces the Secret's data): new connections get it.
        await core.replace_namespaced_secret(
            "api-tls", NS, tls_secret("api-tls", renewed[0], renewed[1])
        )
        await eventually(
            lambda: (directory / "tls.crt").read_bytes() == renewed[0].read_bytes(),
            what="the renewed certificate on disk",
        )
        assert "secrets" in changes
        assert store.poll()
        assert served_certificate(store) == der(renewed[0])

        await core.delete_namespaced_secret("api-tls", NS)
        await eventually(lambda: not directory.exists(), what="the deleted Secret's files gone")
