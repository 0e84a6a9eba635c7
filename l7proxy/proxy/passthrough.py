"""The engine for flows with no L7 rules: bytes pass untouched both ways."""

from __future__ import annotations

from parsers.base import Close, ShutdownClient, ShutdownServer, TimeLimit, ToClient, ToServer


class PassthroughEngine:
    protocol = "tcp"
    # No heads and no bodies: only the idle timeout applies.
    reading_headers = False
    reading_body = False
    heads_read = 0
    # A port without L7 rules may carry a server-first protocol (SMTP, MySQL).
    client_speaks_first = False

    def client_data(self, data: bytes) -> list:
        return [ToServer(data)] if data else [ShutdownServer()]

    def server_data(self, data: bytes) -> list:
        return [ToClient(data)] if data else [ShutdownClient()]

    def client_timed_out(self, limit: TimeLimit) -> list:
        return [Close(limit)]

    def finish(self) -> list:
        """Bytes only: no request boundary to end behind, and no word to tell the
        client. The driver ends the connection once it has been quiet."""
        return []
