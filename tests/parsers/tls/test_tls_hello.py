"""The ClientHello reader: real and hand-built hellos, fed whole, byte by byte and split
at random, cut over several records, with what follows them, and every refusal with the
alert it carries."""

from __future__ import annotations

import pytest

from parsers.base import LimitExceeded
from parsers.tls.hello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloReader,
    opens_client_hello,
)
from parsers.tls.wire import ClientHelloTooLarge, TlsError
from tests.support.feeding import WAYS, split, splits
from tests.support.tls_wire import (
    alpn_ext,
    client_hello_body,
    client_hello_message,
    ext,
    handshake,
    read_alert,
    real_client_hello,
    records,
    sni_ext,
    u16,
    vec8,
    vec16,
    versions_ext,
)


def read(
    data: bytes, way: str = "whole", **kw: int
) -> tuple[ClientHello | None, ClientHelloReader]:
    reader = ClientHelloReader(**kw)
    hello = None
    for chunk in split(data, way, seed=3):
        assert hello is None, "bytes fed after the hello was whole"
        hello = reader.feed(chunk)
    return hello, reader


def refusal(data: bytes, way: str = "whole", **kw: int) -> TlsError | ClientHelloTooLarge:
    with pytest.raises((TlsError, ClientHelloTooLarge)) as info:
        read(data, way, **kw)
    return info.value


# --------------------------------------------------------------------------- real clients


def test_a_real_openssl_hello_gives_its_name_alpn_and_versions_fed_every_way():
    flight = real_client_hello("api.example.com", alpn=["h2", "http/1.1"])
    for way, chunks in splits(flight, randoms=3):
        reader = ClientHelloReader()
        results = [reader.feed(chunk) for chunk in chunks]
        hello = results[-1]
        assert results[:-1] == [None] * (len(chunks) - 1), way
        assert hello is not None, way
        assert (hello.server_name, hello.alpn, hello.ech) == (
            "api.example.com",
            ("h2", "http/1.1"),
            False,
        )
        assert hello.versions[0] == 0x0304 and 0x0303 in hello.versions
        assert (hello.record_version, hello.legacy_version) == (0x0301, 0x0303)
        assert (reader.raw, reader.rest) == (flight, b""), way
        assert hello.request().describe() == "tls sni=api.example.com alpn=h2,http/1.1"


def test_a_hello_without_a_name_reads_as_an_empty_name():
    hello, _ = read(real_client_hello(None))
    assert hello is not None and hello.server_name == "" and hello.alpn == ()
    assert hello.request().describe() == "tls (no sni)"


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("sizes", [[1], [3, 1, 40], [200], [1] * 64], ids=str)
def test_a_hello_cut_over_several_records_reads_the_same(way, sizes):
    flight = real_client_hello("a.svc.example.com", alpn=["http/1.1"])
    message = flight[5:]
    wire = records(message, sizes=sizes)
    hello, reader = read(wire, way)
    whole, _ = read(flight)
    assert hello == whole
    assert (reader.raw, reader.rest) == (wire, b"")


@pytest.mark.parametrize("way", WAYS)
def test_what_follows_the_hello_is_left_for_the_relay_not_read(way):
    """Trailing bytes: a TLS 1.3 client may send ChangeCipherSpec and 0-RTT data behind
    its hello; they are not the hello's, and not ours to read."""
    flight = real_client_hello("api.example.com")
    behind = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05early" + b"garbage"
    reader = ClientHelloReader()
    chunks = split(flight + behind, way, seed=5)
    hello = None
    while hello is None:
        hello = reader.feed(chunks.pop(0))
    assert hello.server_name == "api.example.com"
    # What came with the hello's last read, then what the relay reads after it.
    assert (reader.raw, reader.rest + b"".join(chunks)) == (flight, behind)


# --------------------------------------------------------------------------- fields


def test_grease_versions_are_left_out_and_grease_extensions_ignored():
    msg = handshake(
        client_hello_body(
            extensions=[
                ext(0x0A0A, b""),
                sni_ext("API.Example.com"),
                versions_ext(0x7A7A, 0x0304, 0x0303),
                ext(0x1A1A, b"\x00"),
            ]
        )
    )
    hello, _ = read(records(msg))
    assert hello is not None
    assert hello.versions == (0x0304, 0x0303)
    assert hello.server_name == "API.Example.com"  # as sent; matching ignores case
    assert hello.extensions == (0x0A0A, 0, 43, 0x1A1A)
    assert hello.request().versions == ("TLSv1.3", "TLSv1.2")


def test_ech_marks_the_name_as_the_outer_one():
    ech = ext(0xFE0D, b"\x00" + b"\x00\x01\x00\x01" + b"\x07" + vec16(b"k" * 32) + vec16(b"p" * 64))
    hello, _ = read(records(client_hello_message("public.example.com", extensions=[ech])))
    assert hello is not None and hello.ech and hello.server_name == "public.example.com"
    assert (
        hello.request().describe() == "tls sni=public.example.com alpn=h2,http/1.1 ech (outer name)"
    )


def test_a_tls12_hello_without_extensions_offers_its_legacy_version():
    hello, _ = read(records(handshake(client_hello_body(extensions=None)), version=0x0303))
    assert hello is not None
    assert (hello.server_name, hello.alpn, hello.versions, hello.extensions) == ("", (), (), ())
    assert hello.request().versions == ("TLSv1.2",)


def test_an_alpn_name_that_is_not_ascii_is_shown_escaped():
    hello, _ = read(records(client_hello_message(alpn=("h2", "\u00e9t\u00e9"))))
    assert hello is not None and hello.alpn == ("h2", "\\xc3\\xa9t\\xc3\\xa9")


# --------------------------------------------------------------------------- refusals

SNI_OK = sni_ext("api.example.com")

# (id, wire bytes, error code, alert or None for a plain close)
REFUSALS = [
    ("plain http", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "not_tls", None),
    (
        "sslv2 hello",
        b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + b"\x00" * 37,
        "sslv2_hello",
        None,
    ),
    ("handshake type byte, no TLS version", b"\x16\x02\x00\x00\x05hello", "not_tls", None),
    ("alert first", b"\x15\x03\x01\x00\x02\x02\x28", "unexpected_message", "unexpected_message"),
    (
        "application data first",
        b"\x17\x03\x01\x00\x03abc",
        "unexpected_message",
        "unexpected_message",
    ),
    (
        "change_cipher_spec first",
        b"\x14\x03\x01\x00\x01\x01",
        "unexpected_message",
        "unexpected_message",
    ),
    ("empty record", b"\x16\x03\x01\x00\x00", "decode_error", "decode_error"),
    ("record over 2^14", b"\x16\x03\x01\x40\x01" + b"\x01", "record_overflow", "record_overflow"),
    (
        "server hello from a client",
        records(handshake(b"\x03\x03", msg_type=2)),
        "unexpected_message",
        "unexpected_message",
    ),
    (
        "another record type inside the hello",
        records(client_hello_message()[:20]) + b"\x15\x03\x01\x00\x02\x01\x00",
        "unexpected_message",
        "unexpected_message",
    ),
    (
        "a second message behind the hello, same record",
        records(client_hello_message() + handshake(b"", msg_type=20)),
        "unexpected_message",
        "unexpected_message",
    ),
    (
        "truncated body",
        records(handshake(client_hello_body()[:40])),
        "decode_error",
        "decode_error",
    ),
    (
        "session id of 33",
        records(handshake(client_hello_body(session_id=b"s" * 33))),
        "decode_error",
        "decode_error",
    ),
    (
        "odd cipher suites",
        records(handshake(client_hello_body(cipher_suites=b"\x13\x01\x13"))),
        "decode_error",
        "decode_error",
    ),
    (
        "no cipher suite",
        records(handshake(client_hello_body(cipher_suites=b""))),
        "decode_error",
        "decode_error",
    ),
    (
        "no compression",
        records(handshake(client_hello_body(compression=b""))),
        "decode_error",
        "decode_error",
    ),
    (
        "bytes after the extensions",
        records(handshake(client_hello_body(extensions=[SNI_OK]) + b"\x00")),
        "decode_error",
        "decode_error",
    ),
    (
        "extension overruns its block",
        records(handshake(client_hello_body()[:-2] + u16(8) + u16(0) + u16(9))),
        "decode_error",
        "decode_error",
    ),
    (
        "SSL 2 version in the hello",
        records(handshake(client_hello_body(legacy_version=0x0200))),
        "decode_error",
        "protocol_version",
    ),
    (
        "two server_name extensions",
        records(handshake(client_hello_body(extensions=[SNI_OK, sni_ext("evil.example.com")]))),
        "illegal_parameter",
        "illegal_parameter",
    ),
    (
        "pre_shared_key not last",
        records(handshake(client_hello_body(extensions=[ext(41, b"\x00" * 8), SNI_OK]))),
        "illegal_parameter",
        "illegal_parameter",
    ),
    (
        "empty server name list",
        records(handshake(client_hello_body(extensions=[ext(0, vec16(b""))]))),
        "decode_error",
        "decode_error",
    ),
    (
        "two host names",
        records(
            handshake(
                client_hello_body(
                    extensions=[
                        ext(0, vec16(b"\x00" + vec16(b"a.example") + b"\x00" + vec16(b"b.example")))
                    ]
                )
            )
        ),
        "decode_error",
        "decode_error",
    ),
    (
        "server name of type 1",
        records(handshake(client_hello_body(extensions=[sni_ext("a.example", name_type=1)]))),
        "decode_error",
        "decode_error",
    ),
    (
        "empty host name",
        records(handshake(client_hello_body(extensions=[sni_ext(b"")]))),
        "decode_error",
        "decode_error",
    ),
    (
        "sni list length lies",
        records(handshake(client_hello_body(extensions=[ext(0, u16(40) + b"\x00" + vec16(b"a"))]))),
        "decode_error",
        "decode_error",
    ),
    (
        "trailing dot",
        records(client_hello_message("api.example.com.")),
        "bad_server_name",
        "unrecognized_name",
    ),
    (
        "NUL in the name",
        records(client_hello_message("api.example.com\x00.evil")),
        "bad_server_name",
        "unrecognized_name",
    ),
    (
        "empty label",
        records(client_hello_message("api..example.com")),
        "bad_server_name",
        "unrecognized_name",
    ),
    (
        "space in the name",
        records(client_hello_message("api example.com")),
        "bad_server_name",
        "unrecognized_name",
    ),
    (
        "not ascii",
        records(handshake(client_hello_body(extensions=[sni_ext("b\u00fccher.example".encode())]))),
        "bad_server_name",
        "unrecognized_name",
    ),
    (
        "254 bytes",
        records(client_hello_message(".".join(["a" * 63] * 3 + ["b" * 62]))),
        "bad_server_name",
        "unrecognized_name",
    ),
    (
        "label of 64",
        records(client_hello_message("a" * 64 + ".example.com")),
        "bad_server_name",
        "unrecognized_name",
    ),
    (
        "empty alpn list",
        records(handshake(client_hello_body(extensions=[ext(16, vec16(b""))]))),
        "decode_error",
        "decode_error",
    ),
    (
        "empty alpn name",
        records(handshake(client_hello_body(extensions=[alpn_ext("h2", b"")]))),
        "decode_error",
        "decode_error",
    ),
    (
        "odd supported_versions",
        records(handshake(client_hello_body(extensions=[ext(43, vec8(b"\x03\x04\x03"))]))),
        "decode_error",
        "decode_error",
    ),
    (
        "empty supported_versions",
        records(handshake(client_hello_body(extensions=[ext(43, vec8(b""))]))),
        "decode_error",
        "decode_error",
    ),
    (
        "empty ech",
        records(handshake(client_hello_body(extensions=[SNI_OK, ext(0xFE0D, b"")]))),
        "decode_error",
        "decode_error",
    ),
]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    "data, code, alert", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_each_refusal_carries_its_alert_fed_every_way(data, code, alert, way):
    err = refusal(data, way)
    assert err.code == code
    if alert is None:
        assert err.wire_reply == b""  # not TLS: a close is all it could understand
    else:
        assert read_alert(err.wire_reply) == (0x0301, "fatal", alert)


def test_the_alert_is_at_the_record_version_the_client_used():
    err = refusal(records(client_hello_message("bad..name"), version=0x0303))
    assert read_alert(err.wire_reply) == (0x0303, "fatal", "unrecognized_name")


def test_plain_text_is_refused_on_its_first_byte():
    with pytest.raises(TlsError, match="plain text"):
        ClientHelloReader().feed(b"G")


# --------------------------------------------------------------------------- the size bound


def padded_hello(size: int) -> bytes:
    """A ClientHello message of exactly ``size`` body bytes (padding extension, RFC 7685)."""
    base = len(client_hello_body(extensions=[SNI_OK]))
    return handshake(client_hello_body(extensions=[SNI_OK, ext(21, b"\x00" * (size - base - 4))]))


def test_a_hello_of_exactly_the_bound_is_read():
    msg = padded_hello(MAX_CLIENT_HELLO)
    assert len(msg) == 4 + MAX_CLIENT_HELLO
    hello, _ = read(records(msg))
    assert hello is not None and hello.server_name == "api.example.com"


@pytest.mark.parametrize("way", WAYS)
def test_one_byte_more_is_refused_from_its_header_before_it_is_buffered(way):
    wire = records(padded_hello(MAX_CLIENT_HELLO + 1))
    reader = ClientHelloReader()
    with pytest.raises(ClientHelloTooLarge) as info:
        for chunk in split(wire[:9], way):  # the record header and the handshake header
            reader.feed(chunk)
    err = info.value
    assert isinstance(err, LimitExceeded) and err.limit == "max_client_hello"
    assert err.code == "client_hello_too_large"
    assert read_alert(err.wire_reply) == (0x0301, "fatal", "decode_error")


def test_the_bound_is_an_argument():
    msg = client_hello_message()
    assert read(records(msg), max_client_hello=len(msg) - 4)[0] is not None
    assert refusal(records(msg), max_client_hello=len(msg) - 5).code == "client_hello_too_large"


# --------------------------------------------------------------------------- the quick check


def reader_refuses(head: bytes, **kw: int) -> bool:
    try:
        ClientHelloReader(**kw).feed(head)
    except (TlsError, ClientHelloTooLarge):
        return True
    return False


def test_the_quick_check_passes_real_hellos_and_the_bound_itself():
    assert opens_client_hello(real_client_hello("api.example.com", alpn=["h2"])[:9])
    assert opens_client_hello(records(padded_hello(MAX_CLIENT_HELLO))[:9])
    assert not opens_client_hello(records(padded_hello(MAX_CLIENT_HELLO + 1))[:9])
    msg = client_hello_message()
    assert opens_client_hello(records(msg)[:9], max_client_hello=len(msg) - 4)
    assert not opens_client_hello(records(msg)[:9], max_client_hello=len(msg) - 5)


@pytest.mark.parametrize(
    "data", [r[1] for r in REFUSALS if reader_refuses(r[1][:9])], ids=lambda d: d[:9].hex()
)
def test_the_quick_check_never_passes_what_the_reader_refuses_from_its_headers(data):
    assert not opens_client_hello(data[:9])


def test_the_quick_check_agrees_with_the_reader_on_every_byte_of_the_headers():
    # Each of the 9 bytes of a real hello's headers set to every value: wherever the
    # quick check passes, the reader, fed the same bytes, refuses nothing.
    head = real_client_hello("api.example.com", alpn=["h2"])[:9]
    passed = 0
    for i in range(9):
        for value in range(256):
            mutant = head[:i] + bytes([value]) + head[i + 1 :]
            if opens_client_hello(mutant):
                passed += 1
                assert not reader_refuses(mutant), mutant.hex()
    assert passed > 9  # not a check that refuses everything
    assert not opens_client_hello(head[:8])  # too short to say: the reader's to judge


CCS = b"\x14\x03\x03\x00\x01\x01"
EARLY = b"\x17\x03\x03\x00\x07" + b"0-rtt!!"


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    "before, early_data",
    [(CCS, False), (EARLY + EARLY + CCS, True), (CCS + EARLY, True)],
    ids=["ccs", "early data then ccs", "ccs then early data"],
)
def test_a_second_hello_comes_behind_what_the_server_skips(before, early_data, way):
    """After a HelloRetryRequest: a ChangeCipherSpec record (RFC 8446 D.4), and the rest
    of early data a server skips (4.2.10), are handed out as they come, never held."""
    hello_records = records(client_hello_message(), version=0x0303)
    reader = ClientHelloReader(retry=True, early_data=early_data)
    hello, passed = None, b""
    for chunk in split(before + hello_records, way, seed=4):
        hello = reader.feed(chunk)
        passed += reader.passed
        reader.passed = b""
    assert hello is not None and hello.server_name == "api.example.com"
    assert (passed, reader.raw) == (before, hello_records)


def test_early_data_before_a_second_hello_is_refused_when_none_was_offered():
    with pytest.raises(TlsError) as info:
        ClientHelloReader(retry=True).feed(EARLY + records(client_hello_message()))
    assert info.value.code == "unexpected_message"


@pytest.mark.parametrize("record", [b"\x14\x03\x03\x00\x01\x02", b"\x14\x03\x03\x00\x02\x01\x01"])
def test_a_malformed_change_cipher_spec_before_a_second_hello_is_refused(record):
    with pytest.raises(TlsError) as info:
        ClientHelloReader(retry=True).feed(record + records(client_hello_message()))
    assert info.value.code == "unexpected_message"
