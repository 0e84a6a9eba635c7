"""terminatingTLS / originatingTLS from a secrets directory: every file a policy names is
read when the policy loads, and a bad one rejects the policy with the file, the YAML path
and the reason while the last good one stays; certificates changed on disk serve new
connections without a restart. In-process for the store's errors, and through the real
``l7proxy firewall`` (curl, nginx as the TLS origin) for the rest."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from l7proxy.policy.errors import PolicyError
from l7proxy.policy.load import load_text
from l7proxy.proxy.tls import TlsStore
from tests.support.firewall import running_firewall
from tests.support.tls import Pki, make_leaf, make_pki, tls_origin

NAME = "api.example.com"
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-tls, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      terminatingTLS:
        secret: {name: SECRET}
      originatingTLS:
        secret: {name: origin-ca}
      rules:
        http:
        - method: GET
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), [NAME])


def secret(root: Path, name: str, **items: Path) -> Path:
    """DIR/shop/NAME/ITEM, as a Kubernetes Secret mounted as a volume lays it out."""
    directory = root / "shop" / name
    directory.mkdir(parents=True, exist_ok=True)
    for item, source in items.items():
        shutil.copy(source, directory / item.replace("_", "."))
    return directory


@pytest.fixture(scope="module")
def secrets(tmp_path_factory, pki) -> Path:
    root = tmp_path_factory.mktemp("secrets")
    secret(root, "api-tls", tls_crt=pki.cert, tls_key=pki.key)
    secret(root, "origin-ca", ca_crt=pki.ca)
    return root


def policy(port: int, name: str = "api-tls") -> str:
    return POLICY.replace("PORT", str(port)).replace("SECRET", name)


# --------------------------------------------------------------------------- the store


def store_error(secrets: Path, text: str) -> PolicyError:
    with pytest.raises(PolicyError) as err:
        TlsStore(secrets).update(load_text(text, source="api.yaml"))
    return err.value


def test_a_policy_naming_good_files_builds_its_contexts(secrets):
    store = TlsStore(secrets)
    (pol,) = load_text(policy(443), source="api.yaml")
    store.update([pol])
    tls = pol.rules[0].to_ports[0].tls
    server = store.server_context(tls.terminating, "http")
    assert server is not None and server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.options & ssl.OP_NO_RENEGOTIATION
    assert server.num_tickets == 0 and server.options & ssl.OP_NO_TICKET  # no resumption keys
    assert server.verify_mode == ssl.CERT_NONE  # no ca.crt in the secret: no client certs
    upstream = store.client_context(tls.originating, "h2")
    assert upstream is not None and upstream.verify_mode == ssl.CERT_REQUIRED
    assert upstream.check_hostname
    assert [c["subject"] for c in upstream.get_ca_certs()] == [
        ((("commonName", "l7proxy test CA"),),)
    ]


def test_a_key_that_is_not_the_certificates_is_refused_with_file_path_and_reason(
    secrets, pki, tmp_path
):
    other = make_leaf(pki, "other-key", dns=["x.example"])
    secret(secrets, "mismatched", tls_crt=pki.cert, tls_key=other[1])
    err = store_error(secrets, policy(443, "mismatched"))
    assert err.path == "spec.ingress[0].toPorts[0].terminatingTLS"
    assert err.file == f"api.yaml ({secrets}/shop/mismatched/tls.crt)"
    assert "KEY_VALUES_MISMATCH" in err.reason


def test_a_file_that_is_not_a_certificate_is_refused(secrets, pki, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_text("not a certificate\n")
    secret(secrets, "garbage", tls_crt=garbage, tls_key=pki.key)
    err = store_error(secrets, policy(443, "garbage"))
    assert err.path == "spec.ingress[0].toPorts[0].terminatingTLS"
    assert "PEM lib" in err.reason


def test_a_missing_secret_or_item_is_refused(secrets, pki):
    err = store_error(secrets, policy(443, "nowhere"))
    assert err.reason == f"secret shop/nowhere: no directory {secrets}/shop/nowhere"
    secret(secrets, "no-key", tls_crt=pki.cert)
    err = store_error(secrets, policy(443, "no-key"))
    assert "terminatingTLS needs a certificate and a key" in err.reason
    named = policy(443).replace(
        "secret: {name: api-tls}", "secret: {name: api-tls}\n        privateKey: server.key"
    )
    err = store_error(secrets, named)
    assert err.path == "spec.ingress[0].toPorts[0].terminatingTLS.privateKey"
    assert (
        err.reason
        == f"secret shop/api-tls has no item 'server.key' ({secrets}/shop/api-tls/server.key)"
    )


def test_a_ca_bundle_without_a_ca_is_refused(secrets, pki):
    secret(secrets, "leaf-as-ca", ca_crt=pki.cert)
    err = store_error(secrets, policy(443).replace("origin-ca", "leaf-as-ca"))
    assert err.path == "spec.ingress[0].toPorts[0].originatingTLS"
    assert "holds no CA certificate" in err.reason


def test_no_secrets_directory_is_an_error_too():
    with pytest.raises(PolicyError) as err:
        TlsStore(None).update(load_text(policy(443)))
    assert "no secrets directory (--tls-secrets-dir)" in err.value.reason


# --------------------------------------------------------------------------- the firewall


@pytest.fixture(scope="module")
def origin(tmp_path_factory, pki):
    with tls_origin(tmp_path_factory.mktemp("origin"), pki) as origin:
        yield origin


@pytest.fixture
def firewall(origin, secrets):
    with running_firewall(
        policy(origin.port),
        origin.address,
        {"app": "api"},
        extra_args=["--tls-secrets-dir", str(secrets)],
    ) as fw:
        yield fw


def curl(fw, ca: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "curl", "-sS", "--max-time", "10", "--cacert", str(ca),
            "--resolve", f"{NAME}:{fw.port}:{fw.host}", *args, f"https://{NAME}:{fw.port}/",
        ],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip


def served_serial(fw) -> str:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(fw.address, timeout=5) as sock:
        with context.wrap_socket(sock, server_hostname=NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    out = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-noout", "-serial"],
        input=der, capture_output=True, check=True,
    )  # fmt: skip
    return out.stdout.decode().strip()


def serial_of(cert: Path) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-serial"], capture_output=True, check=True
    )
    return out.stdout.decode().strip()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_the_policy_terminates_and_originates_with_the_secrets_files(firewall, pki):
    out = curl(firewall, pki.ca, "--http2")
    assert out.stdout == f"hello {NAME} HTTP/2.0\n", out.stderr
    denied = curl(firewall, pki.ca, "--http1.1", "-X", "DELETE")
    assert denied.stdout == "Access denied"
    (allowed, refused) = firewall.flows(wait_for=2)
    assert (allowed["verdict"], refused["verdict"]) == ("FORWARDED", "DENIED")
    assert (allowed["tls"]["alpn"], refused["tls"]["alpn"]) == ("h2", "http/1.1")


def test_a_certificate_changed_on_disk_serves_new_connections(firewall, pki, secrets):
    before = served_serial(firewall)
    assert before == serial_of(pki.cert)
    renewed = make_leaf(pki, "renewed", dns=[NAME])
    directory = secrets / "shop" / "api-tls"
    try:
        # As a renewal writes them: the new files replace the old ones.
        for source, item in ((renewed[0], "tls.crt"), (renewed[1], "tls.key")):
            shutil.copy(source, directory / f".{item}.new")
            os.replace(directory / f".{item}.new", directory / item)
        assert wait_for(lambda: served_serial(firewall) == serial_of(renewed[0]))
        out = curl(firewall, pki.ca)
        assert out.stdout == f"hello {NAME} HTTP/2.0\n", out.stderr
        # A renewal that does not load (a key of another certificate) is refused, and
        # the certificate in force stays.
        shutil.copy(pki.key, directory / "tls.key")
        time.sleep(2.5)  # two polls
        assert served_serial(firewall) == serial_of(renewed[0])
        assert "TLS files changed but do not load" in firewall.stderr_text()
        assert "KEY_VALUES_MISMATCH" in firewall.stderr_text()
    finally:
        shutil.copy(pki.cert, directory / "tls.crt")
        shutil.copy(pki.key, directory / "tls.key")


def test_a_policy_naming_a_bad_secret_is_rejected_and_the_last_good_one_stays(
    firewall, pki, secrets, origin
):
    other = make_leaf(pki, "stray", dns=["x.example"])
    secret(secrets, "broken", tls_crt=pki.cert, tls_key=other[1])
    firewall.replace_policy(policy(origin.port, "broken"))
    assert wait_for(lambda: "policy rejected" in firewall.stderr_text())
    line = next(x for x in firewall.stderr_text().splitlines() if "policy rejected" in x)
    assert f"{secrets}/shop/broken/tls.crt" in line
    assert "spec.ingress[0].toPorts[0].terminatingTLS" in line
    assert "KEY_VALUES_MISMATCH" in line
    out = curl(firewall, pki.ca)
    assert out.stdout == f"hello {NAME} HTTP/2.0\n", out.stderr


def test_the_shipped_examples_load_with_their_secrets_laid_out_as_their_comments_say(pki, tmp_path):
    from l7proxy.policy.load import load_paths
    from tests.support import REPO

    layout = {
        "shop/orders-tls": {"tls.crt": pki.cert, "tls.key": pki.key},
        "shop/orders-ca": {"ca.crt": pki.ca},
        "data/kafka-tls": {"tls.crt": pki.cert, "tls.key": pki.key, "ca.crt": pki.ca},
        "payments/stripe-intercept": {"tls.crt": pki.cert, "tls.key": pki.key},
        "payments/public-ca": {},
    }
    for where, items in layout.items():
        (tmp_path / where).mkdir(parents=True)
        for item, source in items.items():
            shutil.copy(source, tmp_path / where / item)
    policies = load_paths(
        [
            REPO / "policies" / n
            for n in (
                "tls-terminate-http.yaml",
                "tls-terminate-kafka.yaml",
                "tls-originate-egress.yaml",
            )
        ]
    )
    store = TlsStore(tmp_path)
    store.update(policies)
    by_name = {p.name: p.rules[0].to_ports[0].tls for p in policies}
    kafka = store.server_context(by_name["kafka-tls"].terminating, "kafka")
    assert kafka is not None and kafka.verify_mode == ssl.CERT_REQUIRED  # ca.crt: mutual TLS
    public = store.client_context(by_name["payments-egress-https"].originating, "http/1.1")
    assert public is not None and len(public.get_ca_certs()) > 10  # the system's CAs


def test_policy_validate_reads_the_secrets_when_given_their_directory(secrets, pki):
    import sys

    from tests.support import REPO

    other = make_leaf(pki, "validate-stray", dns=["x.example"])
    secret(secrets, "validate-bad", tls_crt=pki.cert, tls_key=other[1])
    path = secrets.parent / "validate.yaml"

    def validate(name: str) -> subprocess.CompletedProcess:
        path.write_text(policy(443, name))
        return subprocess.run(
            [sys.executable, "-m", "l7proxy", "policy", "validate", str(path),
             "--tls-secrets-dir", str(secrets)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    good = validate("api-tls")
    assert good.returncode == 0 and good.stdout.startswith("ok: shop/api-tls")
    bad = validate("validate-bad")
    assert bad.returncode == 1
    assert bad.stderr.startswith(
        f"invalid: {path} ({secrets}/shop/validate-bad/tls.crt): "
        "spec.ingress[0].toPorts[0].terminatingTLS: certificate "
    )
    assert "KEY_VALUES_MISMATCH" in bad.stderr


SNI_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-sni, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      terminatingTLS:
        secret: {name: wide-tls}
      originatingTLS:
        secret: {name: origin-ca}
      serverNames: [api.example.com]
      rules:
        http:
        - method: GET
"""


def test_server_names_on_a_terminated_port_are_judged_before_the_handshake(origin, pki, secrets):
    """The proxy's certificate covers two names; serverNames allows one. The other gets
    access_denied in plaintext before any handshake, as on a port that is not terminated;
    the allowed one is terminated and its requests judged."""
    cert, key = make_leaf(pki, "wide", dns=[NAME, "admin.example.com"])
    secret(secrets, "wide-tls", tls_crt=cert, tls_key=key)
    with running_firewall(
        SNI_POLICY.replace("PORT", str(origin.port)),
        origin.address,
        {"app": "api"},
        extra_args=["--tls-secrets-dir", str(secrets)],
    ) as fw:
        allowed = curl(fw, pki.ca)
        assert allowed.stdout == f"hello {NAME} HTTP/2.0\n", allowed.stderr
        denied = subprocess.run(
            [
                "curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca), "--resolve",
                f"admin.example.com:{fw.port}:{fw.host}", f"https://admin.example.com:{fw.port}/",
            ],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert denied.returncode == 35 and "tlsv1 alert access denied" in denied.stderr
        hellos = [r for r in fw.flows(wait_for=3) if r["protocol"] == "tls"]
        assert [(r["verdict"], r["l7"]["sni"], r["reply"]) for r in hellos] == [
            ("FORWARDED", NAME, {}),
            ("DENIED", "admin.example.com", {"alert": "access_denied"}),
        ]
        assert hellos[0]["rule"] == "spec.ingress[0].toPorts[0].serverNames"
        (request,) = [r for r in fw.flows() if r["protocol"] == "http"]
        assert (request["verdict"], request["tls"]["sni"]) == ("FORWARDED", NAME)

        # Hellos cut over records and TCP segments are read whole before they are judged:
        # a denied one gets its alert, an allowed one its handshake, with our certificate.
        from tests.support.tls_wire import memory_client, read_alert, reframe

        for name, allowed in (("admin.example.com", False), (NAME, True)):
            context = ssl.create_default_context(cafile=str(pki.ca))
            client, incoming, outgoing = memory_client(name, context=context)
            with pytest.raises(ssl.SSLWantReadError):
                client.do_handshake()
            flight = reframe(outgoing.read(), [1, 4, 60, 100])
            with socket.create_connection(fw.address, timeout=5) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for piece in (flight[:3], flight[3:9], flight[9:10], flight[10:200], flight[200:]):
                    sock.sendall(piece)
                    time.sleep(0.03)
                if not allowed:
                    answer = b""
                    while chunk := sock.recv(100):
                        answer += chunk
                    assert read_alert(answer) == (0x0301, "fatal", "access_denied")
                    continue
                while True:
                    try:
                        client.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        if out := outgoing.read():
                            sock.sendall(out)
                        data = sock.recv(65536)
                        assert data, "the proxy closed during the handshake"
                        incoming.write(data)
                assert client.getpeercert()["subject"] == ((("commonName", NAME),),)


def test_an_item_added_to_a_secret_is_a_change_too(pki, tmp_path):
    """A ca.crt that appears in a terminating secret: client certificates are required
    from the next connection on (the secret's directory is watched, not only its files)."""
    secret(tmp_path, "api-tls", tls_crt=pki.cert, tls_key=pki.key)
    secret(tmp_path, "origin-ca", ca_crt=pki.ca)
    store = TlsStore(tmp_path)
    (pol,) = load_text(policy(443))
    store.update([pol])
    ref = pol.rules[0].to_ports[0].tls.terminating
    assert store.server_context(ref, "http").verify_mode == ssl.CERT_NONE
    assert not store.poll()
    shutil.copy(pki.ca, tmp_path / "shop" / "api-tls" / "ca.crt")
    assert store.poll()
    assert store.server_context(ref, "http").verify_mode == ssl.CERT_REQUIRED


def test_originating_tls_presents_the_secrets_client_certificate_to_the_origin(
    pki, secrets, tmp_path
):
    """An origin that requires client certificates (nginx, ssl_verify_client): the
    originatingTLS secret's tls.crt/tls.key are presented, and nginx names the subject it
    verified; without them, nginx refuses the request."""
    cert, key = make_leaf(pki, "proxy-client", subject="/O=mesh/CN=l7proxy", client=True)
    secret(secrets, "origin-mtls", ca_crt=pki.ca, tls_crt=cert, tls_key=key)
    with tls_origin(tmp_path / "mtls-origin", pki, client_ca=pki.ca) as strict:

        def through(originating: str, *curl_args: str) -> str:
            text = policy(strict.port).replace("origin-ca", originating)
            args = ["--tls-secrets-dir", str(secrets)]
            with running_firewall(text, strict.address, {"app": "api"}, extra_args=args) as fw:
                return curl(fw, pki.ca, *curl_args).stdout

        assert through("origin-mtls") == f"hello {NAME} HTTP/2.0 CN=l7proxy,O=mesh\n"
        # The CA alone: nginx answers 400 "No required SSL certificate was sent".
        assert through("origin-ca", "-w", " %{http_code}").endswith(" 400")
