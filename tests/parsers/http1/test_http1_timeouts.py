"""What the HTTP/1.1 engine answers when the driver's clock runs out on a client.

The engine has no clock: it says where the client is (``reading_headers``,
``reading_body``, ``heads_read``) and, asked with ``client_timed_out``, answers
in HTTP. Each answer is read back with h11, as a client would read it.
"""

from __future__ import annotations

import h11
import pytest

from parsers.base import BODY_TIMEOUT, HEADER_TIMEOUT, Access, Close, Reply, ToClient, ToServer
from parsers.http import HttpEngine
from parsers.http1.engine import Http1Engine
from tests.parsers.http1.helpers import IMPLS, deny_path
from tests.support.feeding import feed, splits

GET = b"GET /v1/items HTTP/1.1\r\nHost: api\r\n\r\n"
PUT = b"PUT /v1/items HTTP/1.1\r\nHost: api\r\nContent-Length: 10\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def engine_for(impl: str, decide=lambda r: deny_path("/admin")(r)) -> Http1Engine:
    return Http1Engine(decide, parser=impl)


def read_responses(data: bytes, requests: int = 1) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """(status, headers, body) of each response in ``data``, read by an h11 client
    that sent ``requests`` GETs one after the other; the last one must end the
    connection, and nothing may follow it."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")  # the proxy closes right behind its answer
    answers = []
    for n in range(requests):
        client.send(h11.Request(method="GET", target="/v1/items", headers=[("Host", "api")]))
        client.send(h11.EndOfMessage())
        response = client.next_event()
        assert isinstance(response, h11.Response), response
        body = b""
        while type(event := client.next_event()) is h11.Data:
            body += event.data
        assert type(event) is h11.EndOfMessage
        answers.append((response.status_code, dict(response.headers), body))
        if n < requests - 1:
            client.start_next_cycle()
    assert type(client.next_event()) is h11.ConnectionClosed
    return answers


def test_a_head_past_its_deadline_gets_408_and_connection_close(impl):
    for way, chunks in splits(GET[:20]):
        engine = engine_for(impl)
        assert feed(engine.client_data, chunks) == [], way
        assert engine.reading_headers and not engine.reading_body

        out = engine.client_timed_out(HEADER_TIMEOUT)

        assert [type(c) for c in out] == [ToClient, Close], way
        assert out[1] == Close("header_timeout")
        fields = {b"content-type": b"text/plain", b"content-length": b"15", b"connection": b"close"}
        assert read_responses(out[0].data) == [(408, fields, b"Request Timeout")]
        assert not engine.reading_headers
        assert engine.client_data(GET[20:]) == []  # too late: never judged, never forwarded


def test_a_pipelined_head_past_its_deadline_gets_408_after_the_response_owed(impl):
    engine = engine_for(impl)
    out = engine.client_data(GET + GET[:20])
    assert [type(c) for c in out] == [Access, ToServer]

    assert engine.client_timed_out(HEADER_TIMEOUT) == []  # the 408 waits its turn
    out = engine.server_data(OK)

    assert [type(c) for c in out] == [ToClient, Reply, ToClient, Close]
    assert out[1] == Reply(0, {"status": 200})
    answers = read_responses(b"".join(c.data for c in out if type(c) is ToClient), requests=2)
    assert [(status, body) for status, _, body in answers] == [
        (200, b"ok"),
        (408, b"Request Timeout"),
    ]


def test_a_head_after_a_denied_request_gets_its_408_behind_the_403(impl):
    engine = engine_for(impl)
    out = engine.client_data(GET.replace(b"/v1/items", b"/admin") + GET[:20])
    out += engine.client_timed_out(HEADER_TIMEOUT)

    assert [type(c) for c in out] == [Access, ToClient, Reply, ToClient, Close]
    answers = read_responses(b"".join(c.data for c in out if type(c) is ToClient), requests=2)
    assert [status for status, _, _ in answers] == [403, 408]


def test_a_stalled_body_is_closed_without_a_second_answer(impl):
    for way, chunks in splits(PUT + b"abc"):
        engine = engine_for(impl)
        out = feed(engine.client_data, chunks)
        assert b"".join(c.data for c in out if type(c) is ToServer) == PUT + b"abc", way
        assert engine.reading_body and not engine.reading_headers

        # The server has the head: a 408 would tell the client it never got the request.
        assert engine.client_timed_out(BODY_TIMEOUT) == [Close("body_timeout")]
        assert not engine.reading_body
        assert engine.client_data(b"defghij") == []


def test_reading_body_covers_content_length_and_chunked_bodies_to_their_end(impl):
    chunked = (
        b"POST /v1/items HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n"
    )
    for message in (PUT + b"0123456789", chunked):
        engine = engine_for(impl)
        reading = []
        for i in range(len(message)):
            engine.client_data(message[i : i + 1])
            reading.append("h" if engine.reading_headers else "b" if engine.reading_body else "-")
        head = message.index(b"\r\n\r\n") + 4
        # the last byte of the head starts the body; the last byte of the body ends it
        assert "".join(reading) == "h" * (head - 1) + "b" * (len(message) - head) + "-"


def test_a_body_behind_expect_100_continue_is_awaited_only_after_the_servers_word(impl):
    engine = engine_for(impl)
    engine.client_data(PUT.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
    assert not engine.reading_body  # the client may wait for 100 Continue

    engine.server_data(b"HTTP/1.1 100 Continue\r\n\r\n")

    assert engine.reading_body


def test_heads_read_tells_a_head_that_began_in_the_read_that_ended_the_last(impl):
    engine = engine_for(impl)
    engine.client_data(GET[:20])
    before = engine.heads_read

    engine.client_data(GET[20:] + GET[:20])

    assert engine.reading_headers and engine.heads_read != before


@pytest.mark.parametrize("prefix", [b"P", b"PR"])
def test_an_undecided_first_byte_or_two_get_the_http1_answer(prefix):
    # "P" and "PR" may yet be POST or PROPFIND, or the HTTP/2 preface.
    engine = HttpEngine(lambda r: deny_path("/admin")(r))
    engine.client_data(prefix)
    assert engine.reading_headers

    out = engine.client_timed_out(HEADER_TIMEOUT)

    assert [type(c) for c in out] == [ToClient, Close]
    assert read_responses(out[0].data)[0][0] == 408
