"""A flow record becomes one JSON line: what ``json.dumps`` would write, with a
connection's endpoints (encoded once per connection) last."""

from __future__ import annotations

import json

from l7proxy.observe.flowlog import LineEncoder

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
