"""The ``tls`` engine as transcripts: one ClientHello judged, then bytes relayed untouched,
or an alert and a close. A real OpenSSL client and server talk through it in memory: the
handshake completes and the client verifies the server's certificate across it."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from parsers.base import (
    ALLOW_ALL,
    HEADER_TIMEOUT,
    Access,
    Close,
    Decision,
    LimitExceeded,
    ParseError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    ToClient,
    ToServer,
)
from parsers.requests import TlsClientHello
from parsers.tls.engine import KEY, TlsEngine
from tests.support.cycles import only_reference_counting
from tests.support.feeding import WAYS, feed, split
from tests.support.tls import Pki, make_pki
from tests.support.tls_wire import (
    alert_seen_by_client,
    client_hello_message,
    expect_alert,
    memory_client,
    read_alert,
    real_client_hello,
    records,
)

DENY = Decision(False, policy="p", rule="r", reason="no server name matches")


class Policy:
    """``decide`` that remembers what it was asked."""

    def __init__(self, decision: Decision = ALLOW_ALL) -> None:
        self.decision = decision
        self.asked: list[TlsClientHello] = []

    def __call__(self, request: TlsClientHello) -> Decision:
        self.asked.append(request)
        return self.decision


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["api.example.com"])


def verifying_client(pki: Pki, name: str, alpn=("h2", "http/1.1")):
    context = ssl.create_default_context(cafile=str(pki.ca))
    return memory_client(name, alpn=alpn, context=context)


def memory_server(
    pki: Pki, alpn=("h2",), *, retry: bool = False
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """An OpenSSL server; ``retry``: it takes only P-256 key shares, so a client that
    offers X25519 first (OpenSSL's default) gets a HelloRetryRequest."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.cert), str(pki.key))
    context.set_alpn_protocols(list(alpn))
    if retry:
        context.set_ecdh_curve("prime256v1")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing


def to_server(commands) -> bytes:
    return b"".join(c.data for c in commands if type(c) is ToServer)


def to_client(commands) -> bytes:
    return b"".join(c.data for c in commands if type(c) is ToClient)


def pump(obj: ssl.SSLObject) -> None:
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass


# --------------------------------------------------------------------------- allowed


@pytest.mark.parametrize("way", WAYS)
def test_a_real_handshake_completes_through_the_engine_and_the_client_verifies_the_server(pki, way):
    policy = Policy()
    engine = TlsEngine(policy)
    client, c_in, c_out = verifying_client(pki, "api.example.com")
    server, s_in, s_out = memory_server(pki)
    pump(client)
    hello = c_out.read()

    out = feed(engine.client_data, split(hello, way, seed=11))
    assert out == [
        Access(
            TlsClientHello(
                "api.example.com",
                ("h2", "http/1.1"),
                ("TLSv1.3", "TLSv1.2"),
            ),
            ALLOW_ALL,
            KEY,
        ),
        ToServer(hello),
    ]
    assert len(policy.asked) == 1  # judged once, however the bytes came

    # The server's flight: its first record (the ServerHello) is the flow record's reply.
    s_in.write(hello)
    pump(server)
    flight = s_out.read()
    out = feed(engine.server_data, split(flight, way, seed=12))
    assert to_client(out) == flight
    replies = [c for c in out if type(c) is Reply]
    assert replies == [Reply(KEY, {"version": "TLSv1.3", "cipher_suite": "TLS_AES_256_GCM_SHA384"})]

    # The rest of the handshake, then application data both ways, untouched.
    c_in.write(flight)
    client.do_handshake()  # verifies the certificate chain and the name, through the proxy
    assert client.selected_alpn_protocol() == "h2"
    assert client.getpeercert()["subjectAltName"] == (("DNS", "api.example.com"),)
    client.write(b"ping")
    finished = c_out.read()
    assert engine.client_data(finished) == [ToServer(finished)]
    s_in.write(finished)
    server.do_handshake()
    assert server.read(4) == b"ping"
    server.write(b"pong")
    answer = s_out.read()
    assert engine.server_data(answer) == [ToClient(answer)]
    c_in.write(answer)
    assert client.read(4) == b"pong"

    assert engine.client_data(b"") == [ShutdownServer()]
    assert engine.server_data(b"") == [ShutdownClient()]
    assert len(policy.asked) == 1


@pytest.mark.parametrize("way", WAYS)
def test_after_a_hello_retry_request_the_second_hello_is_held_until_whole_then_relayed(pki, way):
    policy = Policy()
    engine = TlsEngine(policy)
    client, c_in, c_out = verifying_client(pki, "api.example.com")
    server, s_in, s_out = memory_server(pki, retry=True)
    pump(client)
    first = c_out.read()
    assert engine.client_data(first)[1:] == [ToServer(first)]
    s_in.write(first)
    pump(server)
    retry = s_out.read()
    assert engine.server_data(retry) == [
        ToClient(retry),
        Reply(
            KEY,
            {
                "version": "TLSv1.3",
                "cipher_suite": "TLS_AES_256_GCM_SHA384",
                "hello_retry_request": True,
            },
        ),
    ]
    c_in.write(retry)
    pump(client)
    second = c_out.read()
    assert second[0] == 20  # middlebox compatibility: ChangeCipherSpec, then the hello

    ccs, hello_records = second[:6], second[6:]
    assert hello_records[0] == 22
    *pieces, last = split(second, way, seed=14)
    forwarded, fed = b"", 0
    for piece in pieces:
        forwarded += to_server(engine.client_data(piece))
        fed += len(piece)
        # The ChangeCipherSpec is passed on once whole; the hello is held until whole. The
        # head deadline runs while either is partly read.
        assert forwarded == (ccs if fed >= len(ccs) else b"")
        assert engine.reading_headers == (fed != len(ccs))
    out = engine.client_data(last)
    assert out[-1] == ToServer(hello_records)
    assert forwarded + to_server(out) == second
    assert (engine.reading_headers, engine.heads_read) == (False, 2)

    s_in.write(second)
    pump(server)
    flight = s_out.read()
    assert engine.server_data(flight) == [ToClient(flight)]
    c_in.write(flight)
    client.do_handshake()
    assert client.getpeercert()["subjectAltName"] == (("DNS", "api.example.com"),)
    assert len(policy.asked) == 1


@pytest.mark.parametrize("way", WAYS)
def test_a_second_hello_that_names_another_server_is_refused(pki, way):
    engine = TlsEngine(Policy())
    client, c_in, c_out = verifying_client(pki, "api.example.com")
    server, s_in, s_out = memory_server(pki, retry=True)
    pump(client)
    first = c_out.read()
    engine.client_data(first)
    s_in.write(first)
    pump(server)
    retry = s_out.read()
    engine.server_data(retry)
    c_in.write(retry)
    pump(client)
    second = c_out.read().replace(b"api.example.com", b"xyz.example.com")
    out = [
        c for c in feed(engine.client_data, split(second, way, seed=15)) if type(c) is not ToServer
    ]
    assert to_server(feed(engine.client_data, [b"more"])) == b""
    assert [type(c) for c in out] == [ToClient, ParseError]
    expect_alert(out[0].data, "illegal_parameter", version=0x0303)
    assert out[1].error.code == "changed_server_name"
    assert "names 'xyz.example.com', the first named 'api.example.com'" in str(out[1].error)
    assert engine.client_data(b"more") == [] and not engine.reading_headers


def test_a_client_that_answers_a_retry_with_anything_but_a_hello_is_refused():
    engine = TlsEngine(Policy())
    engine.client_data(real_client_hello("api.example.com"))
    hrr = records(
        bytes([2])
        + (38 + 32 + 8).to_bytes(3, "big")
        + b"\x03\x03"
        + bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
        + b"\x20"
        + b"\x11" * 32
        + b"\x13\x01\x00"
        + b"\x00\x06\x00\x2b\x00\x02\x03\x04",
        version=0x0303,
    )
    assert engine.server_data(hrr)[1].fields["hello_retry_request"] is True
    out = engine.client_data(b"\x17\x03\x03\x00\x05hello")
    assert [type(c) for c in out] == [ToClient, ParseError]
    expect_alert(out[0].data, "unexpected_message", version=0x0303)


def test_an_audited_hello_is_relayed():
    audit = Decision(True, policy="p", reason="would deny", audit=True)
    hello = real_client_hello("x.example.com")
    assert TlsEngine(Policy(audit)).client_data(hello)[1:] == [ToServer(hello)]


def test_bytes_behind_the_hello_in_the_same_read_are_forwarded_with_it():
    hello = real_client_hello("api.example.com")
    early = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x03abc"
    out = TlsEngine(Policy()).client_data(hello + early)
    assert out[1:] == [ToServer(hello + early)]


def test_a_hello_cut_over_records_is_forwarded_as_it_came():
    wire = records(client_hello_message("api.example.com"), sizes=[1, 2, 3, 50])
    out = feed(TlsEngine(Policy()).client_data, split(wire, "bytewise"))
    assert to_server(out) == wire


def test_the_server_refusing_the_handshake_is_the_reply():
    engine = TlsEngine(Policy())
    engine.client_data(real_client_hello("api.example.com"))
    alert = b"\x15\x03\x03\x00\x02\x02\x28"
    assert engine.server_data(alert) == [
        ToClient(alert),
        Reply(KEY, {"alert": "handshake_failure", "level": "fatal"}),
    ]


def test_a_server_that_closes_before_answering():
    engine = TlsEngine(Policy())
    engine.client_data(real_client_hello("api.example.com"))
    assert engine.server_data(b"") == [
        Reply(KEY, {"closed": "server closed before answering"}),
        ShutdownClient(),
    ]


def test_a_server_that_does_not_speak_tls_is_relayed_and_said_so():
    engine = TlsEngine(Policy())
    engine.client_data(real_client_hello("api.example.com"))
    assert engine.server_data(b"SSH-2.0-OpenSSH\r\n") == [
        ToClient(b"SSH-2.0-OpenSSH\r\n"),
        Reply(KEY, {"server": "not TLS"}),
    ]
    assert engine.server_data(b"more") == [ToClient(b"more")]


# --------------------------------------------------------------------------- denied


@pytest.mark.parametrize("way", WAYS)
def test_a_denied_name_gets_access_denied_at_the_clients_record_version_and_a_close(way):
    policy = Policy(DENY)
    engine = TlsEngine(policy)
    client, c_in, c_out = memory_client("evil.example.com", alpn=["http/1.1"])
    pump(client)
    hello = c_out.read()
    out = feed(engine.client_data, split(hello, way, seed=13))
    alert = to_client(out)
    expect_alert(alert, "access_denied", version=0x0301)
    # OpenSSL, the client, reads it as the alert it is.
    assert alert_seen_by_client(client, c_in, alert) == "TLSV1_ALERT_ACCESS_DENIED"
    assert out == [
        Access(policy.asked[0], DENY, KEY),
        ToClient(b"\x15\x03\x01\x00\x02\x02\x31"),
        Reply(KEY, {"alert": "access_denied"}),
        Close("denied by policy"),
    ]
    assert policy.asked[0].sni == "evil.example.com"
    # Nothing more is read; nothing ever went to the server.
    assert engine.client_data(b"\x17\x03\x03\x00\x01x") == []
    assert engine.client_data(b"") == []
    assert engine.server_data(b"") == []
    assert to_server(out) == b""


# --------------------------------------------------------------------------- refused


def test_a_malformed_hello_gets_decode_error_and_a_close():
    engine = TlsEngine(Policy())
    client, c_in, c_out = memory_client("api.example.com")
    pump(client)
    hello = bytearray(c_out.read())
    hello[5 + 4 + 2 + 32] = 200  # the session id claims 200 bytes
    out = engine.client_data(bytes(hello))
    assert [type(c) for c in out] == [ToClient, ParseError]
    assert read_alert(out[0].data) == (0x0301, "fatal", "decode_error")
    assert alert_seen_by_client(client, c_in, out[0].data) == "TLSV1_ALERT_DECODE_ERROR"
    assert (out[1].side, out[1].error.code, out[1].close) == ("client", "decode_error", True)
    assert engine.client_data(b"more") == []


def test_an_oversized_hello_is_a_limit_with_decode_error():
    engine = TlsEngine(Policy(), max_client_hello=500)
    hello = real_client_hello("api.example.com")
    assert int.from_bytes(hello[6:9], "big") > 500
    out = engine.client_data(hello[:9])  # the record header and the ClientHello's header
    assert [type(c) for c in out] == [ToClient, ParseError]
    assert read_alert(out[0].data)[2] == "decode_error"
    assert isinstance(out[1].error, LimitExceeded)
    assert out[1].error.limit == "max_client_hello"


def test_plain_http_on_a_tls_port_is_closed_without_an_alert():
    out = TlsEngine(Policy()).client_data(b"GET / HTTP/1.1\r\n")
    assert [type(c) for c in out] == [ParseError]
    assert out[0].error.code == "not_tls"


# --------------------------------------------------------------------------- time and ends


def test_the_head_deadline_runs_while_the_hello_is_partly_read():
    engine = TlsEngine(Policy())
    hello = real_client_hello("api.example.com")
    assert (engine.reading_headers, engine.reading_body, engine.heads_read) == (False, False, 0)
    assert engine.client_data(hello[:100]) == []
    assert (engine.reading_headers, engine.heads_read) == (True, 0)
    engine.client_data(hello[100:])
    assert (engine.reading_headers, engine.heads_read) == (False, 1)


def test_the_bytes_of_a_partial_hello_count_in_the_held_budget():
    from parsers.base import HoldsFrames

    engine = TlsEngine(Policy())
    assert isinstance(engine, HoldsFrames) and engine.held_bytes == 0
    hello = real_client_hello("api.example.com")
    engine.client_data(hello[:100])
    assert engine.held_bytes == 100
    engine.client_data(hello[100:])
    assert engine.held_bytes == 0  # judged: nothing held any more


@pytest.mark.parametrize("end", ["denied", "refused", "timed out", "left"])
def test_a_partial_hello_that_ends_holds_nothing(end):
    engine = TlsEngine(Policy(DENY))
    hello = real_client_hello("api.example.com")
    if end == "denied":
        engine.client_data(hello)
    elif end == "refused":
        bad = bytearray(hello)
        bad[5 + 4 + 2 + 32] = 200  # the session id claims 200 bytes
        engine.client_data(bytes(bad))
    elif end == "timed out":
        engine.client_data(hello[:30])
        engine.client_timed_out(HEADER_TIMEOUT)
    else:
        engine.client_data(hello[:30])
        engine.client_data(b"")
    assert engine.held_bytes == 0


def test_a_slow_hello_is_closed_when_its_deadline_passes():
    engine = TlsEngine(Policy())
    engine.client_data(real_client_hello("api.example.com")[:30])
    assert engine.client_timed_out(HEADER_TIMEOUT) == [Close(HEADER_TIMEOUT)]
    assert not engine.reading_headers
    assert engine.client_data(b"the rest") == []


def test_a_client_that_leaves_inside_its_hello():
    engine = TlsEngine(Policy())
    engine.client_data(real_client_hello("api.example.com")[:30])
    assert engine.client_data(b"") == [Close("client left inside its ClientHello")]


def test_finish_asks_nothing_of_a_tunnel():
    engine = TlsEngine(Policy())
    assert engine.finish() == []
    engine.client_data(real_client_hello("api.example.com"))
    assert engine.finish() == []


@pytest.mark.parametrize("decision", [ALLOW_ALL, DENY], ids=["allowed", "denied"])
def test_an_engine_done_with_is_freed_by_reference_counting(decision):
    with only_reference_counting(("parsers.",)) as left_to_the_collector:
        engine = TlsEngine(Policy(decision))
        engine.client_data(real_client_hello("api.example.com"))
        engine.server_data(b"\x16\x03\x03")
        engine.client_data(b"")
        del engine
        assert left_to_the_collector() == []


def test_a_refused_hello_is_freed_by_reference_counting():
    with only_reference_counting(("parsers.",)) as left_to_the_collector:
        engine = TlsEngine(Policy())
        engine.client_data(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff")
        del engine
        assert left_to_the_collector() == []


def test_certificates_are_made_for_the_test(pki):
    assert Path(pki.ca).read_text().startswith("-----BEGIN CERTIFICATE-----")
