"""A TLS flow record, as ``l7proxy observe`` prints it: the name, the ALPN list, the reply."""

from __future__ import annotations

from l7proxy.observe.flowlog import format_record


def record(**changes) -> dict:
    base = {
        "time_iso": "01:36:41.574",
        "type": "l7",
        "protocol": "tls",
        "source": {"ip": "127.0.0.1", "port": 38170},
        "destination": {"endpoint": "frontend", "port": 443},
        "l7": {"sni": "api.example.com", "alpn": ["h2", "http/1.1"], "ech": False},
        "reply": {"version": "TLSv1.3", "cipher_suite": "TLS_AES_256_GCM_SHA384"},
        "verdict": "FORWARDED",
        "policy": "tls-api",
        "reason": "allowed by serverNames api.example.com",
        "latency_ms": 1.614,
    }
    return {**base, **changes}


def test_an_allowed_hello():
    assert format_record(record()) == (
        "01:36:41.574 FORWARDED 127.0.0.1:38170 -> frontend:443 tls sni=api.example.com "
        "alpn=h2,http/1.1 version=TLSv1.3 cipher_suite=TLS_AES_256_GCM_SHA384 1.61ms "
        "policy=tls-api (allowed by serverNames api.example.com)"
    )


def test_a_denied_hello_without_a_name_or_alpn_under_ech():
    line = format_record(
        record(
            l7={"sni": "", "alpn": [], "ech": True},
            reply={"alert": "access_denied"},
            verdict="DENIED",
            reason="no L7 rule matches",
            latency_ms=0.07,
        )
    )
    assert line == (
        "01:36:41.574 DENIED    127.0.0.1:38170 -> frontend:443 tls sni=- alpn=- ech "
        "alert=access_denied 0.07ms policy=tls-api (no L7 rule matches)"
    )


def test_a_request_inside_a_terminated_session_names_its_client_certificate():
    line = format_record(
        record(
            protocol="http",
            l7={"method": "GET", "host": "api.example.com", "path": "/orders"},
            reply={"status": 200},
            tls={
                "sni": "api.example.com",
                "alpn": "h2",
                "version": "TLSv1.3",
                "cipher": "TLS_AES_256_GCM_SHA384",
                "client": {
                    "subject": "O=shop,CN=checkout",
                    "uris": ["spiffe://example.org/ns/shop/sa/checkout"],
                },
            },
            reason="allowed by rules.http",
        )
    )
    assert line == (
        "01:36:41.574 FORWARDED 127.0.0.1:38170 -> frontend:443 http GET "
        "http://api.example.com/orders [tls sni=api.example.com alpn=h2 "
        "client=spiffe://example.org/ns/shop/sa/checkout] status=200 1.61ms policy=tls-api "
        "(allowed by rules.http)"
    )


def test_a_failed_handshake():
    line = format_record(
        {
            "time_iso": "01:36:41.574",
            "type": "tls",
            "protocol": "tls",
            "source": {"ip": "127.0.0.1", "port": 38170},
            "destination": {"endpoint": "frontend", "port": 443},
            "verdict": "DROPPED",
            "reason": "TLS handshake failed: UNSUPPORTED_PROTOCOL",
        }
    )
    assert line == (
        "01:36:41.574 DROPPED   127.0.0.1:38170 -> frontend:443 tls "
        "reason=TLS handshake failed: UNSUPPORTED_PROTOCOL"
    )
