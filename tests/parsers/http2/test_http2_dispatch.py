"""HttpEngine picks HTTP/2 by the connection preface, HTTP/1.1 otherwise, and follows h2c
upgrades."""

from __future__ import annotations

import h2.events as ev
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from parsers.base import Access, Decision, Reply, ToClient, ToServer
from parsers.http import HttpEngine, upgrade_to_h2c
from parsers.http2.engine import PREFACE
from parsers.requests import HttpRequest
from tests.support.h2_transcript import SPLITS, Transcript, request_headers


def decide(request):
    return Decision(not request.path.startswith("/admin"), policy="p", rule="r")


@pytest.fixture(params=list(SPLITS))
def split(request):
    return SPLITS[request.param]


def test_preface_selects_http2(split):
    engine = HttpEngine(decide)
    t = Transcript(engine, split).start()
    assert engine.version == "2"
    t.client.send_headers(1, request_headers("/x"), end_stream=True)
    t.client.send_headers(3, request_headers("/admin"), end_stream=True)
    t.pump()
    assert [a.request.version for a in t.of(Access)] == ["2", "2"]
    assert [dict(e.headers)[b":path"] for e in t.of(ev.RequestReceived, "server")] == [b"/x"]


def test_partial_preface_waits_then_http1_when_it_diverges():
    engine = HttpEngine(decide)
    assert engine.client_data(b"P") == []
    assert engine.reading_headers and engine.version == ""
    out = engine.client_data(b"UT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert engine.version == "1.1"
    (access,) = [c for c in out if isinstance(c, Access)]
    assert (access.request.method, access.request.path) == ("PUT", "/x")
    assert b"".join(c.data for c in out if isinstance(c, ToServer)).startswith(
        b"PUT /x HTTP/1.1\r\n"
    )


def test_http1_request_goes_to_the_http1_engine(split):
    engine = HttpEngine(decide)
    out = []
    for chunk in split(b"GET /index HTTP/1.1\r\nHost: web\r\n\r\n"):
        out += engine.client_data(chunk)
    (access,) = [c for c in out if isinstance(c, Access)]
    assert access.request.version == "1.1" and access.request.path == "/index"
    assert b"".join(c.data for c in out if isinstance(c, ToServer)).startswith(
        b"GET /index HTTP/1.1\r\n"
    )


def test_h2c_upgrade_continues_as_judged_http2(split):
    engine = HttpEngine(decide)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    settings = client.initiate_upgrade_connection()
    preface = client.data_to_send()  # goes out only after the 101
    upgrade = (
        b"GET /first HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
    )
    to_server, to_client, commands = bytearray(), bytearray(), []

    def run(cmds):
        for c in cmds:
            if isinstance(c, ToServer):
                to_server.extend(c.data)
            elif isinstance(c, ToClient):
                to_client.extend(c.data)
            else:
                commands.append(c)

    for chunk in split(upgrade):
        run(engine.client_data(chunk))
    assert (
        to_server.startswith(b"GET /first HTTP/1.1\r\n")
        and b"HTTP2-Settings: " + settings in to_server
    )
    to_server.clear()

    # The server accepts: 101, then HTTP/2 from its side (response to stream 1).
    server.initiate_upgrade_connection(settings)
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"first answer", end_stream=True)
    for chunk in split(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        + server.data_to_send()
    ):
        run(engine.server_data(chunk))
    assert to_client.startswith(b"HTTP/1.1 101 ")
    head_end = to_client.index(b"\r\n\r\n") + 4
    client_events = client.receive_data(bytes(to_client[head_end:]))
    to_client.clear()
    assert [e.stream_id for e in client_events if isinstance(e, ev.ResponseReceived)] == [1]
    assert (
        b"".join(e.data for e in client_events if isinstance(e, ev.DataReceived)) == b"first answer"
    )

    # Now plain HTTP/2 from the client: preface + a new stream, judged per stream.
    client.send_headers(3, request_headers("/second"), end_stream=True)
    client.send_headers(5, request_headers("/admin/x"), end_stream=True)
    for chunk in split(preface + client.data_to_send()):
        run(engine.client_data(chunk))
    server_events = server.receive_data(bytes(to_server))
    paths = [dict(e.headers)[b":path"] for e in server_events if isinstance(e, ev.RequestReceived)]
    assert paths == [b"/second"]
    client_events = client.receive_data(bytes(to_client))
    denied = [e for e in client_events if isinstance(e, ev.ResponseReceived)]
    assert [(e.stream_id, dict(e.headers)[b":status"]) for e in denied] == [(5, b"403")]
    judged = [c.request for c in commands if isinstance(c, Access)]
    assert [r.path for r in judged] == ["/first", "/second", "/admin/x"]
    assert isinstance(judged[1], HttpRequest) and judged[1].version == "2"
    assert Reply(5, {"status": 403}) in commands


def test_preface_constant_is_rfc9113():
    assert PREFACE == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_upgrade_handler_builds_an_engine_that_relays_stream_one_and_judges_the_rest(split):
    """The HTTP/2 half of h2c, from the moment Http1Engine hands the connection over."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    settings = client.initiate_upgrade_connection()
    request = HttpRequest(
        "GET",
        "/first",
        "web",
        (
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", settings.decode()),
        ),
    )
    assert (
        upgrade_to_h2c(decide, HttpRequest("GET", "/", "web", (("upgrade", "websocket"),))) is None
    )
    engine = upgrade_to_h2c(decide, request)
    server.initiate_upgrade_connection(settings)
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"first answer", end_stream=True)
    client.send_headers(3, request_headers("/second"), end_stream=True)
    client.send_headers(5, request_headers("/admin/x"), end_stream=True)

    commands, client_events, server_events, judged = [], [], [], []
    for _ in range(20):
        moved = False
        for chunk in split(server.data_to_send()):
            moved = True
            commands += engine.server_data(chunk)
        for chunk in split(client.data_to_send()):
            moved = True
            commands += engine.client_data(chunk)
        for c in commands:
            if isinstance(c, ToServer):
                server_events += server.receive_data(c.data)
            elif isinstance(c, ToClient):
                client_events += client.receive_data(c.data)
            elif isinstance(c, Access):
                judged.append(c.request.path)
        commands = []
        if not moved:
            break
    statuses = {
        e.stream_id: dict(e.headers)[b":status"]
        for e in client_events
        if isinstance(e, ev.ResponseReceived)
    }
    assert statuses == {1: b"200", 5: b"403"}
    assert (
        b"".join(
            e.data for e in client_events if isinstance(e, ev.DataReceived) and e.stream_id == 1
        )
        == b"first answer"
    )
    paths = [dict(e.headers)[b":path"] for e in server_events if isinstance(e, ev.RequestReceived)]
    assert paths == [b"/second"]
    assert judged == ["/second", "/admin/x"]  # stream 1 was judged as HTTP/1.1 already


def test_server_settings_before_the_client_speaks_are_kept_for_http2(split):
    """nghttpd and grpc servers send SETTINGS on accept, before the client's preface arrives."""
    engine = HttpEngine(decide)
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    assert engine.server_data(server.data_to_send()) == []
    t = Transcript(engine, split)
    t.server = server
    t.client.initiate_connection()
    t.pump()
    assert engine.version == "2"
    t.client.send_headers(1, request_headers("/x"), end_stream=True)
    t.pump()
    assert [dict(e.headers)[b":path"] for e in t.of(ev.RequestReceived, "server")] == [b"/x"]
    t.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    t.pump()
    assert [dict(e.headers)[b":status"] for e in t.of(ev.ResponseReceived, "client")] == [b"204"]
