"""A flow record becomes one JSON line: what ``json.dumps`` would write, with a
connection's endpoints (encoded once per connection) last."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7proxy.observe.flowlog import FlowLog, LineEncoder, request_record
from parsers.base import Decision
from parsers.requests import CqlRequest, GrpcCall, HttpRequest, KafkaRequest

CLIENT = {"ip": "10.0.0.1", "port": 40000, "labels": ["app=web"]}
SERVICE = {"ip": "10.0.0.2", "port": 8080, "labels": ["app=api"]}


def record(path: str, source: dict, destination: dict) -> dict:
    return {"type": "l7", "l7": {"path": path}, "source": source, "destination": destination}


def test_a_line_is_the_record_with_its_endpoints_last():
    encoder = LineEncoder()
    first = encoder.line(record("/a", CLIENT, SERVICE))
    second = encoder.line(record("/b", CLIENT, SERVICE))

    assert first == (
        '{"type":"l7","l7":{"path":"/a"},'
        '"source":{"ip":"10.0.0.1","port":40000,"labels":["app=web"]},'
        '"destination":{"ip":"10.0.0.2","port":8080,"labels":["app=api"]}}\n'
    )
    assert json.loads(second) == record("/b", CLIENT, SERVICE)


def test_the_same_source_toward_another_destination_is_encoded_afresh():
    encoder = LineEncoder()
    other = {"ip": "10.0.0.3", "port": 9090, "labels": []}
    encoder.line(record("/a", CLIENT, SERVICE))

    line = encoder.line(record("/a", CLIENT, other))

    assert json.loads(line)["destination"] == other


def test_a_record_with_one_endpoint_or_none_is_plain_json():
    encoder = LineEncoder()
    lone = {"type": "limit", "source": CLIENT}

    assert encoder.line(dict(lone)) == json.dumps(lone, separators=(",", ":")) + "\n"
    assert encoder.line({"type": "drop"}) == '{"type":"drop"}\n'


# ------------------------------------------------------------- a request's line, direct


NOW = 1796682471.6460843
GET = HttpRequest("GET", "/public/item/49?q=88031", "shop.example", (), "1.1")
ODD = HttpRequest("GET", '/a"b\\c/\x7f/é/\U0001f600?x=<>&', "h\u00f6st", (), "1.0")
CALL = GrpcCall("pkg.Svc", "Do", HttpRequest("POST", "/pkg.Svc/Do", "api", (), "2"))
PRODUCE = KafkaRequest(0, 9, 7, "client-1", topics=("orders",))
SELECT = CqlRequest("QUERY", "select", "ks.t", "SELECT * FROM ks.t")
ALLOWED = Decision(
    True, policy="shop", rule="spec.ingress[0].toPorts[0].rules.http[0]", reason="ok"
)
AUDITED = Decision(True, policy="p", rule="r", reason="would deny", audit=True)
DENIED = Decision(False, reason="no L7 rule matches")
TLS = {"sni": "shop.example", "alpn": "h2", "version": "TLSv1.3"}


@pytest.mark.parametrize(
    ("request_", "reply", "decision", "tls", "extra"),
    [
        (GET, {"status": 200}, ALLOWED, None, {}),
        (ODD, {"status": 403}, DENIED, TLS, {"worker": 3}),
        (CALL, {"status": 200, "grpc_status": 7}, AUDITED, TLS, {}),
        (PRODUCE, {"api": "Produce", "acks": 1, "error_code": 29}, DENIED, None, {"worker": 0}),
        (SELECT, {}, ALLOWED, None, {}),
    ],
)
def test_a_request_line_is_the_line_of_its_record(request_, reply, decision, tls, extra):
    encoder = LineEncoder()
    record = request_record(NOW, request_, reply, decision, 0.129, CLIENT, SERVICE, tls)
    record.update(extra)
    expected = LineEncoder().line(dict(record))

    for _ in range(2):  # encoded afresh, then from what the encoder remembers
        line = encoder.request_line(
            NOW, request_, reply, decision, 0.129, CLIENT, SERVICE, tls, extra
        )
        assert line == expected
        assert json.loads(line) == record


def test_a_request_line_without_endpoints_is_the_line_of_its_record():
    record = request_record(NOW, GET, {"status": 200}, ALLOWED, 1.5, None, None, None)
    line = LineEncoder().request_line(NOW, GET, {"status": 200}, ALLOWED, 1.5, None, None, None, {})
    assert line == LineEncoder().line(record)


def test_a_file_only_log_writes_what_a_subscribed_one_writes(tmp_path):
    """The direct line (no subscriber) and the record's line (a subscriber) agree, field
    for field, the time aside; the subscriber gets the record itself."""
    direct = FlowLog(tmp_path / "direct.jsonl", fields={"worker": 1})
    via_record = FlowLog(tmp_path / "record.jsonl", fields={"worker": 1})
    seen: list[dict] = []
    via_record.subscribe(seen.append)
    for log in (direct, via_record):
        log.emit_request(ODD, {"status": 403}, DENIED, 0.25, CLIENT, SERVICE, TLS)
        log.close()

    direct_line = json.loads((tmp_path / "direct.jsonl").read_text())
    record_line = json.loads((tmp_path / "record.jsonl").read_text())
    for line in (direct_line, record_line, seen[0]):
        assert abs(line.pop("time") - time.time()) < 60
        line.pop("time_iso")
    assert direct_line == record_line == seen[0]
    assert direct_line["l7"]["path"] == ODD.path
    assert direct_line["worker"] == 1 and direct_line["tls"] == TLS


@settings(max_examples=300, deadline=None)
@given(
    method=st.text(max_size=8),
    path=st.text(max_size=40),
    host=st.text(max_size=20),
    version=st.sampled_from(["1.0", "1.1", "2"]),
    reply=st.one_of(
        st.builds(lambda s: {"status": s}, st.integers(0, 999)),
        st.dictionaries(st.sampled_from(["status", "closed", "grpc_status"]), st.integers()),
        st.just({"status": True}),
    ),
)
def test_any_http_request_line_is_the_line_of_its_record(method, path, host, version, reply):
    """HTTP's own template (and the one for a lone status) against the generic
    encoding: any text, escapes and non-ASCII included."""
    request = HttpRequest(method, path, host, (), version)
    record = request_record(NOW, request, reply, ALLOWED, 2.0, CLIENT, SERVICE, None)
    line = LineEncoder().request_line(NOW, request, reply, ALLOWED, 2.0, CLIENT, SERVICE, None, {})
    assert line == LineEncoder().line(record)
