"""The ``tls`` parser family: one ClientHello judged, then bytes relayed untouched.

One ``TlsEngine`` per proxied connection, sans-I/O (``parsers/base.py``):

    client bytes -> ClientHelloReader (records, fragments, limits)
                 -> TlsClientHello(sni, alpn, versions, ech) -> decide, once
                 -> allowed: the hello's records exactly as received, then every byte
                    both ways, never read (the server negotiates; the client verifies
                    the server's certificate end to end through us)
                 -> denied: a fatal access_denied alert at the client's record version,
                    then a close; the upstream is never connected
    server bytes -> forwarded at once; the first record (ServerHello or alert) is the
                    flow record's reply
    after a HelloRetryRequest: the client's second ClientHello is held until it is
                    whole, and passes only if it names the same server (else
                    illegal_parameter and a close); a ChangeCipherSpec and the rest of
                    0-RTT data before it are passed on as they come

Why ``access_denied`` and not ``unrecognized_name``: RFC 6066 3 has a server that
does not serve a name answer ``unrecognized_name``, which would tell the client (and
whoever reads its error) that the origin has no such virtual host, a configuration
problem to chase on the wrong machine. RFC 8446 6.2 defines ``access_denied`` as
"access control was applied" and the sender "decided not to proceed", which is what
happened. ``unrecognized_name`` is kept for a server_name that is not a DNS name at
all (``parsers/tls/hello.py``). docs/tls.md.

Time: ``reading_headers`` is true from the ClientHello's first byte until it is whole,
so the driver's head deadline (``--header-timeout``, 10 s) bounds a slow handshake
start; TLS has no alert for it, so the answer is a close.

Seam for termination (issue 12, part 2): ``_allowed`` is the one place that decides
what follows an allowed hello. Here it starts the relay; a terminating engine hands
the same ``ClientHello`` (its name picks the certificate) and the reader's ``raw``
bytes to a TLS server object instead, and the decrypted bytes to the engine of the
inner family, whose requests the same ``PortMatcher`` judges by their own type.
"""

from __future__ import annotations

from typing import Final

from parsers.base import (
    DEFAULT_MAX_PENDING,
    Access,
    Close,
    Command,
    Decide,
    ParseError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    TimeLimit,
    ToClient,
    ToServer,
)
from parsers.tls.hello import MAX_CLIENT_HELLO, ClientHello, ClientHelloReader
from parsers.tls.server import ServerFirstRecord
from parsers.tls.wire import (
    ACCESS_DENIED,
    EXT_EARLY_DATA,
    ILLEGAL_PARAMETER,
    ClientHelloTooLarge,
    TlsError,
    alert_name,
)

# One request per connection: the ClientHello. Its Access and Reply share this key.
KEY: Final = 0

_HELLO, _RELAY, _DONE = "hello", "relay", "done"


class TlsEngine:
    """SNI policy for one TLS connection, without decrypting it."""

    protocol = "tls"
    client_speaks_first = True  # the upstream is connected only for an allowed hello

    __slots__ = (
        "_decide",
        "_max",
        "_reader",
        "_state",
        "_heads",
        "_reply",
        "_name",
        "_early_data",
        "_retry",
    )

    def __init__(
        self,
        decide: Decide,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,  # one request per connection: unused
        max_client_hello: int = MAX_CLIENT_HELLO,
    ) -> None:
        self._decide = decide
        self._max = max_client_hello
        self._reader: ClientHelloReader | None = ClientHelloReader(max_client_hello)
        self._state = _HELLO
        self._heads = 0
        # The server's first record, read for the flow record's reply until it is.
        self._reply: ServerFirstRecord | None = None
        # The server name judged, and after a HelloRetryRequest the reader of the second
        # ClientHello, which must name the same server (RFC 8446 4.1.2).
        self._name = ""
        self._early_data = False  # the first ClientHello offered 0-RTT data
        self._retry: ClientHelloReader | None = None

    # ------------------------------------------------------------------ Engine contract

    @property
    def reading_headers(self) -> bool:
        """A ClientHello is partly received (the driver's head deadline runs): the first,
        or the second one a HelloRetryRequest asked for."""
        reader = self._reader if self._state == _HELLO else self._retry
        return reader is not None and reader.started

    @property
    def reading_body(self) -> bool:
        return False  # a relayed byte stream has no body we wait for

    @property
    def heads_read(self) -> int:
        return self._heads

    @property
    def held_bytes(self) -> int:
        """``HoldsFrames``: the bytes of a ClientHello held until it is whole (at most
        ``max_client_hello`` and its records' headers, about twice that while its last
        record is being read), counted in the process's budget like Kafka and CQL
        frames (``--max-held-bytes``)."""
        reader = self._reader if self._state == _HELLO else self._retry
        return 0 if reader is None else reader.held

    def client_timed_out(self, limit: TimeLimit) -> list[Command]:
        """The ClientHello was not whole in time. TLS has no alert for that: close."""
        self._state = _DONE
        self._reader = self._retry = None
        return [Close(limit)]

    def finish(self) -> list[Command]:
        """Encrypted bytes have no boundary we could end behind, and no word to tell
        the client: like a byte tunnel, the driver ends it once it is quiet."""
        return []

    # ------------------------------------------------------------------ client side

    def client_data(self, data: bytes) -> list[Command]:
        state = self._state
        if state == _RELAY:
            if self._retry is not None:
                return self._second_hello(self._retry, data)
            return [ToServer(data)] if data else [ShutdownServer()]
        if state == _DONE:
            return []
        reader = self._reader
        assert reader is not None
        if not data:
            self._state = _DONE
            self._reader = None
            why = "client left inside its ClientHello" if reader.started else "client closed"
            return [Close(why)]
        try:
            hello = reader.feed(data)
        except (TlsError, ClientHelloTooLarge) as err:
            return self._refused(err)
        if hello is None:
            return []
        self._heads = 1
        request = hello.request()
        decision = self._decide(request)
        out: list[Command] = [Access(request, decision, KEY)]
        if decision.allowed:
            out += self._allowed(hello, reader)
        else:
            out += self._denied(hello)
        return out

    def _allowed(self, hello: ClientHello, reader: ClientHelloReader) -> list[Command]:
        """What follows an allowed ClientHello: here, the relay, starting with the
        hello's records as received and whatever the client sent behind them."""
        self._state = _RELAY
        self._reader = None
        self._reply = ServerFirstRecord()
        self._name = hello.server_name
        self._early_data = EXT_EARLY_DATA in hello.extensions
        return [ToServer(reader.raw + reader.rest)]

    def _second_hello(self, reader: ClientHelloReader, data: bytes) -> list[Command]:
        """After a HelloRetryRequest: the client's second ClientHello is held until it is
        whole, and passes only if it names the server the first one did. RFC 8446 4.1.2
        lets it change its key shares, cookie and PSKs, never its name, and a server may
        well serve the second name without checking: without this, a client could have an
        allowed name judged and reach a denied one."""
        if not data:
            self._state = _DONE
            self._retry = None
            return [Close("client left inside its second ClientHello")]
        out: list[Command] = []
        try:
            hello = reader.feed(data)
            if reader.passed:  # ChangeCipherSpec, early data: not the hello's, not held
                out.append(ToServer(reader.passed))
                reader.passed = b""
            if hello is not None and hello.server_name.lower() != self._name.lower():
                raise TlsError(
                    f"the second ClientHello names {hello.server_name!r}, the first named "
                    f"{self._name!r} (RFC 8446 4.1.2)",
                    code="changed_server_name",
                    alert=ILLEGAL_PARAMETER,
                    record_version=hello.record_version,
                )
        except (TlsError, ClientHelloTooLarge) as err:
            return out + self._refused(err)
        if hello is None:
            return out
        self._heads = 2
        self._retry = None
        out.append(ToServer(reader.raw + reader.rest))
        return out

    def _refused(self, err: TlsError | ClientHelloTooLarge) -> list[Command]:
        self._state = _DONE
        self._reader = self._retry = None
        out: list[Command] = [ToClient(err.wire_reply)] if err.wire_reply else []
        out.append(ParseError("client", err, close=True))
        return out

    def _denied(self, hello: ClientHello) -> list[Command]:
        self._state = _DONE
        self._reader = None
        return [
            ToClient(hello.alert(ACCESS_DENIED)),
            Reply(KEY, {"alert": alert_name(ACCESS_DENIED)}),
            Close("denied by policy"),
        ]

    # ------------------------------------------------------------------ server side

    def server_data(self, data: bytes) -> list[Command]:
        if self._state != _RELAY:
            return []
        reply = self._reply
        if not data:
            out: list[Command] = []
            if reply is not None:
                self._reply = None
                out.append(Reply(KEY, {"closed": "server closed before answering"}))
            out.append(ShutdownClient())
            return out
        if reply is None:
            return [ToClient(data)]
        fields = reply.feed(data)
        if fields is None:
            return [ToClient(data)]
        self._reply = None
        if fields.get("hello_retry_request"):
            self._retry = ClientHelloReader(self._max, retry=True, early_data=self._early_data)
        return [ToClient(data), Reply(KEY, fields)]
