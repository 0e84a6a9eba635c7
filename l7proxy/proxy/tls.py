"""TLS the proxy speaks itself: the certificates it serves, the CAs it trusts.

The parsers never see TLS. A terminated connection's client transport is the
event loop's TLS transport (``connect_accepted_socket(ssl=...)``), and an
originated upstream is ``create_connection(ssl=...)``: OpenSSL does the
records, and the engine reads and writes cleartext as on any other connection.
This module makes the ``ssl.SSLContext`` objects for that, from files:

- ``ServerTls``: one context per certificate, the one served chosen by the
  client's server name (SNI) among the certificates' DNS names, the first one
  otherwise; with a CA, client certificates are required and verified against it.
- ``ClientTls``: the server's certificate verified against a CA bundle (the
  system's when none is named) and its name checked; a client certificate when
  one is given (mutual TLS toward the server).

``TlsStore`` holds the contexts of every ``terminatingTLS``/``originatingTLS`` a
policy names, read from a secrets directory (``DIR/<namespace>/<name>/<item>``,
the layout of a Kubernetes Secret mounted as a volume), and those of the
firewall's command line. Every file is read and checked when a policy loads: a
bad certificate or key is a ``PolicyError`` naming the file, the YAML path and
the reason, and the contexts in force stay. ``poll()`` rebuilds a context whose
files changed on disk, for new connections; a change that fails to load is
logged, and the old context stays.

Safe defaults (docs/tls.md): TLS 1.2 and later, ``ssl.create_default_context``'s
ciphers and options, no renegotiation (``OP_NO_RENEGOTIATION``; TLS 1.3 has
none), no compression, and no session tickets (TLS 1.2 or 1.3): a ticket key that
is never rotated weakens forward secrecy, so every handshake is a full one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l7proxy.policy.errors import PolicyError
from l7proxy.policy.model import (
    DEFAULT_CERTIFICATE,
    DEFAULT_PRIVATE_KEY,
    DEFAULT_TRUSTED_CA,
    Policy,
    TlsContextRef,
)
from parsers.base import ProtocolError
from parsers.tls.hello import MAX_CLIENT_HELLO, ClientHelloReader, opens_client_hello

log = logging.getLogger("l7proxy.proxy.tls")

# ALPN offered by a terminating proxy, per parser family. HTTP/2 first, as
# every server does: the http engine reads which one the client speaks.
ALPN_BY_FAMILY: dict[str, tuple[str, ...]] = {"http": ("h2", "http/1.1")}

# The files of one context, with their stamps: (path, mtime in ns, size).
Stamp = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class KeyPair:
    certificate: Path  # the certificate chain, PEM, leaf first
    private_key: Path


@dataclass(frozen=True)
class ServerFiles:
    """What a terminating proxy serves: certificates by name, and the CA its
    clients' certificates must chain to (None: no client certificate asked)."""

    pairs: tuple[KeyPair, ...]
    client_ca: Path | None
    where: str  # a YAML path, or the command-line option, for errors
    # The secret's directory: an item added or removed there (a ca.crt that appears)
    # changes its modification time, and that is a change too.
    directory: Path | None = None


@dataclass(frozen=True)
class ClientFiles:
    """What an originating proxy trusts (None: the system's CAs) and presents."""

    ca: Path | None
    pair: KeyPair | None
    where: str
    directory: Path | None = None


def _stamp(paths: Iterable[Path | None]) -> Stamp:
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
        except OSError:
            out.append((str(p), -1, -1))
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


class _RecordCalls(ssl.SSLObject):
    """The event loop's TLS transport calls ``read``, ``pending`` and ``write`` for
    every record, ``do_handshake`` for each flight of the handshake, and
    ``getpeercert``, ``cipher``, ``compression`` and (at the end) ``unwrap`` once, and
    ``session_fields`` asks ``selected_alpn_protocol`` and ``version``: here they are
    the ``_ssl`` object's own methods, bound on the instance, not ``ssl.SSLObject``'s
    Python wrappers around them, which cost a Python call each and do nothing else
    (``read`` takes a size and a buffer to read into, both optional in C; the
    transport always passes the size). Twelve Python calls fewer per connection."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _RecordCalls:
        self: _RecordCalls = super()._create(*args, **kwargs)  # type: ignore[misc]
        sslobj = self._sslobj  # type: ignore[attr-defined]
        # (Instance attributes: a method of the class is found after them.)
        vars(self).update(
            read=sslobj.read,
            write=sslobj.write,
            pending=sslobj.pending,
            do_handshake=sslobj.do_handshake,
            getpeercert=sslobj.getpeercert,
            cipher=sslobj.cipher,
            compression=sslobj.compression,
            selected_alpn_protocol=sslobj.selected_alpn_protocol,
            version=sslobj.version,
            unwrap=sslobj.shutdown,
        )
        return self


def _harden(ctx: ssl.SSLContext, *, server: bool = False) -> None:
    ctx.sslobject_class = _RecordCalls
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    if server:
        # No TLS 1.3 session tickets: a ticket key that lives as long as the process and
        # is never rotated weakens forward secrecy, and each ticket costs the server an
        # encryption and a record per handshake (about 10% of one, measured).
        ctx.num_tickets = 0


def _load_pair(ctx: ssl.SSLContext, pair: KeyPair, where: str) -> None:
    for path in (pair.certificate, pair.private_key):
        if not path.is_file():
            raise PolicyError(f"{path}: no such file", path=where, file=str(path))
    try:
        ctx.load_cert_chain(pair.certificate, pair.private_key)
    except ssl.SSLError as exc:
        # OpenSSL names the step: PEM lib (not a certificate or not a key),
        # KEY_VALUES_MISMATCH (the key is not the certificate's), ...
        raise PolicyError(
            f"certificate {pair.certificate} with key {pair.private_key}: {_reason(exc)}",
            path=where,
            file=str(pair.certificate),
        ) from None
    except OSError as exc:
        raise PolicyError(
            f"cannot read {exc.filename or pair.certificate}: {exc.strerror}",
            path=where,
            file=str(pair.certificate),
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: Path, where: str) -> None:
    if not ca.is_file():
        raise PolicyError(f"{ca}: no such file", path=where, file=str(ca))
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise PolicyError(f"CA bundle {ca}: {_reason(exc)}", path=where, file=str(ca)) from None
    if not ctx.get_ca_certs():
        raise PolicyError(
            f"CA bundle {ca}: holds no CA certificate (basicConstraints CA:TRUE)",
            path=where,
            file=str(ca),
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'ssl'})"
    return str(exc)


def _dns_names(cert: Path) -> tuple[str, ...]:
    """The DNS names a certificate is for: its subjectAltNames, else its CN."""
    # The ssl module's own PEM decoder (the venv has no cryptography package).
    info: dict[str, Any] = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    names = tuple(v.lower() for k, v in info.get("subjectAltName", ()) if k == "DNS")
    if names:
        return names
    return tuple(v.lower() for rdn in info.get("subject", ()) for k, v in rdn if k == "commonName")


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


class ServerTls:
    """The contexts a terminating listener serves, and the SNI choice among them."""

    def __init__(self, files: ServerFiles, alpn: Sequence[str]) -> None:
        self.files = files
        self.stamp = self._files_stamp(files)
        contexts: list[tuple[tuple[str, ...], ssl.SSLContext]] = []
        for pair in files.pairs:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            _harden(ctx, server=True)
            _load_pair(ctx, pair, files.where)
            if files.client_ca is not None:
                _load_ca(ctx, files.client_ca, files.where)
                ctx.verify_mode = ssl.CERT_REQUIRED
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            contexts.append((_dns_names(pair.certificate), ctx))
        self._by_name = contexts
        self.context = contexts[0][1]  # the default, and where the handshake starts
        self.context.sni_callback = self._choose

    @staticmethod
    def _files_stamp(files: ServerFiles) -> Stamp:
        paths: list[Path | None] = [files.client_ca, files.directory]
        for pair in files.pairs:
            paths += [pair.certificate, pair.private_key]
        return _stamp(paths)

    def _choose(self, conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        # Kept on the connection for the flow log: a server-side SSLObject has
        # no other record of the name its client asked for.
        conn.l7proxy_server_name = name  # type: ignore[attr-defined]
        if name is None or len(self._by_name) == 1:
            return
        name = name.lower()
        for names, ctx in self._by_name:
            if any(_name_matches(p, name) for p in names):
                if ctx is not self.context:
                    conn.context = ctx
                return


class ClientTls:
    """Upstream contexts: one per ALPN protocol offered (the client's choice)."""

    def __init__(self, files: ClientFiles) -> None:
        self.files = files
        self.stamp = _client_stamp(files)
        self._contexts: dict[str | None, ssl.SSLContext] = {}
        self._base = self._make(None)  # load errors surface here, at policy load

    def _make(self, alpn: str | None) -> ssl.SSLContext:
        files = self.files
        if files.ca is not None:
            # This CA only, not the system's too; verifies the chain and the name.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            _load_ca(ctx, files.ca, files.where)
        else:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        _harden(ctx)
        if files.pair is not None:
            _load_pair(ctx, files.pair, files.where)
        if alpn is not None:
            ctx.set_alpn_protocols([alpn])
        self._contexts[alpn] = ctx
        return ctx

    def context(self, alpn: str | None) -> ssl.SSLContext:
        ctx = self._contexts.get(alpn)
        return ctx if ctx is not None else self._make(alpn)


@dataclass(frozen=True)
class CommandLineTls:
    """``l7proxy firewall``'s TLS options: used where no policy names a context."""

    pairs: tuple[KeyPair, ...] = ()  # --tls-cert/--tls-key, chosen by SNI
    client_ca: Path | None = None  # --client-ca
    upstream: bool = False  # --upstream-tls
    upstream_ca: Path | None = None  # --upstream-ca (None: the system's CAs)
    alpn: tuple[str, ...] = ALPN_BY_FAMILY["http"]  # --tls-alpn
    upstream_server_name: str | None = None  # --upstream-server-name

    def server_files(self) -> ServerFiles | None:
        if not self.pairs:
            return None
        return ServerFiles(self.pairs, self.client_ca, "--tls-cert")

    def client_files(self) -> ClientFiles | None:
        if not self.upstream:
            return None
        return ClientFiles(self.upstream_ca, None, "--upstream-tls")


class TlsStore:
    """Every TLS context in force, built and checked when a policy loads."""

    def __init__(self, secrets_dir: Path | None = None, command_line: CommandLineTls | None = None):
        self.secrets_dir = secrets_dir
        self.command_line = command_line or CommandLineTls()
        self._servers: dict[tuple[TlsContextRef, str], ServerTls] = {}
        self._clients: dict[TlsContextRef, ClientTls] = {}
        self.listener: ServerTls | None = None
        self.upstream: ClientTls | None = None
        # The name an upstream must prove when the client named none.
        self.upstream_server_name = self.command_line.upstream_server_name
        self.reloads = 0
        self.reload_errors = 0
        # Counts every change of the contexts in force (a policy load, a reload of
        # changed files): what a cache of per-connection choices is checked against.
        self.generation = 0
        self.last_error: str | None = None
        cl = self.command_line
        server, client = cl.server_files(), cl.client_files()
        self.listener = ServerTls(server, cl.alpn) if server else None
        self.upstream = ClientTls(client) if client else None
        # Whether any connection may be terminated (else no accept asks), and any
        # upstream connected with TLS: asked per connection, so kept, and set again
        # where the contexts in force change (``_in_force``).
        self.terminates = False
        self.originates = False
        self._in_force()

    # ------------------------------------------------------------ policy load

    def update(self, policies: Sequence[Policy]) -> None:
        """Build the contexts ``policies`` name (or keep those whose files did
        not change). Raises ``PolicyError`` and changes nothing if one fails."""
        servers: dict[tuple[TlsContextRef, str], ServerTls] = {}
        clients: dict[TlsContextRef, ClientTls] = {}
        for policy in policies:
            for rule in policy.rules:
                for pr in rule.to_ports:
                    if pr.tls is None:
                        continue
                    try:
                        if pr.tls.terminating is not None and pr.parser is not None:
                            key = (pr.tls.terminating, pr.parser)
                            if key not in servers:
                                servers[key] = self._server(key[0], key[1])
                        ref = pr.tls.originating
                        if ref is not None and ref not in clients:
                            clients[ref] = self._client(ref)
                    except PolicyError as err:
                        raise PolicyError(
                            err.reason, path=err.path, file=f"{policy.source} ({err.file})"
                        ) from None
        self._servers, self._clients = servers, clients
        self.generation += 1
        self._in_force()

    def _server(self, ref: TlsContextRef, family: str) -> ServerTls:
        files = self.server_files(ref)
        old = self._servers.get((ref, family))
        if old is not None and old.files == files and old.stamp == ServerTls._files_stamp(files):
            return old
        return ServerTls(files, ALPN_BY_FAMILY.get(family, ()))

    def _client(self, ref: TlsContextRef) -> ClientTls:
        files = self.client_files(ref)
        old = self._clients.get(ref)
        if old is not None and old.files == files and not _client_stale(old):
            return old
        return ClientTls(files)

    def _secret_dir(self, ref: TlsContextRef) -> Path:
        if self.secrets_dir is None:
            raise PolicyError(
                f"names secret {ref.secret}, and this proxy has no secrets directory "
                "(--tls-secrets-dir)",
                path=ref.path,
                file="",
            )
        directory = self.secrets_dir / ref.namespace / ref.name
        if not directory.is_dir():
            raise PolicyError(
                f"secret {ref.secret}: no directory {directory}",
                path=ref.path,
                file=str(directory),
            )
        return directory

    def _item(self, directory: Path, given: str | None, default: str, ref: TlsContextRef, key: str):
        """Cilium's rule: an item named must exist; a default one is used if present."""
        if given is None:
            path = directory / default
            return path if path.is_file() else None
        path = directory / given
        if not path.is_file():
            raise PolicyError(
                f"secret {ref.secret} has no item {given!r} ({path})",
                path=f"{ref.path}.{key}",
                file=str(path),
            )
        return path

    def server_files(self, ref: TlsContextRef) -> ServerFiles:
        directory = self._secret_dir(ref)
        cert = self._item(directory, ref.certificate, DEFAULT_CERTIFICATE, ref, "certificate")
        key = self._item(directory, ref.private_key, DEFAULT_PRIVATE_KEY, ref, "privateKey")
        if cert is None or key is None:
            missing = DEFAULT_CERTIFICATE if cert is None else DEFAULT_PRIVATE_KEY
            raise PolicyError(
                f"secret {ref.secret}: terminatingTLS needs a certificate and a key, and "
                f"{directory / missing} does not exist",
                path=ref.path,
                file=str(directory / missing),
            )
        ca = self._item(directory, ref.trusted_ca, DEFAULT_TRUSTED_CA, ref, "trustedCA")
        return ServerFiles((KeyPair(cert, key),), ca, ref.path, directory)

    def client_files(self, ref: TlsContextRef) -> ClientFiles:
        directory = self._secret_dir(ref)
        cert = self._item(directory, ref.certificate, DEFAULT_CERTIFICATE, ref, "certificate")
        key = self._item(directory, ref.private_key, DEFAULT_PRIVATE_KEY, ref, "privateKey")
        pair = KeyPair(cert, key) if cert is not None and key is not None else None
        ca = self._item(directory, ref.trusted_ca, DEFAULT_TRUSTED_CA, ref, "trustedCA")
        return ClientFiles(ca, pair, ref.path, directory)

    # ------------------------------------------------------------ files on disk

    def poll(self) -> bool:
        """Rebuild every context whose files changed (new connections get it).
        A change that does not load is logged; the context in force stays."""
        changed = False
        for key, server in list(self._servers.items()):
            if ServerTls._files_stamp(server.files) != server.stamp:
                changed |= self._reload_server(key, server)
        for ref, client in list(self._clients.items()):
            if _client_stale(client):
                changed |= self._reload_client(ref, client)
        if self.listener is not None and (
            ServerTls._files_stamp(self.listener.files) != self.listener.stamp
        ):
            try:
                self.listener = ServerTls(self.listener.files, self.command_line.alpn)
                changed |= self._reloaded(self.listener.files.where)
            except PolicyError as err:
                self._reload_failed(self.listener, err)
        if self.upstream is not None and _client_stale(self.upstream):
            try:
                self.upstream = ClientTls(self.upstream.files)
                changed |= self._reloaded(self.upstream.files.where)
            except PolicyError as err:
                self._reload_failed(self.upstream, err)
        return changed

    def _reload_server(self, key: tuple[TlsContextRef, str], old: ServerTls) -> bool:
        try:
            self._servers[key] = ServerTls(
                self.server_files(key[0]), ALPN_BY_FAMILY.get(key[1], ())
            )
        except PolicyError as err:
            self._reload_failed(old, err)
            return False
        return self._reloaded(old.files.where)

    def _reload_client(self, ref: TlsContextRef, old: ClientTls) -> bool:
        try:
            self._clients[ref] = ClientTls(self.client_files(ref))
        except PolicyError as err:
            self._reload_failed(old, err)
            return False
        return self._reloaded(old.files.where)

    def _reloaded(self, where: str) -> bool:
        self.reloads += 1
        self.generation += 1
        self.last_error = None
        log.info("TLS files of %s changed: reloaded for new connections", where)
        return True

    def _reload_failed(self, old: ServerTls | ClientTls, err: PolicyError) -> None:
        # Keep the old context, and do not retry until the files change again.
        if isinstance(old, ServerTls):
            old.stamp = ServerTls._files_stamp(old.files)
        else:
            old.stamp = _client_stamp(old.files)
        self.reload_errors += 1
        self.last_error = str(err)
        log.error("TLS files changed but do not load, keeping the ones in force: %s", err)

    def status(self) -> dict[str, Any]:
        """For ``l7proxy status``: what is in force, and the last reload that failed."""
        return {
            "secrets_dir": str(self.secrets_dir) if self.secrets_dir else None,
            "terminating": sorted({f"{ref.secret} ({family})" for ref, family in self._servers}),
            "originating": sorted({ref.secret for ref in self._clients}),
            "command_line": self.listener is not None or self.upstream is not None,
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------ per connection

    def _in_force(self) -> None:
        """``terminates`` and ``originates`` for the contexts now in force (a reload
        replaces a context, and changes neither)."""
        self.terminates = self.listener is not None or bool(self._servers)
        self.originates = self.upstream is not None or bool(self._clients)

    def server_context(
        self, ref: TlsContextRef | None, family: str | None
    ) -> ssl.SSLContext | None:
        """The context a connection is terminated with: its port's terminatingTLS,
        else the command line's certificate, else None (no termination)."""
        if ref is not None and family is not None:
            server = self._servers.get((ref, family))
            if server is not None:
                return server.context
        return self.listener.context if self.listener is not None else None

    def client_context(self, ref: TlsContextRef | None, alpn: str | None) -> ssl.SSLContext | None:
        """The context an upstream is connected with, offering the ALPN protocol
        the client chose; None: cleartext."""
        if ref is not None:
            client = self._clients.get(ref)
            if client is not None:
                return client.context(alpn)
        return self.upstream.context(alpn) if self.upstream is not None else None


def _client_stamp(files: ClientFiles) -> Stamp:
    return _stamp(
        [
            files.ca,
            files.directory,
            *((files.pair.certificate, files.pair.private_key) if files.pair else ()),
        ]
    )


def _client_stale(client: ClientTls) -> bool:
    return _client_stamp(client.files) != client.stamp


# The first bytes of a TLS connection read before OpenSSL gets them: a record header
# and a handshake header, which say how long the ClientHello is.
HELLO_HEADERS = 9


def refuse_client_hello(
    head: bytes, max_client_hello: int = MAX_CLIENT_HELLO
) -> ProtocolError | None:
    """Judge the first bytes of a connection to be terminated with the ClientHello reader
    of ``parsers/tls``, so that a terminated handshake has the same bound as a judged
    one (16 KiB, refused from its header with ``decode_error``) and bytes that are not
    TLS are closed without an answer. None: hand the connection to OpenSSL."""
    if opens_client_hello(head, max_client_hello):
        return None  # the common case, without building a reader for 9 bytes
    try:
        ClientHelloReader(max_client_hello).feed(head)
    except ProtocolError as err:
        return err
    return None


def session_fields(transport: asyncio.BaseTransport, ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """What the flow log records of a terminated session (``transport``'s, whose
    ``ssl_object`` it is): the name asked for, the protocol chosen, and a verified
    client certificate's subject and URIs (SPIFFE IDs)."""
    # The cipher and the peer's certificate as the event loop read them when the
    # handshake completed (its ``peercert`` and ``cipher`` extras, asyncio's and
    # uvloop's alike): not asked of ``ssl_object`` again, two Python calls fewer.
    cipher = transport.get_extra_info("cipher")
    fields: dict[str, Any] = {
        "sni": getattr(ssl_object, "l7proxy_server_name", None),
        "alpn": ssl_object.selected_alpn_protocol(),
        "version": ssl_object.version(),
        "cipher": (cipher or ("",))[0],
    }
    peer: dict[str, Any] | None = transport.get_extra_info("peercert")
    if peer:
        subject: tuple[tuple[tuple[str, str], ...], ...] = peer.get("subject", ())
        names: tuple[tuple[str, str], ...] = peer.get("subjectAltName", ())
        fields["client"] = {
            "subject": ",".join(f"{_RDN_NAMES.get(k, k)}={v}" for rdn in subject for k, v in rdn),
            "uris": [v for k, v in names if k == "URI"],
        }
    return fields


_RDN_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}
