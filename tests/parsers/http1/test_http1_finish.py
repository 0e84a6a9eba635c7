"""How the HTTP/1.1 engine ends a healthy connection when asked to ``finish()``
(a takeover's drain; issue 14, finding 12).

The response to the last request read says ``Connection: close``; requests behind
it are never read, so never forwarded; every request read before is answered in
order; the client closes first. Each response is read back with h11, as a client
would read it, and every transcript is fed whole, byte by byte and split at random.
"""

from __future__ import annotations

import h11
import pytest

from parsers.base import Access, Close, Finished, Reply, ToClient, ToServer
from parsers.http import HttpEngine
from parsers.http1.engine import Http1Engine, serialise_response
from parsers.http1.head import MessageHead
from tests.parsers.http1.helpers import IMPLS, deny_path, sent
from tests.support.feeding import feed, splits

GET = b"GET /v1/items HTTP/1.1\r\nHost: api\r\n\r\n"
GET2 = b"GET /v1/other HTTP/1.1\r\nHost: api\r\n\r\n"
ADMIN = b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n"
POST = b"POST /v1/items HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_KEEP_ALIVE = (
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5, max=100\r\n"
    b"Content-Length: 2\r\n\r\nok"
)
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def engine_for(impl: str) -> Http1Engine:
    return Http1Engine(deny_path("/admin"), parser=impl)


def read(data: bytes, targets: list[str]) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Read ``data`` as an h11 client that sent a GET for each of ``targets`` in
    turn: (status, headers, body) of each response. The last one must tell the
    client to close (h11: the server MUST_CLOSE), and nothing may follow it."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    answers = []
    for n, target in enumerate(targets):
        if n:
            client.start_next_cycle()
        client.send(h11.Request(method="GET", target=target, headers=[("Host", "api")]))
        client.send(h11.EndOfMessage())
        response = client.next_event()
        assert isinstance(response, h11.Response), response
        body = b""
        while type(event := client.next_event()) is h11.Data:
            body += event.data
        assert type(event) is h11.EndOfMessage, event
        answers.append((response.status_code, dict(response.headers), body))
        if n < len(targets) - 1:
            assert client.their_state is h11.DONE  # kept alive
    assert client.their_state is h11.MUST_CLOSE  # the last one says Connection: close
    assert client.next_event() is h11.NEED_DATA  # and nothing follows it
    return answers


def test_the_response_in_flight_says_connection_close_then_the_client_closes(impl):
    for way, chunks in splits(OK):
        engine = engine_for(impl)
        assert [type(c) for c in engine.client_data(GET)] == [Access, ToServer]
        assert engine.finish() == []

        out = feed(engine.server_data, chunks)

        assert out[-2:] == [Reply(0, {"status": 200}), Finished(told=True)], way
        assert read(sent(out, ToClient), ["/v1/items"]) == [
            (200, {b"connection": b"close", b"content-length": b"2"}, b"ok")
        ]
        assert not engine.reading_headers and not engine.reading_body
        assert engine.client_data(GET2) == []  # it was told: never read
        assert engine.server_data(b"") == []  # the server leaving changes nothing
        assert engine.client_data(b"") == [Close("client closed after Connection: close")]


def test_a_request_behind_the_last_one_is_never_forwarded(impl):
    """The client sent its next request before reading the response that says
    close: that request is not read. Told the connection ends, the client sends it
    again on a new one (RFC 9112 9.3.2); no server has seen it."""
    for way, chunks in splits(GET2 + ADMIN):
        engine = engine_for(impl)
        engine.client_data(GET)
        engine.finish()
        assert feed(engine.client_data, chunks) == [], way

        out = engine.server_data(OK)

        assert read(sent(out, ToClient), ["/v1/items"])[0][0] == 200
        assert out[-1] == Finished(told=True)
        assert [c for c in out if type(c) is ToServer] == []


def test_requests_read_before_the_ask_are_all_answered_the_last_says_close(impl):
    for way, chunks in splits(OK_KEEP_ALIVE + CHUNKED):
        engine = engine_for(impl)
        out = engine.client_data(GET + GET2)
        assert sent(out, ToServer) == GET + GET2
        engine.finish()

        out = feed(engine.server_data, chunks)

        [first, last] = read(sent(out, ToClient), ["/v1/items", "/v1/other"])
        assert first[1][b"connection"] == b"keep-alive", way  # unchanged
        assert last == (200, {b"connection": b"close", b"transfer-encoding": b"chunked"}, b"ok")
        assert [c for c in out if type(c) is Reply] == [
            Reply(0, {"status": 200}),
            Reply(1, {"status": 200}),
        ]
        assert out[-1] == Finished(told=True)


def test_with_nothing_in_flight_the_next_request_is_the_last(impl):
    for way, chunks in splits(GET + GET2):
        engine = engine_for(impl)
        assert engine.finish() == []

        out = feed(engine.client_data, chunks)

        assert sent(out, ToServer) == GET, way  # GET2 is never read
        assert len([c for c in out if type(c) is Access]) == 1
        out = engine.server_data(OK)
        assert read(sent(out, ToClient), ["/v1/items"])[0][1][b"connection"] == b"close"


def test_a_response_already_under_way_is_left_alone_and_the_next_one_says_close(impl):
    """A download whose head has gone out cannot be told: the next request can."""
    engine = engine_for(impl)
    engine.client_data(GET)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
    assert sent(engine.server_data(head + b"ab"), ToClient) == head + b"ab"
    engine.finish()

    out = engine.server_data(b"cd")
    assert out == [ToClient(b"cd"), Reply(0, {"status": 200})]  # no Finished yet
    out = engine.client_data(GET2 + GET)
    assert sent(out, ToServer) == GET2
    out += engine.server_data(OK)
    assert out[-1] == Finished(told=True)
    assert read(head + b"abcd" + sent(out, ToClient), ["/v1/items", "/v1/other"])[1] == (
        200,
        {b"connection": b"close", b"content-length": b"2"},
        b"ok",
    )


def test_the_last_request_s_body_is_still_forwarded(impl):
    for way, chunks in splits(POST):
        engine = engine_for(impl)
        engine.finish()
        out = feed(engine.client_data, chunks)
        assert sent(out, ToServer) == POST, way
        assert engine.server_data(OK)[-1] == Finished(told=True)


def test_a_denied_last_request_gets_403_with_connection_close(impl):
    engine = engine_for(impl)
    engine.finish()

    out = engine.client_data(ADMIN + GET)

    assert [type(c) for c in out] == [Access, ToClient, Reply, Finished]
    assert read(out[1].data, ["/admin"]) == [
        (
            403,
            {
                b"content-type": b"text/plain",
                b"content-length": b"13",
                b"connection": b"close",
            },
            b"Access denied",
        )
    ]
    assert engine.client_data(b"") == [Close("client closed after Connection: close")]


def test_a_denied_request_waiting_behind_a_forwarded_one_is_the_last(impl):
    engine = engine_for(impl)
    engine.client_data(GET + ADMIN)  # the 403 waits for the 200
    engine.finish()

    out = engine.server_data(OK)

    [ok, denied] = read(sent(out, ToClient), ["/v1/items", "/admin"])
    assert b"connection" not in ok[1] and denied[0] == 403
    assert out[-1] == Finished(told=True)


def test_a_client_that_half_closed_is_closed_behind_its_last_response(impl):
    engine = engine_for(impl)
    engine.client_data(GET)
    engine.finish()
    engine.client_data(b"")  # sent its request, then shut down its side

    out = engine.server_data(OK)

    assert out[-1] == Close("client closed before its last response")
    assert read(sent(out, ToClient), ["/v1/items"])[0][0] == 200


def test_a_body_that_ends_with_the_server_s_eof_still_ends_with_our_close(impl):
    engine = engine_for(impl)
    engine.client_data(GET)
    engine.finish()
    out = engine.server_data(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert sent(out, ToClient) == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    assert engine.server_data(b"")[-1] == Close("server ended the connection")


def test_only_the_final_response_says_close_not_a_100_continue(impl):
    engine = engine_for(impl)
    expect = (
        b"PUT /v1/items HTTP/1.1\r\nHost: api\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    engine.client_data(expect)
    engine.finish()
    out = engine.server_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert sent(out, ToClient) == b"HTTP/1.1 100 Continue\r\n\r\n"
    engine.client_data(b"hi")
    out = engine.server_data(OK)
    assert sent(out, ToClient).startswith(b"HTTP/1.1 200 OK\r\nConnection: close\r\n")
    assert out[-1] == Finished(told=True)


def test_a_tunnel_has_no_word_for_it_and_asking_twice_changes_nothing(impl):
    engine = engine_for(impl)
    engine.client_data(
        b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    engine.server_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert engine.finish() == []
    assert engine.finish() == []
    assert engine.client_data(b"frame") == [ToServer(b"frame")]
    assert engine.server_data(b"frame") == [ToClient(b"frame")]


def test_the_http_family_finishes_the_engine_it_chooses_later(impl):
    engine = HttpEngine(deny_path("/admin"))
    assert engine.finish() == []  # the client has said nothing yet
    out = engine.client_data(GET + GET2)
    assert sent(out, ToServer) == GET
    assert engine.server_data(OK)[-1] == Finished(told=True)


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ([], [(b"Connection", b"close")]),
        ([(b"Connection", b"keep-alive")], [(b"Connection", b"close")]),
        (
            [(b"Keep-Alive", b"timeout=5"), (b"connection", b"Keep-Alive, X-Hop")],
            [(b"Connection", b"close, X-Hop")],
        ),
        (
            [(b"A", b"1"), (b"Connection", b"x-hop"), (b"Connection", b"close"), (b"B", b"2")],
            [(b"A", b"1"), (b"Connection", b"close, x-hop"), (b"B", b"2")],
        ),
    ],
)
def test_connection_close_is_one_field_without_keep_alive(fields, want):
    head = MessageHead(status=200, reason="OK", version="1.0", headers=fields)
    wire = serialise_response(head, close=True)
    assert wire == b"HTTP/1.0 200 OK\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in want) + (
        b"\r\n"
    )
