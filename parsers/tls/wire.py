"""TLS on the wire: record and handshake constants, alerts, and the typed errors
that carry one.

Only what a proxy that reads a ClientHello without decrypting needs (RFC 8446
sections 4, 5 and 6; RFC 5246 for TLS 1.2's identical record layer). Every
error a reader raises is a ``TlsError`` whose ``wire_reply`` is the fatal alert
record owed to the client, at the record version the client itself used, or
nothing when the client does not speak TLS at all (then a close is the only
answer it could understand).
"""

from __future__ import annotations

from typing import Final

from parsers.base import LimitExceeded, ProtocolError

# -------------------------------------------------------------------------- records

CHANGE_CIPHER_SPEC: Final = 20
ALERT: Final = 21
HANDSHAKE: Final = 22
APPLICATION_DATA: Final = 23
CONTENT_TYPES: Final = {
    CHANGE_CIPHER_SPEC: "change_cipher_spec",
    ALERT: "alert",
    HANDSHAKE: "handshake",
    APPLICATION_DATA: "application_data",
}

RECORD_HEADER: Final = 5  # type(1) version(2) length(2)
MAX_PLAINTEXT: Final = 1 << 14  # TLSPlaintext.length, RFC 8446 5.1: more is record_overflow
# A protected TLS 1.2 record may grow by 2048 bytes (RFC 5246 6.2.3); the server's
# first record is read with this bound.
MAX_CIPHERTEXT: Final = MAX_PLAINTEXT + 2048

# What the record version of our alerts is when the client never sent a valid one.
TLS10: Final = 0x0301

# -------------------------------------------------------------------------- handshake

CLIENT_HELLO: Final = 1
SERVER_HELLO: Final = 2
HANDSHAKE_HEADER: Final = 4  # msg_type(1) length(3)

# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest.
HELLO_RETRY_RANDOM: Final = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)

# Extension types (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME: Final = 0  # RFC 6066 3
EXT_ALPN: Final = 16  # RFC 7301
EXT_PRE_SHARED_KEY: Final = 41  # RFC 8446 4.2.11: MUST be the last extension
EXT_EARLY_DATA: Final = 42  # RFC 8446 4.2.10
EXT_SUPPORTED_VERSIONS: Final = 43  # RFC 8446 4.2.1
EXT_ENCRYPTED_CLIENT_HELLO: Final = 0xFE0D  # ECH (draft-ietf-tls-esni)

NAME_TYPE_HOST_NAME: Final = 0  # ServerName.name_type, RFC 6066 3

VERSIONS: Final = {
    0x0300: "SSLv3",
    0x0301: "TLSv1.0",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}


def version_name(version: int) -> str:
    """``TLSv1.3`` for 0x0304; an unknown version as hex."""
    return VERSIONS.get(version) or f"0x{version:04x}"


def is_grease(value: int) -> bool:
    """RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA, reserved so that peers learn to ignore
    unknown values. Clients put them among versions, cipher suites and extensions."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


# Cipher suites named in flow records (the rest are shown in hex).
CIPHER_SUITES: Final = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
}


def cipher_suite_name(suite: int) -> str:
    return CIPHER_SUITES.get(suite) or f"0x{suite:04x}"


# -------------------------------------------------------------------------- alerts

WARNING: Final = 1
FATAL: Final = 2

UNEXPECTED_MESSAGE: Final = 10
RECORD_OVERFLOW: Final = 22
HANDSHAKE_FAILURE: Final = 40
ILLEGAL_PARAMETER: Final = 47
ACCESS_DENIED: Final = 49
DECODE_ERROR: Final = 50
PROTOCOL_VERSION: Final = 70
INTERNAL_ERROR: Final = 80
UNRECOGNIZED_NAME: Final = 112

ALERTS: Final = {
    0: "close_notify",
    UNEXPECTED_MESSAGE: "unexpected_message",
    20: "bad_record_mac",
    RECORD_OVERFLOW: "record_overflow",
    HANDSHAKE_FAILURE: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    ILLEGAL_PARAMETER: "illegal_parameter",
    48: "unknown_ca",
    ACCESS_DENIED: "access_denied",
    DECODE_ERROR: "decode_error",
    51: "decrypt_error",
    PROTOCOL_VERSION: "protocol_version",
    71: "insufficient_security",
    INTERNAL_ERROR: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    UNRECOGNIZED_NAME: "unrecognized_name",
    113: "bad_certificate_status_response",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
    121: "ech_required",
}


def alert_name(description: int) -> str:
    return ALERTS.get(description) or f"alert_{description}"


def alert_record(description: int, record_version: int = TLS10) -> bytes:
    """One fatal alert, as a plaintext record: what a TLS server sends before any key
    is agreed (RFC 8446 6: every alert we send is fatal and ends the connection)."""
    return bytes(
        (
            ALERT,
            record_version >> 8,
            record_version & 0xFF,
            0,
            2,
            FATAL,
            description,
        )
    )


# -------------------------------------------------------------------------- errors


class TlsError(ProtocolError):
    """A ClientHello we refuse. ``alert`` is the alert description sent (None: the
    client does not speak TLS and gets no alert, only a close); ``code`` names
    what was wrong, for logs and metrics."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        alert: int | None,
        record_version: int = TLS10,
    ):
        wire = b"" if alert is None else alert_record(alert, record_version)
        super().__init__(message, code=code, wire_reply=wire)
        self.alert = alert


class ClientHelloTooLarge(LimitExceeded):
    """The ClientHello announces more bytes than ``max_client_hello``: refused from its
    4-byte header, before any of it is buffered. Answered with ``decode_error`` (the
    length field is out of the range we accept; TLS has no "too large" alert)."""

    def __init__(self, message: str, *, record_version: int = TLS10):
        super().__init__(
            message,
            limit="max_client_hello",
            code="client_hello_too_large",
            wire_reply=alert_record(DECODE_ERROR, record_version),
        )
        self.alert = DECODE_ERROR
