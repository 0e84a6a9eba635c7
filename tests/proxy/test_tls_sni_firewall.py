"""serverNames through the real ``l7proxy firewall``, in front of nginx serving TLS with a
certificate made by the test: curl and ``openssl s_client`` verify the origin's certificate
across the proxy for an allowed name, and read ``access_denied`` for a denied one; raw
sockets send real ClientHellos cut over TCP segments and records, oversized and malformed
ones, and ones too slow for the head deadline."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.firewall import running_firewall
from tests.support.tls import Pki, make_pki, tls_origin
from tests.support.tls_wire import (
    client_hello_body,
    ext,
    handshake,
    memory_client,
    read_alert,
    real_client_hello,
    records,
    reframe,
    sni_ext,
)

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tls-api}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [host]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      serverNames: [api.example.com, "*.svc.example.com"]
"""
HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["api.example.com", "*.svc.example.com"])


@pytest.fixture(scope="module")
def origin(tmp_path_factory, pki):
    with tls_origin(tmp_path_factory.mktemp("origin"), pki) as origin:
        yield origin


@pytest.fixture(scope="module")
def firewall(origin):
    with running_firewall(
        POLICY.replace("PORT", str(origin.port)),
        origin.address,
        {"app": "api"},
        extra_args=["--header-timeout", str(HEADER_TIMEOUT)],
    ) as fw:
        yield fw


class Flows:
    """The flow records a test makes. The firewall is shared by the module, and writes its
    log a second at a time: a record belongs to the test that was running when it was
    made."""

    def __init__(self, fw) -> None:
        self.fw = fw
        self.since = time.time()

    def new(self, count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in self.fw.flows() if r["time"] >= self.since]
            if len(records) >= count or time.monotonic() > deadline:
                assert len(records) == count, records
                return records
            time.sleep(0.05)


def curl(fw, pki: Pki, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca),
            "--resolve", f"{name}:{fw.port}:{fw.host}", *args, f"https://{name}:{fw.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )  # fmt: skip


def s_client(fw, pki: Pki, name: str, alpn: str = "h2") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl", "s_client", "-connect", f"{fw.host}:{fw.port}", "-servername", name,
            "-CAfile", str(pki.ca), "-verify_return_error", "-alpn", alpn,
        ],
        input="",
        capture_output=True,
        text=True,
        errors="replace",  # an h2 origin's SETTINGS frame is printed as it came
        timeout=20,
    )  # fmt: skip


def exchange(fw, data: bytes, *, pieces: list[bytes] | None = None, timeout: float = 5.0) -> bytes:
    """Send ``data`` (or ``pieces``, one TCP segment each), read until the proxy closes."""
    with socket.create_connection(fw.address, timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces or [data]:
            s.sendall(piece)
            time.sleep(0.02)
        return read_to_eof(s)


def read_to_eof(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


# --------------------------------------------------------------------------- allowed


def test_curl_reaches_an_allowed_name_over_h2_and_http11_and_verifies_the_origin(firewall, pki):
    flows = Flows(firewall)
    h2 = curl(firewall, pki, "api.example.com", "--http2")
    assert (h2.returncode, h2.stdout, h2.stderr) == (0, "hello api.example.com HTTP/2.0\n", "")
    h1 = curl(firewall, pki, "api.example.com", "--http1.1")
    assert (h1.returncode, h1.stdout, h1.stderr) == (0, "hello api.example.com HTTP/1.1\n", "")

    first, second = flows.new(2)
    for record, alpn in ((first, ["h2", "http/1.1"]), (second, ["http/1.1"])):
        assert (record["type"], record["protocol"], record["verdict"]) == ("l7", "tls", "FORWARDED")
        assert record["l7"]["sni"] == "api.example.com"
        assert record["l7"]["alpn"] == alpn
        assert record["l7"]["versions"][0] == "TLSv1.3" and record["l7"]["ech"] is False
        assert record["rule"] == "spec.ingress[0].toPorts[0].serverNames"
        assert record["reply"]["version"] == "TLSv1.3"  # read off the origin's ServerHello
        assert record["reply"]["cipher_suite"].startswith("TLS_")


def test_openssl_s_client_verifies_the_origin_through_the_proxy(firewall, pki):
    result = s_client(firewall, pki, "api.example.com", alpn="h2")
    assert result.returncode == 0, result.stderr
    assert "Verify return code: 0 (ok)" in result.stdout
    assert "ALPN protocol: h2" in result.stdout
    assert "subject=CN = api.example.com" in result.stdout


def test_a_wildcard_allows_one_label_and_no_more(firewall, pki):
    flows = Flows(firewall)
    one = curl(firewall, pki, "a.svc.example.com")
    assert (one.returncode, one.stdout) == (0, "hello a.svc.example.com HTTP/2.0\n")
    two = curl(firewall, pki, "b.a.svc.example.com")
    assert two.returncode == 35 and "alert access denied" in two.stderr
    bare = s_client(firewall, pki, "svc.example.com")
    assert bare.returncode != 0 and "alert access denied" in bare.stderr
    allowed, denied, denied_bare = flows.new(3)
    assert (allowed["verdict"], allowed["l7"]["sni"]) == ("FORWARDED", "a.svc.example.com")
    assert (denied["verdict"], denied["l7"]["sni"]) == ("DENIED", "b.a.svc.example.com")
    assert (denied_bare["verdict"], denied_bare["l7"]["sni"]) == ("DENIED", "svc.example.com")


# --------------------------------------------------------------------------- denied


def test_a_denied_name_gets_access_denied_in_curl_and_s_client(firewall, pki):
    flows = Flows(firewall)
    result = curl(firewall, pki, "denied.example.com", "--http2")
    # curl's CURLE_SSL_CONNECT_ERROR, with OpenSSL's word for the alert we sent.
    assert result.returncode == 35
    assert "tlsv1 alert access denied" in result.stderr
    s = s_client(firewall, pki, "denied.example.com")
    assert s.returncode == 1
    assert "tlsv1 alert access denied" in s.stderr and "SSL alert number 49" in s.stderr

    for record in flows.new(2):
        assert (record["protocol"], record["verdict"]) == ("tls", "DENIED")
        assert record["l7"]["sni"] == "denied.example.com"
        assert record["reply"] == {"alert": "access_denied"}
        assert (record["policy"], record["reason"]) == ("tls-api", "no L7 rule matches")


def test_the_alert_on_the_wire_is_one_fatal_record_at_the_clients_version_then_a_close(firewall):
    answer = exchange(firewall, real_client_hello("denied.example.com", alpn=["h2"]))
    assert read_alert(answer) == (0x0301, "fatal", "access_denied")


def test_a_hello_without_a_name_is_denied(firewall):
    flows = Flows(firewall)
    answer = exchange(firewall, real_client_hello(None))
    assert read_alert(answer)[2] == "access_denied"
    (record,) = flows.new(1)
    assert (record["verdict"], record["l7"]["sni"]) == ("DENIED", "")


# --------------------------------------------------------------------------- cut anywhere


def handshake_over(sock: socket.socket, client, incoming, outgoing, first_flight: list[bytes]):
    """Drive a MemoryBIO client over ``sock``; its first flight goes as ``first_flight``."""
    for piece in first_flight:
        sock.sendall(piece)
        time.sleep(0.03)  # one TCP segment each (TCP_NODELAY)
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
    if out := outgoing.read():
        sock.sendall(out)


@pytest.mark.parametrize(
    "cut",
    ["segments", "records", "records and segments"],
)
def test_a_real_hello_cut_over_tcp_segments_and_records_completes_the_handshake(firewall, pki, cut):
    flows = Flows(firewall)
    context = ssl.create_default_context(cafile=str(pki.ca))
    client, incoming, outgoing = memory_client(
        "a.svc.example.com", alpn=["http/1.1"], context=context
    )
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    flight = outgoing.read()
    if cut != "segments":
        flight = reframe(flight, [1, 4, 60, 100])  # five records for one ClientHello
    if cut == "records":
        pieces = [flight]
    else:
        pieces = [flight[:3], flight[3:9], flight[9:10], flight[10:200], flight[200:]]
    with socket.create_connection(firewall.address, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake_over(sock, client, incoming, outgoing, pieces)
        assert client.getpeercert()["subject"] == ((("commonName", "api.example.com"),),)
        client.write(b"GET / HTTP/1.1\r\nHost: a.svc.example.com\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        body = b""
        while b"\n" not in body.partition(b"\r\n\r\n")[2]:
            try:
                body += client.read(4096)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data
                incoming.write(data)
    assert body.startswith(b"HTTP/1.1 200 OK")
    assert body.endswith(b"hello a.svc.example.com HTTP/1.1\n")
    (record,) = flows.new(1)
    assert (record["verdict"], record["l7"]["sni"], record["l7"]["alpn"]) == (
        "FORWARDED",
        "a.svc.example.com",
        ["http/1.1"],
    )


# --------------------------------------------------------------------------- a retry


@pytest.fixture(scope="module")
def retrying_firewall(tmp_path_factory, pki):
    """In front of an origin that takes P-256 key shares only: OpenSSL clients, which offer
    X25519 first, get a HelloRetryRequest and send a second ClientHello."""
    with tls_origin(tmp_path_factory.mktemp("retry"), pki, ecdh_curve="prime256v1") as origin:
        with running_firewall(
            POLICY.replace("PORT", str(origin.port)), origin.address, {"app": "api"}
        ) as fw:
            yield fw


def test_a_handshake_with_a_hello_retry_request_completes(retrying_firewall, pki):
    flows = Flows(retrying_firewall)
    result = curl(retrying_firewall, pki, "api.example.com")
    assert (result.returncode, result.stdout) == (0, "hello api.example.com HTTP/2.0\n")
    (record,) = flows.new(1)
    assert record["verdict"] == "FORWARDED"
    assert record["reply"]["hello_retry_request"] is True


def test_a_second_hello_that_names_another_server_gets_illegal_parameter(retrying_firewall, pki):
    context = ssl.create_default_context(cafile=str(pki.ca))
    client, incoming, outgoing = memory_client("api.example.com", context=context)
    with socket.create_connection(retrying_firewall.address, timeout=5) as sock:
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
        retry = b""
        while len(retry) < 5 or len(retry) < 5 + int.from_bytes(retry[3:5], "big"):
            retry += sock.recv(65536)
        incoming.write(retry)
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        second = outgoing.read()
        # An allowed name first, a denied one in the second hello: never passed.
        sock.sendall(second.replace(b"api.example.com", b"xyz.example.com"))
        answer = read_to_eof(sock)
    assert read_alert(answer) == (0x0303, "fatal", "illegal_parameter")


# --------------------------------------------------------------------------- refused


def test_an_oversized_hello_gets_decode_error_and_a_close_before_it_is_read(firewall):
    flows = Flows(firewall)
    body = client_hello_body(extensions=[sni_ext("api.example.com"), ext(21, b"\x00" * 20000)])
    wire = records(handshake(body))  # two records: 16 KiB, then the rest
    answer = exchange(firewall, wire, pieces=[wire[:9]])  # its headers are enough
    assert read_alert(answer) == (0x0301, "fatal", "decode_error")
    (record,) = flows.new(1)
    assert (record["type"], record["protocol"], record["limit"]) == (
        "limit",
        "tls",
        "max_client_hello",
    )
    assert "at most 16384" in record["reason"]


# Where our answer to a refused hello differs from OpenSSL's (nginx, answering the same bytes
# directly): what OpenSSL does, and why we differ.
OPENSSL_DIFFERS = {
    "plain http": ("an HTTP 400", "nginx's own courtesy when it terminates TLS"),
    "sslv2 hello": ("protocol_version", "OpenSSL parses SSLv2-style hellos; we close"),
    "alert first": ("an HTTP 400", "nginx takes it for plain text"),
    "application data first": ("an HTTP 400", "nginx takes it for plain text"),
    "change_cipher_spec first": ("an HTTP 400", "nginx takes it for plain text"),
    "empty record": ("waits", "OpenSSL skips empty records; RFC 5246 6.2.1 forbids them"),
    "record over 2^14": ("waits", "OpenSSL reads on; RFC 8446 5.1 says record_overflow"),
    "no cipher suite": ("illegal_parameter", "the list's syntax is <2..2^16-2>: decode_error"),
    "odd supported_versions": ("protocol_version", "the list's syntax: decode_error"),
    "empty supported_versions": ("protocol_version", "the list's syntax: decode_error"),
    "empty host name": ("goes on", "HostName<1..2^16-1>: decode_error"),
    "empty ech": ("goes on", "ECHClientHello has at least its type byte"),
    # OpenSSL checks only for a NUL and for more than 255 bytes; we check DNS syntax.
    "trailing dot": ("goes on", "RFC 6066 3: no trailing dot"),
    "empty label": ("goes on", "not a DNS name"),
    "space in the name": ("goes on", "not a DNS name"),
    "not ascii": ("goes on", "RFC 6066 3: ASCII"),
    "254 bytes": ("goes on", "a DNS name has at most 253"),
    "label of 64": ("goes on", "a DNS label has at most 63"),
}


def test_refusals_match_openssls_own_answers_but_where_named(origin):
    """The same bytes, straight to nginx: OpenSSL refuses them with the alert we send,
    except where ``OPENSSL_DIFFERS`` says otherwise (and why)."""
    from tests.parsers.tls.test_tls_hello import REFUSALS

    agree = 0
    for name, data, _code, ours in REFUSALS:
        with socket.create_connection(origin.address, timeout=5) as s:
            s.sendall(data)
            s.settimeout(0.5)
            try:
                answer = read_to_eof(s)
            except TimeoutError:
                answer = None
        if answer is None:
            openssl = "waits"
        elif not answer:
            openssl = "a close"
        elif answer[0] == 21:
            openssl = read_alert(answer)[2]
        else:
            openssl = f"bytes {answer[:16]!r}"
        ours = ours or "a close"
        if name in OPENSSL_DIFFERS:
            assert openssl != ours, f"{name}: OpenSSL agrees now; drop it from OPENSSL_DIFFERS"
        else:
            assert openssl == ours, f"{name}: OpenSSL answers {openssl}, we {ours}"
            agree += 1
    assert agree >= 18


def test_a_malformed_hello_gets_decode_error_and_a_close(firewall):
    flight = bytearray(real_client_hello("api.example.com"))
    flight[5 + 4 + 2 + 32] = 200  # the session id claims 200 bytes
    assert read_alert(exchange(firewall, bytes(flight))) == (0x0301, "fatal", "decode_error")


def test_a_name_that_is_not_a_dns_name_gets_unrecognized_name(firewall):
    wire = records(handshake(client_hello_body(extensions=[sni_ext("api.example.com.")])))
    assert read_alert(exchange(firewall, wire))[2] == "unrecognized_name"


def test_plain_http_on_the_tls_port_is_closed_without_an_answer(firewall):
    assert exchange(firewall, b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n") == b""


# --------------------------------------------------------------------------- time


def test_a_hello_that_stalls_is_cut_by_the_head_deadline(firewall):
    flows = Flows(firewall)
    flight = real_client_hello("api.example.com")
    with socket.create_connection(firewall.address, timeout=10) as s:
        s.sendall(flight[:100])
        started = time.monotonic()
        assert read_to_eof(s) == b""  # closed: TLS has no alert for it
        waited = time.monotonic() - started
    # Timers fire late on a loaded machine, never early.
    assert HEADER_TIMEOUT * 0.9 <= waited < HEADER_TIMEOUT + 4
    (record,) = flows.new(1)
    assert (record["type"], record["protocol"], record["limit"]) == (
        "limit",
        "tls",
        "header_timeout",
    )


def test_a_hello_that_trickles_is_cut_too_bytes_do_not_extend_the_deadline(firewall):
    flight = real_client_hello("api.example.com")
    with socket.create_connection(firewall.address, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        closed_after = None
        for i in range(len(flight)):
            try:
                s.sendall(flight[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.1)  # a byte every 0.1 s: 50 s for the whole hello
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
    assert closed_after is not None and closed_after < HEADER_TIMEOUT + 4


def test_certificates_are_made_per_run(pki):
    assert Path(pki.cert).read_text().startswith("-----BEGIN CERTIFICATE-----")
