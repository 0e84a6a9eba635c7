"""TLS terminated and originated by the real ``l7proxy firewall``, in front of nginx serving
TLS with certificates made by the test: curl and ``openssl s_client`` verify the proxy's
certificate (chosen by SNI), speak HTTP/2 or HTTP/1.1 as ALPN chose, and reach nginx through
a second TLS session that the proxy verified; a denial is a 403 inside the session; client
certificates are verified and their SPIFFE IDs logged; TLS 1.1, renegotiation and a stalled
handshake are refused."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.firewall import running_firewall
from tests.support.tls import Pki, make_leaf, make_pki, tls_origin
from tests.support.tls_wire import client_hello_body, ext, handshake, read_alert, records, sni_ext

NAME = "api.example.com"
SPIFFE_ID = "spiffe://example.org/ns/shop/sa/checkout"
HEADER_TIMEOUT = 1.0
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-tls}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules:
        http:
        - method: GET
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), [NAME])


@pytest.fixture(scope="module")
def other_cert(pki) -> tuple[Path, Path]:
    return make_leaf(pki, "other", dns=["other.example.com"])


@pytest.fixture(scope="module")
def client_cert(pki) -> tuple[Path, Path]:
    return make_leaf(pki, "client", uris=[SPIFFE_ID], subject="/O=shop/CN=checkout", client=True)


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> Pki:
    """Another CA, which nobody here trusts, and a server certificate for NAME by it."""
    return make_pki(tmp_path_factory.mktemp("rogue"), [NAME])


@pytest.fixture(scope="module")
def origin(tmp_path_factory, pki):
    with tls_origin(tmp_path_factory.mktemp("origin"), pki) as origin:
        yield origin


def tls_args(pki: Pki, *pairs: tuple[Path, Path]) -> list[str]:
    args = []
    for cert, key in [(pki.cert, pki.key), *pairs]:
        args += ["--tls-cert", str(cert), "--tls-key", str(key)]
    return args


@pytest.fixture(scope="module")
def firewall(origin, pki, other_cert):
    with running_firewall(
        POLICY.replace("PORT", str(origin.port)),
        origin.address,
        {"app": "api"},
        extra_args=[
            *tls_args(pki, other_cert),
            "--upstream-tls",
            "--upstream-ca",
            str(pki.ca),
            "--header-timeout",
            str(HEADER_TIMEOUT),
        ],  # fmt: skip
    ) as fw:
        yield fw


class Flows:
    """The flow records made since it was created (the firewall is shared by a module)."""

    def __init__(self, fw) -> None:
        self.fw = fw
        self.since = time.time()

    def new(self, count: int, timeout: float = 5.0, *, path: str = "") -> list[dict]:
        """``count`` records made since (with ``path``: the requests for that path only;
        without: the handshakes' own). The previous test's last request record may be
        made a moment after its client left, under load."""
        deadline = time.monotonic() + timeout

        def mine(r: dict) -> bool:
            if path:
                return r["type"] == "l7" and r["l7"].get("path") == path
            return r["type"] in ("tls", "limit")

        while True:
            records = [r for r in self.fw.flows() if r["time"] >= self.since and mine(r)]
            if len(records) >= count or time.monotonic() > deadline:
                assert len(records) == count, records
                return records
            time.sleep(0.05)


def curl(
    fw, ca: Path, *args: str, name: str = NAME, path: str = "/"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "curl", "-sS", "--max-time", "10", "--cacert", str(ca),
            "--resolve", f"{name}:{fw.port}:{fw.host}", "-w", "\n%{http_code} %{http_version}",
            *args, f"https://{name}:{fw.port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )  # fmt: skip


def s_client(fw, ca: Path, *args: str, name: str = NAME, stdin: str = "") -> str:
    out = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"{fw.host}:{fw.port}", "-servername", name,
            "-CAfile", str(ca), "-verify_return_error", *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=20,
    )  # fmt: skip
    return out.stdout + out.stderr


# --------------------------------------------------------------------------- terminated


@pytest.mark.parametrize(
    "flag, alpn, nginx_saw", [("--http2", "h2", "HTTP/2.0"), ("--http1.1", "http/1.1", "HTTP/1.1")]
)
def test_curl_reaches_the_tls_origin_through_both_sessions(firewall, pki, flag, alpn, nginx_saw):
    flows = Flows(firewall)
    out = curl(firewall, pki.ca, flag, path=f"/orders/{alpn}")
    # curl verified our certificate; nginx answered the name and protocol the client
    # chose, over the session we opened to it and verified against the same CA.
    assert out.returncode == 0, out.stderr
    version = "2" if alpn == "h2" else "1.1"
    assert out.stdout == f"hello {NAME} {nginx_saw}\n\n200 {version}"
    (rec,) = flows.new(1, path=f"/orders/{alpn}")
    assert (rec["verdict"], rec["l7"]["method"]) == ("FORWARDED", "GET")
    assert rec["reply"]["status"] == 200
    assert rec["tls"]["sni"] == NAME
    assert rec["tls"]["alpn"] == alpn
    assert rec["tls"]["version"] == "TLSv1.3"
    assert "client" not in rec["tls"]


@pytest.mark.parametrize("flag, version", [("--http2", "2"), ("--http1.1", "1.1")])
def test_a_denied_request_gets_403_inside_the_session(firewall, pki, flag, version):
    flows = Flows(firewall)
    out = curl(firewall, pki.ca, flag, "-X", "DELETE", path=f"/orders/7/{version}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"Access denied\n403 {version}"
    (rec,) = flows.new(1, path=f"/orders/7/{version}")
    assert (rec["verdict"], rec["l7"]["method"], rec["reply"]["status"]) == (
        "DENIED",
        "DELETE",
        403,
    )
    assert rec["tls"]["alpn"] == ("h2" if version == "2" else "http/1.1")


def test_the_403_on_the_wire_is_encrypted_application_data(firewall, pki):
    """Read the raw bytes: the answer arrives only as TLS application-data records, and
    decrypts to the 403."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=NAME)
    raw = b""
    with socket.create_connection(firewall.address, timeout=5) as sock:

        def pump() -> None:
            nonlocal raw
            if outgoing.pending:
                sock.sendall(outgoing.read())
            chunk = sock.recv(65536)
            raw += chunk
            incoming.write(chunk) if chunk else incoming.write_eof()

        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        handshake_bytes = len(raw)
        client.write(b"DELETE /x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        answer = b""
        while b"Access denied" not in answer:
            try:
                answer += client.read(65536)
            except ssl.SSLWantReadError:
                pump()
    assert answer.startswith(b"HTTP/1.1 403 ")
    after = raw[handshake_bytes:]
    assert b"403" not in after and b"Access denied" not in after
    # Every record after the handshake is application data (23), TLS 1.2's record version.
    types, offset = set(), 0
    while offset + 5 <= len(after):
        types.add((after[offset], after[offset + 1 : offset + 3]))
        offset += 5 + int.from_bytes(after[offset + 3 : offset + 5], "big")
    assert types == {(23, b"\x03\x03")}


def test_openssl_s_client_gets_the_alpn_it_asks_for(firewall, pki):
    assert "ALPN protocol: h2" in s_client(firewall, pki.ca, "-alpn", "h2")
    assert "ALPN protocol: http/1.1" in s_client(firewall, pki.ca, "-alpn", "http/1.1")
    out = s_client(firewall, pki.ca, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: h2" in out and "Verify return code: 0 (ok)" in out


def test_the_certificate_is_chosen_by_the_server_name(firewall, pki):
    other = s_client(
        firewall, pki.ca, "-verify_hostname", "other.example.com", name="other.example.com"
    )
    assert "subject=CN = other.example.com" in other
    assert "Verify return code: 0 (ok)" in other
    api = s_client(firewall, pki.ca, "-verify_hostname", NAME)
    assert f"subject=CN = {NAME}" in api and "Verify return code: 0 (ok)" in api
    # A name no certificate has: the first one is served (and fails the client's check).
    unknown = s_client(firewall, pki.ca, name="unknown.example.com")
    assert f"subject=CN = {NAME}" in unknown


def test_tls_1_1_is_refused(firewall):
    flows = Flows(firewall)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.warns(DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(firewall.address, timeout=5) as sock:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            context.wrap_socket(sock, server_hostname=NAME)
    (rec,) = flows.new(1)
    assert (rec["type"], rec["protocol"], rec["verdict"]) == ("tls", "tls", "DROPPED")
    assert rec["reason"] == "TLS handshake failed: UNSUPPORTED_PROTOCOL"


def test_tls_1_2_works_and_renegotiation_is_refused(firewall, pki):
    out = s_client(firewall, pki.ca, "-tls1_2", stdin="R\n")
    assert "Protocol  : TLSv1.2" in out and "Verify return code: 0 (ok)" in out
    assert "RENEGOTIATING" in out
    assert "no renegotiation" in out


def test_a_handshake_that_stalls_is_cut_at_the_deadline(firewall):
    flows = Flows(firewall)
    with socket.create_connection(firewall.address, timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert HEADER_TIMEOUT <= time.monotonic() - started < HEADER_TIMEOUT + 2
    (rec,) = flows.new(1)
    assert (rec["type"], rec["limit"], rec["verdict"]) == (
        "limit",
        "tls_handshake_timeout",
        "DROPPED",
    )


def exchange(fw, pieces: list[bytes]) -> bytes:
    """Send ``pieces`` (one TCP segment each), read until the proxy closes."""
    with socket.create_connection(fw.address, timeout=5) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.02)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_an_oversized_hello_is_refused_from_its_headers_as_on_a_judged_port(firewall):
    """The terminated handshake has the ClientHello bound of parsers/tls: decode_error in
    plaintext, before OpenSSL (whose own bound is 128 KiB) reads a byte of it."""
    flows = Flows(firewall)
    body = client_hello_body(extensions=[sni_ext(NAME), ext(21, b"\x00" * 20000)])
    wire = records(handshake(body))
    assert read_alert(exchange(firewall, [wire[:9]])) == (0x0301, "fatal", "decode_error")
    (rec,) = flows.new(1)
    assert (rec["type"], rec["limit"], rec["verdict"]) == ("limit", "max_client_hello", "DROPPED")
    assert "at most 16384" in rec["reason"]


def test_plain_http_on_the_tls_port_is_closed_without_an_answer(firewall):
    flows = Flows(firewall)
    assert exchange(firewall, [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]) == b""
    (rec,) = flows.new(1)
    assert (rec["type"], rec["verdict"]) == ("tls", "DROPPED")
    assert rec["reason"].startswith("ClientHello refused: ")


def test_a_port_check_that_connects_and_leaves_writes_no_record(firewall, pki):
    flows = Flows(firewall)
    socket.create_connection(firewall.address, timeout=5).close()
    out = curl(firewall, pki.ca, path="/after-the-check")  # a record of its own, after it
    assert out.returncode == 0
    assert len(flows.new(1, path="/after-the-check")) == 1
    assert flows.new(0) == []  # written in order: the check's would be there by now


def test_a_client_that_does_not_trust_the_proxy_fails_and_nothing_is_forwarded(firewall, rogue):
    flows = Flows(firewall)
    out = curl(firewall, rogue.ca)
    assert out.returncode == 60, out  # curl: peer certificate cannot be authenticated
    (rec,) = flows.new(1)
    assert (rec["type"], rec["verdict"]) == ("tls", "DROPPED")
    assert rec["reason"].startswith("TLS handshake failed:")


def test_the_firewall_logged_no_exception_through_all_of_the_above(firewall):
    # (the tests above run first: pytest keeps the file's order)
    assert "Traceback" not in firewall.stderr_text()
    assert "Exception in callback" not in firewall.stderr_text()


# --------------------------------------------------------------------------- the upstream


def test_an_origin_with_an_untrusted_certificate_is_not_used(origin, pki, rogue):
    """The proxy verifies the origin: against another CA, nginx's certificate fails, and
    the request is never sent."""
    with running_firewall(
        POLICY.replace("PORT", str(origin.port)),
        origin.address,
        {"app": "api"},
        extra_args=[*tls_args(pki), "--upstream-tls", "--upstream-ca", str(rogue.ca)],
    ) as fw:
        flows = Flows(fw)
        out = curl(fw, pki.ca, "--http1.1")
        assert out.returncode != 0 and "hello" not in out.stdout
        (rec,) = flows.new(1, path="/")
        assert rec["verdict"] == "FORWARDED"  # allowed by policy, then the upstream failed
        assert rec["reply"]["closed"].startswith(
            "upstream unreachable: certificate verify failed: unable to get local issuer"
        )


def test_cleartext_clients_and_tls_to_the_origin(origin, pki):
    """--upstream-tls alone: the proxy originates TLS for cleartext clients (HTTP/1.1),
    and verifies the origin under --upstream-server-name (no client names one)."""
    with running_firewall(
        POLICY.replace("PORT", str(origin.port)),
        origin.address,
        {"app": "api"},
        extra_args=[
            "--upstream-tls",
            "--upstream-ca",
            str(pki.ca),
            "--upstream-server-name",
            NAME,
        ],  # fmt: skip
    ) as fw:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "10", f"http://{fw.host}:{fw.port}/"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert out.stdout == f"hello {NAME} HTTP/1.1\n", out.stderr


# --------------------------------------------------------------------------- client certificates


@pytest.fixture(scope="module")
def mtls_firewall(origin, pki):
    with running_firewall(
        POLICY.replace("PORT", str(origin.port)),
        origin.address,
        {"app": "api"},
        extra_args=[
            *tls_args(pki),
            "--client-ca",
            str(pki.ca),
            "--upstream-tls",
            "--upstream-ca",
            str(pki.ca),
        ],  # fmt: skip
    ) as fw:
        yield fw


def test_a_verified_client_certificate_and_its_spiffe_id_are_logged(
    mtls_firewall, pki, client_cert
):
    flows = Flows(mtls_firewall)
    cert, key = client_cert
    out = curl(mtls_firewall, pki.ca, "--cert", str(cert), "--key", str(key))
    assert out.stdout == f"hello {NAME} HTTP/2.0\n\n200 2", out.stderr
    (rec,) = flows.new(1, path="/")
    assert rec["tls"]["client"] == {"subject": "O=shop,CN=checkout", "uris": [SPIFFE_ID]}


def test_a_client_without_a_certificate_is_refused(mtls_firewall, pki):
    flows = Flows(mtls_firewall)
    out = curl(mtls_firewall, pki.ca)
    assert out.returncode != 0 and "hello" not in out.stdout
    (rec,) = flows.new(1)
    assert (rec["type"], rec["verdict"]) == ("tls", "DROPPED")
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in rec["reason"]


def test_a_client_certificate_from_another_ca_is_refused(mtls_firewall, pki, rogue):
    cert, key = make_leaf(rogue, "client", uris=[SPIFFE_ID], client=True)
    flows = Flows(mtls_firewall)
    out = curl(mtls_firewall, pki.ca, "--cert", str(cert), "--key", str(key))
    assert out.returncode != 0 and "hello" not in out.stdout
    (rec,) = flows.new(1)
    assert rec["reason"] == (
        "TLS handshake failed: certificate verify failed: unable to get local issuer certificate"
    )


# --------------------------------------------------------------------------- bad files


def test_a_key_that_is_not_the_certificates_stops_the_firewall_at_start(pki, other_cert):
    _, other_key = other_cert
    out = subprocess.run(
        [
            sys.executable, "-m", "l7proxy", "firewall", "--listen", "127.0.0.1:0",
            "--upstream", "127.0.0.1:9", "--labels", "app=api", "--policy",
            str(REPO / "policies" / "sw-l3-l4-l7.yaml"),
            "--tls-cert", str(pki.cert), "--tls-key", str(other_key),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.startswith(f"TLS files rejected: {pki.cert}: --tls-cert: certificate")
    assert "KEY_VALUES_MISMATCH" in out.stderr


def test_an_unpaired_tls_cert_is_a_usage_error(pki):
    out = subprocess.run(
        [
            sys.executable, "-m", "l7proxy", "firewall", "--listen", "127.0.0.1:0",
            "--upstream", "127.0.0.1:9", "--labels", "app=api", "--policy",
            str(REPO / "policies" / "sw-l3-l4-l7.yaml"), "--tls-cert", str(pki.cert),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "each --tls-cert needs its --tls-key" in out.stderr


def test_workers_terminate_tls_each(origin, pki):
    """--workers: every worker process reads the certificate and terminates on its share
    of the one port."""
    with running_firewall(
        POLICY.replace("PORT", str(origin.port)),
        origin.address,
        {"app": "api"},
        extra_args=[
            *tls_args(pki),
            "--upstream-tls",
            "--upstream-ca",
            str(pki.ca),
            "--workers",
            "2",
        ],  # fmt: skip
    ) as fw:
        for i in range(6):
            out = curl(fw, pki.ca, "--http1.1", path=f"/w/{i}")
            assert out.stdout == f"hello {NAME} HTTP/1.1\n\n200 1.1", out.stderr
        records = [r for r in fw.flows(wait_for=6, timeout=10) if r["type"] == "l7"]
        assert len(records) == 6 and all(r["tls"]["sni"] == NAME for r in records)
