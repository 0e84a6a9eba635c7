"""Heads shared by the connections of one proxy (``parsers.http1.memo.HeadMemory``):
a head one connection sent is known on the next one, without parsing it again, and
every byte on the wire is what a connection with a memory of its own sends."""

from __future__ import annotations

import pytest

from parsers.base import Access, Close, Decision, ParseError, Reply, ToClient, ToServer
from parsers.http import HttpEngine
from parsers.http1.engine import Http1Engine
from parsers.http1.head import MessageHead, PyRequestHead, PyResponseHead
from parsers.http1.memo import HeadMemory, RequestHeadMemo, ResponseHeadMemo
from parsers.registry import proxy_engine_factory

GET = b"GET /v1/ships HTTP/1.1\r\nHost: deathstar\r\nAccept: */*\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
ALLOW = Decision(True, policy="p", rule="r0")


def allow(request):
    return ALLOW


class Counting:
    """A head parser (the pure-Python one) that counts the heads it really parses."""

    def __init__(self, parser: PyRequestHead | PyResponseHead) -> None:
        self.parser = parser
        self.parsed = 0

    def partial(self, buf):
        self.parser.partial(buf)

    def reset(self):
        self.parser.reset()

    def complete(self, head: bytes, *method: str) -> MessageHead:
        self.parsed += 1
        return self.parser.complete(head, *method)  # type: ignore[call-arg]


def exchange(engine: Http1Engine | HttpEngine, request: bytes, response: bytes) -> list:
    return engine.client_data(request) + engine.server_data(response)


@pytest.mark.parametrize("impl", ["c", "python"])
def test_the_next_connection_gets_the_same_bytes_and_request_without_a_parse(impl):
    memory = HeadMemory()
    first = exchange(Http1Engine(allow, parser=impl, heads=memory), GET, OK)
    second = exchange(Http1Engine(allow, parser=impl, heads=memory), GET, OK)
    alone = exchange(Http1Engine(allow, parser=impl), GET, OK)
    assert second == alone == first
    reordered = OK.replace(
        b"Content-Length: 2\r\nContent-Type: text/plain",
        b"Content-Type: text/plain\r\nContent-Length: 2",
    )
    assert second == [
        Access(second[0].request, ALLOW, 0),
        ToServer(GET),
        ToClient(reordered),
        Reply(0, {"status": 200}),
    ]
    # The second connection was handed what the first one parsed (and derived).
    assert second[0].request is first[0].request
    assert second[1].data is first[1].data


def test_known_heads_are_not_parsed_again_on_another_connection():
    memory = HeadMemory()
    requests = Counting(PyRequestHead())
    responses = Counting(PyResponseHead())
    for _ in range(3):  # three connections, one request each
        asked = RequestHeadMemo(lambda: requests, memory.requests)
        answered = ResponseHeadMemo(lambda: responses, memory.responses)
        assert asked.complete(GET).target == "/v1/ships"
        assert answered.complete(OK[: OK.index(b"\r\n\r\n") + 4], "GET").length == 2
    assert requests.parsed == 1 and responses.parsed == 1


def test_a_memo_makes_no_parser_for_heads_it_knows():
    memory = HeadMemory()
    made: list[PyRequestHead] = []

    def make() -> PyRequestHead:
        made.append(PyRequestHead())
        return made[-1]

    RequestHeadMemo(make, memory.requests).complete(GET)
    assert len(made) == 1
    RequestHeadMemo(make, memory.requests).complete(GET)
    assert len(made) == 1  # the second connection's memo never needed one
    # An unfinished head needs one: it is made then.
    later = RequestHeadMemo(make, memory.requests)
    later.partial(GET[:10])
    assert len(made) == 2
    assert later.complete(GET).target == "/v1/ships"


@pytest.mark.parametrize("impl", ["c", "python"])
def test_the_same_response_head_to_head_and_to_get_is_framed_for_each(impl):
    memory = HeadMemory()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    to_get = exchange(Http1Engine(allow, parser=impl, heads=memory), GET, head + b"hello")
    head_request = GET.replace(b"GET", b"HEAD")
    engine = Http1Engine(allow, parser=impl, heads=memory)
    # To a HEAD request the same bytes have no body: the next response follows at once.
    to_head = exchange(engine, head_request, head)
    assert to_get[2] == ToClient(head + b"hello")
    assert to_head[2] == ToClient(head)
    assert exchange(engine, GET, head + b"hello")[2] == ToClient(head + b"hello")


@pytest.mark.parametrize("impl", ["c", "python"])
def test_heads_a_byte_apart_are_never_confused(impl):
    memory = HeadMemory()
    kept = exchange(Http1Engine(allow, parser=impl, heads=memory), GET, OK)
    closing_request = GET.replace(b"Accept: */*", b"Connection: close")
    closing = exchange(Http1Engine(allow, parser=impl, heads=memory), closing_request, OK)
    assert kept[0].request.headers == (("host", "deathstar"), ("accept", "*/*"))
    assert closing[0].request.headers == (("host", "deathstar"), ("connection", "close"))
    assert closing[1] == ToServer(closing_request)
    other_host = exchange(
        Http1Engine(allow, parser=impl, heads=memory), GET.replace(b"deathstar", b"deathstaR"), OK
    )
    assert other_host[0].request.host == "deathstaR"
    # The server's Connection: close is read on the connection that got it, not after.
    ending = OK.replace(b"Content-Type", b"Connection: close\r\nContent-Type")
    engine = Http1Engine(allow, parser=impl, heads=memory)
    assert exchange(engine, GET, ending)[-1] == Close("server ended the connection")
    engine = Http1Engine(allow, parser=impl, heads=memory)
    assert exchange(engine, GET, OK)[-1] == Reply(0, {"status": 200})


def test_a_bad_head_is_refused_on_every_connection():
    memory = HeadMemory()
    bad = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    for _ in range(2):
        out = Http1Engine(allow, heads=memory).client_data(bad)
        assert out[0] == ToClient(out[0].data) and out[0].data.startswith(b"HTTP/1.1 400 ")
        assert type(out[1]) is ParseError
    assert bad not in memory.requests.heads


def test_a_shared_memory_stays_bounded():
    memory = HeadMemory(size=8)
    for i in range(50):
        request = f"GET /{i} HTTP/1.1\r\nHost: h{i}\r\n\r\n".encode()
        response = f"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-N: {i}\r\n\r\n".encode()
        out = exchange(Http1Engine(allow, heads=memory), request, response)
        assert out[1] == ToServer(request) and out[2] == ToClient(response)
        assert len(memory.requests.heads) <= 8 and len(memory.requests.shapes) <= 8
        assert len(memory.responses.heads) <= 8


def test_a_shared_memory_holds_no_more_than_its_bytes():
    memory = HeadMemory(size=100, max_bytes=4096)
    padding = "v" * 900
    for i in range(30):  # each about 1 KiB: four fit
        # (An IP literal for a host: not a head the C scanner reads, so a shape too.)
        request = f"GET /{i} HTTP/1.1\r\nHost: [::1]\r\nX-Pad: {padding}\r\n\r\n".encode()
        response = f"HTTP/1.1 204 No Content\r\nX-Pad: {padding}{i}\r\n\r\n".encode()
        for _ in range(2):  # (each head twice: found again, so no rest begins)
            out = exchange(Http1Engine(allow, heads=memory), request, response)
            assert out[1] == ToServer(request) and out[2] == ToClient(response)
        for heads in (memory.requests.heads, memory.requests.shapes, memory.responses.heads):
            assert 1 <= len(heads) <= 4
        assert sum(map(len, memory.requests.heads)) <= 4096
        assert sum(len(raw) for _, raw in memory.responses.heads) <= 4096
    assert GET not in memory.requests.heads


def test_each_proxy_has_its_own_memory_and_its_engines_share_it():
    one, other = proxy_engine_factory("http"), proxy_engine_factory("http")
    first = exchange(one(allow), GET, OK)
    again = exchange(one(allow), GET, OK)
    elsewhere = exchange(other(allow), GET, OK)
    assert again == elsewhere == first
    assert again[0].request is first[0].request
    assert elsewhere[0].request is not first[0].request
    # A family that shares nothing gets its plain factory.
    assert proxy_engine_factory("kafka") is proxy_engine_factory("kafka")
