"""A CQL **server test double**: not Cassandra, but it speaks the native protocol
faithfully enough for the real cassandra-driver to connect, query and page.

    with running_cql_double(max_version=5) as double:
        cluster = Cluster(["127.0.0.1"], port=double.port, protocol_version=5)

What it implements, on a real socket (asyncio, in a background thread):
- OPTIONS/SUPPORTED, STARTUP with COMPRESSION lz4 or snappy (v4 frame bodies),
  REGISTER; v5 segments after READY (CRC24/CRC32, LZ4 via the driver's own
  segment codec, so the proxy's implementation is checked against another one);
- protocol negotiation as Cassandra does it: a version above ``max_version``
  gets ProtocolError "Invalid or unsupported protocol version", so the driver
  downgrades;
- the system tables the driver reads on connect (system.local, system.peers,
  system.peers_v2, system_schema.*, system_virtual_schema.*: the schema ones
  are empty);
- an in-memory table store: CREATE/DROP KEYSPACE, CREATE/ALTER/DROP TABLE,
  TRUNCATE (SchemaChange results), INSERT/UPDATE/DELETE by primary key, SELECT
  with equality WHERE, LIMIT, count(*), paging state; USE (SetKeyspace);
  PREPARE/EXECUTE (Unprepared for unknown ids); BATCH;
- errors: SyntaxError, Invalid, AlreadyExists, Unprepared, ProtocolError.

It parses statements with a deliberately small interpreter over the
project's tokenizer; anything outside the subset above is a SyntaxError.
``seen`` records every request envelope (opcode, stream, version, statement)
so tests can assert what did, and what did not, reach the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from cassandra import cqltypes
from cassandra.connection import lz4_compress, lz4_decompress
from cassandra.protocol import (
    read_binary_string,
    read_int,
    read_longstring,
    read_short,
    read_string,
    read_stringmap,
    read_value,
    write_int,
    write_short,
    write_string,
    write_stringmultimap,
    write_value,
)
from cassandra.segment import SegmentCodec

from parsers.cql.lexer import NUMBER, PUNCT, QUOTED, STRING, WORD, Token, tokenize

HEADER = struct.Struct(">BBhBI")

# type name -> (option id, cqltypes class)
TYPES = {
    "ascii": (0x0001, cqltypes.AsciiType),
    "bigint": (0x0002, cqltypes.LongType),
    "blob": (0x0003, cqltypes.BytesType),
    "boolean": (0x0004, cqltypes.BooleanType),
    "double": (0x0007, cqltypes.DoubleType),
    "int": (0x0009, cqltypes.Int32Type),
    "timestamp": (0x000B, cqltypes.DateType),
    "uuid": (0x000C, cqltypes.UUIDType),
    "text": (0x000D, cqltypes.UTF8Type),
    "varchar": (0x000D, cqltypes.UTF8Type),
    "inet": (0x0010, cqltypes.InetAddressType),
}
SET_TEXT = "set<text>"


class CqlFailure(Exception):
    def __init__(self, code: int, message: str, extra: bytes = b""):
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


def syntax(message: str) -> CqlFailure:
    return CqlFailure(0x2000, message)


def invalid(message: str) -> CqlFailure:
    return CqlFailure(0x2200, message)


@dataclass
class Table:
    keyspace: str
    name: str
    columns: list[tuple[str, str]]  # (name, type)
    key: list[str]
    rows: dict = field(default_factory=dict)  # primary key tuple -> {column: value}

    def type_of(self, column: str) -> str:
        for name, typ in self.columns:
            if name == column:
                return typ
        raise invalid(f"Undefined column name {column}")


@dataclass
class Result:
    kind: str  # void | rows | keyspace | schema
    columns: list[tuple[str, str]] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    keyspace: str = ""
    table: str = ""
    change: tuple = ()


@dataclass
class Plan:
    """A parsed statement: bind markers' types known before execution (for PREPARE)."""

    kind: str
    table: Table | None = None
    bind_types: list[tuple[str, str]] = field(default_factory=list)
    result_columns: list[tuple[str, str]] = field(default_factory=list)
    run: object = None  # callable(values) -> Result


class Store:
    """The in-memory keyspaces and tables shared by all connections of a double."""

    def __init__(self):
        self.keyspaces: set[str] = {"system", "system_schema"}
        self.tables: dict[tuple[str, str], Table] = {}
        self.schema_version = uuid.uuid4()
        self.host_id = uuid.uuid4()
        self.lock = threading.Lock()

    def table(self, keyspace: str, name: str) -> Table:
        t = self.tables.get((keyspace, name))
        if t is None:
            raise invalid(f"table {keyspace}.{name} does not exist")
        return t


# --------------------------------------------------------------------------
# The statement interpreter


class _Parser:
    def __init__(self, text: str, keyspace: str, store: Store):
        try:
            self.toks = [t for t in tokenize(text)]
        except ValueError as e:
            raise syntax(str(e)) from None
        while self.toks and self.toks[-1] == Token(PUNCT, ";"):
            self.toks.pop()
        self.i = 0
        self.keyspace = keyspace
        self.store = store
        self.binds: list[tuple[str, str]] = []

    def peek(self) -> Token | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise syntax("unexpected end of statement")
        self.i += 1
        return tok

    def accept(self, *words: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == WORD and tok.text in words:
            self.i += 1
            return True
        return False

    def expect(self, word: str) -> None:
        if not self.accept(word):
            raise syntax(f"expected {word.upper()} near {self.peek()}")

    def punct(self, ch: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == PUNCT and tok.text == ch:
            self.i += 1
            return True
        return False

    def ident(self) -> str:
        tok = self.next()
        if tok.kind not in (WORD, QUOTED):
            raise syntax(f"expected a name, got {tok.text!r}")
        return tok.text

    def qualified(self) -> tuple[str, str]:
        first = self.ident()
        if self.punct("."):
            return first, self.ident()
        if not self.keyspace:
            raise invalid(
                "No keyspace has been specified. USE a keyspace, or explicitly specify "
                "keyspace.tablename"
            )
        return self.keyspace, first

    def done(self) -> None:
        if self.peek() is not None:
            raise syntax(f"unexpected {self.peek().text!r}")

    def skip_if_exists(self) -> bool:
        if self.accept("if"):
            self.accept("not")
            self.expect("exists")
            return True
        return False

    def term(self, column: str, typ: str):
        """A literal, or a bind marker: returns a getter over the bound values."""
        tok = self.next()
        if tok.kind == PUNCT and tok.text == "?":
            index = len(self.binds)
            self.binds.append((column, typ))
            return lambda values: values[index]
        if tok.kind == PUNCT and tok.text == "-":
            num = self.next()
            return _const(_literal(Token(NUMBER, "-" + num.text), typ))
        return _const(_literal(tok, typ))

    def where(self, table: Table) -> list[tuple[str, object]]:
        conds = []
        if self.accept("where"):
            while True:
                col = self.ident()
                table.type_of(col)
                if not self.punct("="):
                    raise syntax("only = is supported in WHERE")
                conds.append((col, self.term(col, table.type_of(col))))
                if not self.accept("and"):
                    break
        return conds

    def skip_using(self) -> None:
        if self.accept("using"):
            while True:
                self.next()  # TTL / TIMESTAMP
                self.term("[using]", "bigint")
                if not self.accept("and"):
                    break


def _const(value):
    return lambda values: value


def _literal(tok: Token, typ: str):
    if tok.kind == WORD and tok.text == "null":
        return None
    try:
        if typ in ("int", "bigint"):
            return int(tok.text)
        if typ == "double":
            return float(tok.text)
        if typ == "boolean":
            return tok.text.lower() == "true"
        if typ == "blob":
            return bytes.fromhex(tok.text[2:])
        if typ == "uuid":
            return uuid.UUID(tok.text)
    except ValueError:
        raise invalid(f"invalid {typ} literal {tok.text!r}") from None
    if tok.kind != STRING:
        raise invalid(f"expected a string literal for {typ}, got {tok.text!r}")
    return tok.text


def plan(text: str, keyspace: str, store: Store) -> Plan:
    p = _Parser(text, keyspace, store)
    verb = p.next().text if p.peek() is not None and p.peek().kind == WORD else ""
    handler = _STATEMENTS.get(verb)
    if handler is None:
        raise syntax(f"line 1:0 no viable alternative at input {verb or text[:20]!r}")
    return handler(p)


def _select(p: _Parser) -> Plan:
    selectors: list[str] | None = []
    count = False
    if p.punct("*"):
        selectors = None
    else:
        while True:
            tok = p.next()
            if tok.kind == WORD and tok.text == "count" and p.punct("("):
                p.next()
                p.punct(")")
                count = True
            else:
                selectors.append(tok.text)
            if not p.punct(","):
                break
    p.expect("from")
    ks, name = p.qualified()
    if ks in (
        "system",
        "system_schema",
        "system_virtual_schema",
        "system_distributed",
        "system_auth",
        "system_traces",
    ):
        return _select_system(p, ks, name, selectors)
    table = p.store.table(ks, name)
    conds = p.where(table)
    limit = None
    if p.accept("limit"):
        limit = int(p.next().text)
    p.accept("allow") and p.accept("filtering")
    p.done()
    columns = table.columns if selectors is None else [(c, table.type_of(c)) for c in selectors]
    if count:
        columns = [("count", "bigint")]

    def run(values):
        want = {c: get(values) for c, get in conds}
        with p.store.lock:
            if sorted(want) == sorted(table.key):  # a primary-key lookup: no scan
                row = table.rows.get(tuple(want[k] for k in table.key))
                rows = [row] if row is not None else []
            else:
                rows = [
                    r for r in table.rows.values() if all(r.get(c) == v for c, v in want.items())
                ]
        if count:
            return Result("rows", columns, [[len(rows)]], table=f"{ks}.{name}")
        if limit is not None:
            rows = rows[:limit]
        return Result(
            "rows", columns, [[r.get(c) for c, _ in columns] for r in rows], keyspace=ks, table=name
        )

    return Plan("select", table, p.binds, columns, run)


_LOCAL_COLUMNS = [
    ("key", "text"),
    ("bootstrapped", "text"),
    ("broadcast_address", "inet"),
    ("cluster_name", "text"),
    ("cql_version", "text"),
    ("data_center", "text"),
    ("host_id", "uuid"),
    ("listen_address", "inet"),
    ("native_protocol_version", "text"),
    ("partitioner", "text"),
    ("rack", "text"),
    ("release_version", "text"),
    ("rpc_address", "inet"),
    ("schema_version", "uuid"),
    ("tokens", SET_TEXT),
]
_PEERS_COLUMNS = [
    ("peer", "inet"),
    ("data_center", "text"),
    ("host_id", "uuid"),
    ("preferred_ip", "inet"),
    ("rack", "text"),
    ("release_version", "text"),
    ("rpc_address", "inet"),
    ("schema_version", "uuid"),
    ("tokens", SET_TEXT),
]


def _select_system(p: _Parser, ks: str, name: str, selectors: list[str] | None) -> Plan:
    while p.peek() is not None:  # WHERE key='local', keyspace_name = ..., etc.: ignored
        p.next()
    store = p.store
    if (ks, name) == ("system", "local"):
        row = {
            "key": "local",
            "bootstrapped": "COMPLETED",
            "broadcast_address": "127.0.0.1",
            "cluster_name": "cql-double",
            "cql_version": "3.4.5",
            "data_center": "dc1",
            "host_id": store.host_id,
            "listen_address": "127.0.0.1",
            "native_protocol_version": "5",
            "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
            "rack": "rack1",
            "release_version": "4.0.11",
            "rpc_address": "127.0.0.1",
            "schema_version": store.schema_version,
            "tokens": {"0"},
        }
        all_columns, rows = _LOCAL_COLUMNS, [row]
    elif (ks, name) in (("system", "peers"), ("system", "peers_v2")):
        all_columns, rows = _PEERS_COLUMNS, []
    else:
        # schema tables: empty, so the driver's schema metadata is empty (a
        # result needs at least one column for the driver to parse it)
        all_columns, rows = [("keyspace_name", "text")], []
    if selectors is None:
        columns = all_columns
    else:
        known = dict(all_columns)
        columns = [(c, known.get(c, "text")) for c in selectors]

    def run(values):
        return Result(
            "rows", columns, [[r.get(c) for c, _ in columns] for r in rows], keyspace=ks, table=name
        )

    return Plan("select", None, [], columns, run)


def _insert(p: _Parser) -> Plan:
    p.expect("into")
    ks, name = p.qualified()
    table = p.store.table(ks, name)
    if not p.punct("("):
        raise syntax("expected column list")
    cols = []
    while True:
        cols.append(p.ident())
        if p.punct(")"):
            break
        if not p.punct(","):
            raise syntax("expected , or )")
    p.expect("values")
    p.punct("(")
    getters = []
    for k, col in enumerate(cols):
        getters.append(p.term(col, table.type_of(col)))
        p.punct(",") if k < len(cols) - 1 else p.punct(")")
    if_not_exists = p.skip_if_exists()
    p.skip_using()
    p.done()
    if any(k not in cols for k in table.key):
        raise invalid("Some partition key parts are missing")

    def run(values):
        row = {c: g(values) for c, g in zip(cols, getters, strict=True)}
        key = tuple(row[k] for k in table.key)
        with p.store.lock:
            if if_not_exists and key in table.rows:
                return Result("rows", [("[applied]", "boolean")], [[False]])
            table.rows.setdefault(key, {}).update(row)
        if if_not_exists:
            return Result("rows", [("[applied]", "boolean")], [[True]])
        return Result("void")

    return Plan("insert", table, p.binds, [], run)


def _update(p: _Parser) -> Plan:
    ks, name = p.qualified()
    table = p.store.table(ks, name)
    p.skip_using()
    p.expect("set")
    sets = []
    while True:
        col = p.ident()
        if not p.punct("="):
            raise syntax("expected =")
        sets.append((col, p.term(col, table.type_of(col))))
        if not p.punct(","):
            break
    conds = p.where(table)
    p.done()
    if sorted(c for c, _ in conds) != sorted(table.key):
        raise invalid("UPDATE needs the full primary key in WHERE")

    def run(values):
        key_values = {c: g(values) for c, g in conds}
        key = tuple(key_values[k] for k in table.key)
        with p.store.lock:
            row = table.rows.setdefault(key, dict(key_values))
            row.update({c: g(values) for c, g in sets})
        return Result("void")

    return Plan("update", table, p.binds, [], run)


def _delete(p: _Parser) -> Plan:
    p.expect("from")
    ks, name = p.qualified()
    table = p.store.table(ks, name)
    conds = p.where(table)
    p.done()

    def run(values):
        want = {c: g(values) for c, g in conds}
        with p.store.lock:
            for key, row in list(table.rows.items()):
                if all(row.get(c) == v for c, v in want.items()):
                    del table.rows[key]
        return Result("void")

    return Plan("delete", table, p.binds, [], run)


def _use(p: _Parser) -> Plan:
    ks = p.ident()
    p.done()
    if ks not in p.store.keyspaces:
        raise invalid(f"Keyspace '{ks}' does not exist")
    return Plan("use", None, [], [], lambda values: Result("keyspace", keyspace=ks))


def _truncate(p: _Parser) -> Plan:
    p.accept("table")
    ks, name = p.qualified()
    table = p.store.table(ks, name)
    p.done()

    def run(values):
        with p.store.lock:
            table.rows.clear()
        return Result("void")

    return Plan("truncate", table, [], [], run)


def _schema(store: Store, change: str, target: str, ks: str, name: str = "") -> Result:
    store.schema_version = uuid.uuid4()
    return Result("schema", change=(change, target, ks, name))


def _create(p: _Parser) -> Plan:
    store = p.store
    if p.accept("keyspace"):
        ine = p.skip_if_exists()
        ks = p.ident()
        while p.peek() is not None:  # WITH replication = {...}: accepted as is
            p.next()

        def run_ks(values):
            with store.lock:
                if ks in store.keyspaces:
                    if ine:
                        return Result("void")
                    raise CqlFailure(0x2400, f"Keyspace {ks} already exists", _strings(ks, ""))
                store.keyspaces.add(ks)
                return _schema(store, "CREATED", "KEYSPACE", ks)

        return Plan("schema", None, [], [], run_ks)
    p.expect("table")
    ine = p.skip_if_exists()
    ks, name = p.qualified()
    if ks not in store.keyspaces:
        raise invalid(f"Keyspace {ks} does not exist")
    if not p.punct("("):
        raise syntax("expected (")
    columns, key = [], []
    while True:
        if p.accept("primary"):
            p.expect("key")
            p.punct("(")
            while True:
                if p.punct("("):
                    continue
                if p.punct(")"):
                    if not p.punct(","):
                        break
                    continue
                key.append(p.ident())
                p.punct(",")
        else:
            col = p.ident()
            typ = p.ident()
            if typ not in TYPES:
                raise invalid(f"the test double does not support type {typ}")
            columns.append((col, typ))
            if p.accept("primary"):
                p.expect("key")
                key.append(col)
        if p.punct(")"):
            break
        if not p.punct(","):
            raise syntax(f"expected , near {p.peek()}")
    while p.peek() is not None:  # WITH options
        p.next()
    if not key:
        raise invalid("No PRIMARY KEY specified")

    def run(values):
        with store.lock:
            if (ks, name) in store.tables:
                if ine:
                    return Result("void")
                raise CqlFailure(0x2400, f"Table {ks}.{name} already exists", _strings(ks, name))
            store.tables[(ks, name)] = Table(ks, name, columns, key)
            return _schema(store, "CREATED", "TABLE", ks, name)

    return Plan("schema", None, [], [], run)


def _alter(p: _Parser) -> Plan:
    p.expect("table")
    ks, name = p.qualified()
    table = p.store.table(ks, name)
    p.expect("add")
    col, typ = p.ident(), p.ident()
    p.done()

    def run(values):
        table.columns.append((col, typ))
        return _schema(p.store, "UPDATED", "TABLE", ks, name)

    return Plan("schema", table, [], [], run)


def _drop(p: _Parser) -> Plan:
    store = p.store
    if p.accept("keyspace"):
        ie = p.skip_if_exists()
        ks = p.ident()
        p.done()

        def run_ks(values):
            with store.lock:
                if ks not in store.keyspaces:
                    if ie:
                        return Result("void")
                    raise invalid(f"Keyspace {ks} does not exist")
                store.keyspaces.discard(ks)
                for key in [k for k in store.tables if k[0] == ks]:
                    del store.tables[key]
                return _schema(store, "DROPPED", "KEYSPACE", ks)

        return Plan("schema", None, [], [], run_ks)
    p.expect("table")
    ie = p.skip_if_exists()
    ks, name = p.qualified()
    p.done()

    def run(values):
        with store.lock:
            if (ks, name) not in store.tables:
                if ie:
                    return Result("void")
                raise invalid(f"Table {ks}.{name} does not exist")
            del store.tables[(ks, name)]
            return _schema(store, "DROPPED", "TABLE", ks, name)

    return Plan("schema", None, [], [], run)


_STATEMENTS = {
    "select": _select,
    "insert": _insert,
    "update": _update,
    "delete": _delete,
    "use": _use,
    "truncate": _truncate,
    "create": _create,
    "alter": _alter,
    "drop": _drop,
}


# --------------------------------------------------------------------------
# Encoding


def _strings(*values: str) -> bytes:
    buf = io.BytesIO()
    for v in values:
        write_string(buf, v)
    return buf.getvalue()


def _option(typ: str) -> bytes:
    if typ == SET_TEXT:
        return struct.pack(">HH", 0x0022, 0x000D)
    return struct.pack(">H", TYPES[typ][0])


def _serialize(typ: str, value, version: int) -> bytes | None:
    if value is None:
        return None
    if typ == SET_TEXT:
        return cqltypes.SetType.apply_parameters([cqltypes.UTF8Type]).serialize(value, version)
    return TYPES[typ][1].serialize(value, version)


def _deserialize(typ: str, raw: bytes | None, version: int):
    if raw is None:
        return None
    return TYPES[typ][1].deserialize(raw, version)


def _metadata(
    buf: io.BytesIO,
    columns,
    ks: str,
    table: str,
    paging_state: bytes | None = None,
    pk_indexes: list[int] | None = None,
) -> None:
    flags = 0x0001 | (0x0002 if paging_state is not None else 0)
    write_int(buf, flags)
    write_int(buf, len(columns))
    if pk_indexes is not None:
        write_int(buf, len(pk_indexes))
        for k in pk_indexes:
            write_short(buf, k)
    if paging_state is not None:
        write_value(buf, paging_state)
    write_string(buf, ks or "system")
    write_string(buf, table or "local")
    for name, typ in columns:
        write_string(buf, name)
        buf.write(_option(typ))


@dataclass
class Seen:
    opcode: int
    stream: int
    version: int
    statement: str = ""


class _Connection:
    def __init__(self, double: CqlServerDouble, reader, writer):
        self.double = double
        self.reader, self.writer = reader, writer
        self.version = 0
        self.keyspace = ""
        self.frame_compression = None  # (compress, decompress) for v4
        self.segments: SegmentCodec | None = None
        self.envelopes = bytearray()

    async def serve(self) -> None:
        try:
            while True:
                if self.segments is None:
                    header = await self.reader.readexactly(9)
                    length = struct.unpack(">I", header[5:])[0]
                    body = await self.reader.readexactly(length)
                    await self.handle(header, body)
                else:
                    await self.read_segment()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writer.close()

    async def read_segment(self) -> None:
        codec = self.segments
        head = await self.reader.readexactly(codec.header_length_with_crc)
        header = codec.decode_header(io.BytesIO(head))
        rest = await self.reader.readexactly(header.payload_length + 4)
        segment = codec.decode(io.BytesIO(rest), header)
        self.envelopes += segment.payload
        while len(self.envelopes) >= 9:
            length = struct.unpack_from(">I", self.envelopes, 5)[0]
            if len(self.envelopes) < 9 + length:
                break
            header, body = bytes(self.envelopes[:9]), bytes(self.envelopes[9 : 9 + length])
            del self.envelopes[: 9 + length]
            await self.handle(header, body)

    async def send(
        self, version: int, stream: int, opcode: int, body: bytes, flags: int = 0
    ) -> None:
        if self.frame_compression is not None and body and self.segments is None:
            body = self.frame_compression[0](body)
            flags |= 0x01
        envelope = HEADER.pack(0x80 | version, flags, stream, opcode, len(body)) + body
        if self.segments is not None:
            buf = io.BytesIO()
            self.segments.encode(buf, envelope)
            envelope = buf.getvalue()
        self.writer.write(envelope)
        await self.writer.drain()

    async def error(
        self, version: int, stream: int, code: int, message: str, extra: bytes = b""
    ) -> None:
        buf = io.BytesIO()
        write_int(buf, code)
        write_string(buf, message)
        buf.write(extra)
        await self.send(version, stream, 0x00, buf.getvalue())

    async def handle(self, header: bytes, body: bytes) -> None:
        vbyte, flags, stream, opcode, _ = HEADER.unpack(header)
        version = vbyte & 0x7F
        if version > self.double.max_version or version < 3:
            # What Cassandra answers, so that drivers downgrade.
            await self.error(
                self.double.max_version,
                stream,
                0x000A,
                f"Invalid or unsupported protocol version ({version}); "
                f"highest supported version is {self.double.max_version}",
            )
            return
        self.version = version
        if flags & 0x01 and version < 5:
            body = self.frame_compression[1](body)
        f = io.BytesIO(body)
        if flags & 0x04:
            for _ in range(read_short(f)):
                read_string(f)
                read_value(f)
        try:
            await self.dispatch(version, stream, opcode, f)
        except CqlFailure as e:
            await self.error(version, stream, e.code, e.message, e.extra)

    async def dispatch(self, version: int, stream: int, opcode: int, f: io.BytesIO) -> None:
        double = self.double
        if opcode == 0x05:  # OPTIONS
            double.seen.append(Seen(opcode, stream, version))
            buf = io.BytesIO()
            write_stringmultimap(
                buf,
                {
                    "CQL_VERSION": ["3.4.5"],
                    "COMPRESSION": ["lz4", "snappy"],
                    "PROTOCOL_VERSIONS": [f"{v}/v{v}" for v in range(3, double.max_version + 1)],
                },
            )
            await self.send(version, stream, 0x06, buf.getvalue())
        elif opcode == 0x01:  # STARTUP
            options = read_stringmap(f)
            double.seen.append(Seen(opcode, stream, version, str(options)))
            compression = options.get("COMPRESSION", "").lower()
            if double.credentials is not None:
                await self.send(
                    version,
                    stream,
                    0x03,
                    _strings("org.apache.cassandra.auth.PasswordAuthenticator"),
                )
            else:
                await self.send(version, stream, 0x02, b"")
            if version >= 5:
                self.segments = (
                    SegmentCodec(lz4_compress, lz4_decompress)
                    if compression == "lz4"
                    else SegmentCodec()
                )
            elif compression:
                self.frame_compression = _FRAME_CODECS[compression]
        elif opcode == 0x0F:  # AUTH_RESPONSE
            token = read_value(f) or b""
            double.seen.append(Seen(opcode, stream, version))
            user, password = double.credentials or ("", "")
            if token != b"\x00" + user.encode() + b"\x00" + password.encode():
                raise CqlFailure(0x0100, "Provided username and/or password are incorrect")
            buf = io.BytesIO()
            write_value(buf, None)
            await self.send(version, stream, 0x10, buf.getvalue())
        elif opcode == 0x0B:  # REGISTER
            double.seen.append(Seen(opcode, stream, version))
            await self.send(version, stream, 0x02, b"")
        elif opcode == 0x07:  # QUERY
            text = read_longstring(f)
            double.seen.append(Seen(opcode, stream, version, text))
            params = _read_params(f, version)
            keyspace = params.get("keyspace") or self.keyspace
            p = plan(text, keyspace, double.store)
            values = [
                _deserialize(t, v, version)
                for (_, t), v in zip(p.bind_types, params["values"], strict=False)
            ]
            await self.result(version, stream, p, values, params)
        elif opcode == 0x09:  # PREPARE
            text = read_longstring(f)
            keyspace = self.keyspace
            if version >= 5 and read_int(f) & 0x01:
                keyspace = read_string(f)
            double.seen.append(Seen(opcode, stream, version, text))
            p = plan(text, keyspace, double.store)
            prepared_id = hashlib.md5(f"{keyspace}:{text}".encode()).digest()
            double.prepared[prepared_id] = (text, keyspace)
            await self.prepared(version, stream, prepared_id, p)
        elif opcode == 0x0A:  # EXECUTE
            prepared_id = read_binary_string(f)
            if version >= 5:
                read_binary_string(f)  # result metadata id
            known = double.prepared.get(prepared_id)
            double.seen.append(Seen(opcode, stream, version, known[0] if known else ""))
            if known is None or prepared_id in double.forgotten:
                raise CqlFailure(
                    0x2500,
                    "Prepared query with ID not found",
                    struct.pack(">H", len(prepared_id)) + prepared_id,
                )
            p = plan(known[0], known[1], double.store)
            params = _read_params(f, version)
            values = [
                _deserialize(t, v, version)
                for (_, t), v in zip(p.bind_types, params["values"], strict=False)
            ]
            await self.result(version, stream, p, values, params)
        elif opcode == 0x0D:  # BATCH
            await self.batch(version, stream, f)
        else:
            raise CqlFailure(0x000A, f"unexpected opcode {opcode}")

    async def batch(self, version: int, stream: int, f: io.BytesIO) -> None:
        double = self.double
        f.read(1)
        members = []
        for _ in range(read_short(f)):
            kind = f.read(1)[0]
            if kind == 0:
                text, keyspace = read_longstring(f), None
            else:
                prepared_id = read_binary_string(f)
                if prepared_id not in double.prepared:
                    raise CqlFailure(
                        0x2500,
                        "Prepared query with ID not found",
                        struct.pack(">H", len(prepared_id)) + prepared_id,
                    )
                text, keyspace = double.prepared[prepared_id]
            raw_values = [read_value(f) for _ in range(read_short(f))]
            members.append((text, keyspace, raw_values))
        double.seen.append(Seen(0x0D, stream, version, " ; ".join(m[0] for m in members)))
        plans = []
        for text, keyspace, raw_values in members:
            p = plan(text, keyspace if keyspace is not None else self.keyspace, double.store)
            if p.kind not in ("insert", "update", "delete"):
                raise invalid("Only INSERT, UPDATE and DELETE statements are allowed in a BATCH")
            plans.append(
                (
                    p,
                    [
                        _deserialize(t, v, version)
                        for (_, t), v in zip(p.bind_types, raw_values, strict=False)
                    ],
                )
            )
        for p, values in plans:
            p.run(values)
        await self.send(version, stream, 0x08, struct.pack(">i", 1))

    async def result(self, version: int, stream: int, p: Plan, values, params) -> None:
        res = p.run(values)
        buf = io.BytesIO()
        if res.kind == "void":
            write_int(buf, 1)
        elif res.kind == "keyspace":
            self.keyspace = res.keyspace
            write_int(buf, 3)
            write_string(buf, res.keyspace)
        elif res.kind == "schema":
            change, target, ks, name = res.change
            write_int(buf, 5)
            write_string(buf, change)
            write_string(buf, target)
            write_string(buf, ks)
            if target != "KEYSPACE":
                write_string(buf, name)
        else:
            rows = res.rows
            start = int(params["paging_state"]) if params.get("paging_state") else 0
            size = params.get("page_size") or len(rows) or 1
            page = rows[start : start + size]
            more = str(start + size).encode() if start + size < len(rows) else None
            write_int(buf, 2)
            _metadata(buf, res.columns, res.keyspace, res.table, paging_state=more)
            write_int(buf, len(page))
            for row in page:
                for (_, typ), value in zip(res.columns, row, strict=True):
                    write_value(buf, _serialize(typ, value, version))
        await self.send(version, stream, 0x08, buf.getvalue())

    async def prepared(self, version: int, stream: int, prepared_id: bytes, p: Plan) -> None:
        buf = io.BytesIO()
        write_int(buf, 4)
        write_short(buf, len(prepared_id))
        buf.write(prepared_id)
        if version >= 5:
            write_short(buf, 16)
            buf.write(hashlib.md5(repr(p.result_columns).encode()).digest())
        table = p.table
        pk = (
            [i for i, (c, _) in enumerate(p.bind_types) if table and c in table.key]
            if version >= 4
            else None
        )
        _metadata(
            buf,
            p.bind_types,
            table.keyspace if table else "",
            table.name if table else "",
            pk_indexes=pk,
        )
        if p.result_columns:
            _metadata(
                buf, p.result_columns, table.keyspace if table else "", table.name if table else ""
            )
        else:
            write_int(buf, 0x0004)
            write_int(buf, 0)
        await self.send(version, stream, 0x08, buf.getvalue())


def _read_params(f: io.BytesIO, version: int) -> dict:
    read_short(f)  # consistency
    flags = read_int(f) if version >= 5 else f.read(1)[0]
    params: dict = {"values": []}
    if flags & 0x01:
        for _ in range(read_short(f)):
            if flags & 0x40:
                read_string(f)
            params["values"].append(read_value(f))
    if flags & 0x04:
        params["page_size"] = read_int(f)
    if flags & 0x08:
        params["paging_state"] = read_value(f)
    if flags & 0x10:
        read_short(f)
    if flags & 0x20:
        f.read(8)
    if version >= 5 and flags & 0x80:
        params["keyspace"] = read_string(f)
    return params


def _snappy_codec():
    import snappy

    return snappy.compress, snappy.uncompress


_FRAME_CODECS = {
    "lz4": (lz4_compress, lz4_decompress),
    "snappy": _snappy_codec(),
}


class CqlServerDouble:
    """The double's listening socket and shared state; see ``running_cql_double``."""

    def __init__(self, max_version: int = 5, credentials: tuple[str, str] | None = None):
        self.max_version = max_version
        self.credentials = credentials  # (user, password): PasswordAuthenticator
        self.store = Store()
        self.prepared: dict[bytes, tuple[str, str]] = {}
        self.forgotten: set[bytes] = set()  # ids to answer Unprepared for (tests)
        self.seen: list[Seen] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None

    def statements(self) -> list[str]:
        return [s.statement for s in self.seen if s.opcode in (0x07, 0x09, 0x0A, 0x0D)]

    async def _start(self) -> None:
        async def accept(reader, writer):
            await _Connection(self, reader, writer).serve()

        self._server = await asyncio.start_server(accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]


@contextmanager
def running_cql_double(max_version: int = 5, credentials: tuple[str, str] | None = None):
    """Run a ``CqlServerDouble`` on 127.0.0.1 in a background thread."""
    double = CqlServerDouble(max_version, credentials)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def main():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(double._start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="cql-server-double", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("CQL server double did not start")
    double._loop = loop
    try:
        yield double
    finally:

        async def stop():
            double._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def main() -> None:
    """``python -m tests.support.cql_server_double [--max-version N]``: serve until killed
    (benchmarks run the double in its own process so its CPU is not the proxy's)."""
    import argparse

    parser = argparse.ArgumentParser(description="CQL server test double")
    parser.add_argument("--max-version", type=int, default=5)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    double = CqlServerDouble(args.max_version)
    double.host, double.port = args.host, args.port

    async def serve():
        await double._start()
        print(f"cql server double listening on {double.host}:{double.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
