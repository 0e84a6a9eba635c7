"""A CQL lexer and statement classifier: statement text -> (query_action, keyspace.table).

The lexer knows everything that can hide a keyword or a name from a naive
word split: ``--``/``//`` line comments, ``/* */`` block comments, quoted
identifiers (``"My Table"``, case kept, ``""`` escapes), string literals
(``'it''s'``) and ``$$ ... $$`` strings. Unquoted identifiers and keywords
are case-insensitive and are lower-cased.

Actions use Cilium's ``query_action`` vocabulary (see ``docs/cassandra.md``).
A statement the classifier does not understand gets the action ``unknown``
and no table, which only a rule without ``query_action``/``query_table``
allows: the proxy never guesses in the client's favour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

WORD, QUOTED, STRING, NUMBER, PUNCT = "word", "quoted", "string", "number", "punct"


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str  # lower-cased for WORD; unescaped for QUOTED and STRING


class LexError(ValueError):
    pass


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "-" and text.startswith("--", i) or c == "/" and text.startswith("//", i):
            # Cassandra ends a line comment at \n *or* \r; stopping only at \n
            # would let "FROM --\r ks.secret ... --\n ks.public" fool us.
            i = _line_end(text, i)
        elif c == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise LexError("unterminated /* comment")
            i = end + 2
        elif c == "'" or c == '"':
            value, i = _quoted(text, i, c)
            tokens.append(Token(STRING if c == "'" else QUOTED, value))
        elif c == "$" and text.startswith("$$", i):
            end = text.find("$$", i + 2)
            if end < 0:
                raise LexError("unterminated $$ string")
            tokens.append(Token(STRING, text[i + 2 : end]))
            i = end + 2
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(Token(WORD, text[i:j].lower()))
            i = j
        elif c.isdigit():
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "._"):
                j += 1
            tokens.append(Token(NUMBER, text[i:j]))
            i = j
        else:
            tokens.append(Token(PUNCT, c))
            i += 1
    return tokens


def _line_end(text: str, i: int) -> int:
    ends = [e for e in (text.find("\n", i), text.find("\r", i)) if e >= 0]
    return min(ends) + 1 if ends else len(text)


def _quoted(text: str, i: int, quote: str) -> tuple[str, int]:
    parts = []
    j = i + 1
    while True:
        end = text.find(quote, j)
        if end < 0:
            raise LexError(f"unterminated {quote} quote")
        parts.append(text[j:end])
        if text.startswith(quote * 2, end):  # doubled quote is an escaped quote
            parts.append(quote)
            j = end + 2
            continue
        return "".join(parts), end + 1


# --------------------------------------------------------------------------
# Classification


@dataclass(frozen=True, slots=True)
class Statement:
    """One classified statement. ``table`` is ``keyspace.name`` for table-like
    objects, the keyspace name for keyspace statements (and USE), else ``""``."""

    action: str
    table: str = ""
    keyspace: str = ""  # for USE: the keyspace it selects


UNKNOWN = Statement("unknown")

# Every query_action this classifier can produce: Cilium's list, plus
# alter-materialized-view which Cilium lacks. ``table`` is the qualified name
# of the object the statement touches; role, user and permission statements
# name no table (Cilium rejects a query_table next to those actions).
ACTIONS_WITHOUT_TABLE = frozenset(
    {
        "create-role",
        "alter-role",
        "drop-role",
        "grant-role",
        "revoke-role",
        "list-roles",
        "grant-permission",
        "revoke-permission",
        "list-permissions",
        "create-user",
        "alter-user",
        "drop-user",
        "list-users",
    }
)
ACTIONS_WITH_TABLE = frozenset(
    {
        "select",
        "insert",
        "update",
        "delete",
        "truncate-table",
        "create-table",
        "alter-table",
        "drop-table",
        "use",
        "create-keyspace",
        "alter-keyspace",
        "drop-keyspace",
        "create-index",
        "drop-index",
        "create-materialized-view",
        "alter-materialized-view",
        "drop-materialized-view",
        "create-type",
        "alter-type",
        "drop-type",
        "create-function",
        "drop-function",
        "create-aggregate",
        "drop-aggregate",
        "create-trigger",
        "drop-trigger",
    }
)
ACTIONS = ACTIONS_WITH_TABLE | ACTIONS_WITHOUT_TABLE

_OBJECTS = {
    # second word(s) after CREATE/ALTER/DROP -> object name in the action
    "keyspace": "keyspace",
    "schema": "keyspace",
    "table": "table",
    "columnfamily": "table",
    "index": "index",
    "type": "type",
    "function": "function",
    "aggregate": "aggregate",
    "trigger": "trigger",
    "role": "role",
    "user": "user",
}


_CACHE_LIMIT = 2048  # statements longer than this are classified afresh each time


def classify(text: str, keyspace: str = "") -> tuple[Statement, ...]:
    """Classify every statement in ``text`` (one, or the members of a
    ``BEGIN BATCH ... APPLY BATCH``). Unqualified names resolve in ``keyspace``.

    Drivers repeat the same few statements, so short ones are cached; long
    ones are not, so a client cannot fill the cache with megabytes of text."""
    if len(text) <= _CACHE_LIMIT:
        return _classify_cached(text, keyspace)
    return _classify(text, keyspace)


@lru_cache(maxsize=4096)
def _classify_cached(text: str, keyspace: str) -> tuple[Statement, ...]:
    return _classify(text, keyspace)


def _classify(text: str, keyspace: str) -> tuple[Statement, ...]:
    try:
        tokens = tokenize(text)
    except LexError:
        return (UNKNOWN,)
    statements = _split(tokens)
    if not statements:
        return (UNKNOWN,)
    out: list[Statement] = []
    for toks in statements:
        if toks and toks[0].text == "begin" and toks[0].kind == WORD:
            out.extend(_batch(toks, keyspace))
        else:
            out.append(_classify_one(toks, keyspace))
    return tuple(out)


def _split(tokens: list[Token]) -> list[list[Token]]:
    """Split on top-level semicolons, keeping a BEGIN ... APPLY BATCH whole."""
    out: list[list[Token]] = []
    current: list[Token] = []
    in_batch = False
    for k, tok in enumerate(tokens):
        if tok.kind == WORD and not current and tok.text == "begin":
            in_batch = True
        if tok.kind == PUNCT and tok.text == ";" and not in_batch:
            if current:
                out.append(current)
            current = []
            continue
        current.append(tok)
        if (
            in_batch
            and tok.kind == WORD
            and tok.text == "batch"
            and k > 0
            and tokens[k - 1].kind == WORD
            and tokens[k - 1].text == "apply"
        ):
            in_batch = False
    if current:
        out.append(current)
    return out


def _batch(tokens: list[Token], keyspace: str) -> list[Statement]:
    members: list[list[Token]] = []
    i = 1
    while i < len(tokens) and not _is(tokens[i], "batch"):
        i += 1
    if i == len(tokens):
        return [UNKNOWN]
    current: list[Token] | None = None
    applied = False
    for tok in tokens[i + 1 :]:
        if tok.kind == WORD and tok.text in ("insert", "update", "delete", "apply"):
            if current:
                members.append(current)
            current = [tok]
            if tok.text == "apply":
                applied = True
                current = None
                break
        elif tok.kind == PUNCT and tok.text == ";":
            continue
        elif current is not None:
            current.append(tok)
        # tokens before the first member belong to USING TIMESTAMP
    if not applied or not members:
        return [UNKNOWN]
    return [_classify_one(m, keyspace) for m in members]


def _is(tok: Token, word: str) -> bool:
    return tok.kind == WORD and tok.text == word


class _Cursor:
    __slots__ = ("toks", "i", "keyspace")

    def __init__(self, toks: list[Token], keyspace: str):
        self.toks, self.i, self.keyspace = toks, 0, keyspace

    def peek(self, ahead: int = 0) -> Token | None:
        j = self.i + ahead
        return self.toks[j] if j < len(self.toks) else None

    def word(self) -> str:
        tok = self.peek()
        if tok is None or tok.kind != WORD:
            return ""
        self.i += 1
        return tok.text

    def accept(self, *words: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == WORD and tok.text in words:
            self.i += 1
            return True
        return False

    def skip_if_exists(self) -> None:
        if self.accept("if"):
            self.accept("not")
            self.accept("exists")

    def name(self) -> str | None:
        tok = self.peek()
        if tok is None or tok.kind not in (WORD, QUOTED):
            return None
        self.i += 1
        return tok.text

    def qualified(self) -> str | None:
        """``ks.name`` or ``name`` resolved in the current keyspace."""
        first = self.name()
        if first is None:
            return None
        dot = self.peek()
        if dot is not None and dot.kind == PUNCT and dot.text == ".":
            self.i += 1
            second = self.name()
            if second is None:
                return None
            return f"{first}.{second}"
        return f"{self.keyspace}.{first}"

    def seek_top_level(self, word: str) -> bool:
        depth = 0
        while self.i < len(self.toks):
            tok = self.toks[self.i]
            self.i += 1
            if tok.kind == PUNCT:
                if tok.text in "([{":
                    depth += 1
                elif tok.text in ")]}":
                    depth -= 1
            elif depth == 0 and tok.kind == WORD and tok.text == word:
                return True
        return False

    def has_top_level(self, word: str, before: str) -> bool:
        """True if ``word`` occurs at depth 0 before ``before`` (from here)."""
        depth = 0
        for tok in self.toks[self.i :]:
            if tok.kind == PUNCT:
                depth += tok.text in "([{"
                depth -= tok.text in ")]}"
            elif depth == 0 and tok.kind == WORD:
                if tok.text == before:
                    return False
                if tok.text == word:
                    return True
        return False


# Reads the rest of a statement whose first word was its verb.
_Handler: TypeAlias = Callable[[_Cursor], Statement | None]


def _classify_one(toks: list[Token], keyspace: str) -> Statement:
    c = _Cursor(toks, keyspace)
    verb = c.word()
    handler = _VERBS.get(verb)
    if handler is None:
        return UNKNOWN
    return handler(c) or UNKNOWN


def _table_after(word: str, action: str) -> _Handler:
    def handle(c: _Cursor) -> Statement | None:
        if not c.seek_top_level(word):
            return None
        table = c.qualified()
        return Statement(action, table) if table else None

    return handle


def _insert(c: _Cursor) -> Statement | None:
    if not c.accept("into"):
        return None
    table = c.qualified()
    return Statement("insert", table) if table else None


def _update(c: _Cursor) -> Statement | None:
    table = c.qualified()
    return Statement("update", table) if table else None


def _truncate(c: _Cursor) -> Statement | None:
    c.accept("table", "columnfamily")
    table = c.qualified()
    return Statement("truncate-table", table) if table else None


def _use(c: _Cursor) -> Statement | None:
    ks = c.name()
    return Statement("use", ks, keyspace=ks) if ks else None


def _ddl(verb: str) -> _Handler:
    def handle(c: _Cursor) -> Statement | None:
        if verb == "create" and c.accept("or"):
            if not c.accept("replace"):
                return None
        c.accept("custom")  # CREATE CUSTOM INDEX
        if c.accept("materialized"):
            if not c.accept("view"):
                return None
            c.skip_if_exists()
            view = c.qualified()
            return Statement(f"{verb}-materialized-view", view or "")
        obj = _OBJECTS.get(c.word())
        if obj is None:
            return None
        action = f"{verb}-{obj}"
        c.skip_if_exists()
        if obj == "keyspace":
            ks = c.name()
            return Statement(action, ks) if ks else None
        if obj in ("role", "user"):
            return Statement(action)
        if obj == "index" and verb == "create":
            # CREATE INDEX [name] ON table: the table is what the index reads
            if c.seek_top_level("on"):
                return Statement(action, c.qualified() or "")
            return None
        if obj == "trigger":
            return Statement(action, c.qualified() or "") if c.seek_top_level("on") else None
        name = c.qualified()
        if name is None:
            return None
        return Statement(action, name)

    return handle


def _grant_revoke(verb: str, preposition: str) -> _Handler:
    def handle(c: _Cursor) -> Statement:
        # GRANT perm ON resource TO role  vs  GRANT role TO role
        kind = "permission" if c.has_top_level("on", before=preposition) else "role"
        return Statement(f"{verb}-{kind}")

    return handle


def _list(c: _Cursor) -> Statement | None:
    what = c.word()
    if what == "roles":
        return Statement("list-roles")
    if what == "users":
        return Statement("list-users")
    if what in (
        "all",
        "alter",
        "authorize",
        "create",
        "describe",
        "drop",
        "execute",
        "modify",
        "select",
        "permissions",
        "unmask",
        "select_masked",
    ):
        return Statement("list-permissions")
    return None


_VERBS = {
    "select": _table_after("from", "select"),
    "delete": _table_after("from", "delete"),
    "insert": _insert,
    "update": _update,
    "truncate": _truncate,
    "use": _use,
    "create": _ddl("create"),
    "alter": _ddl("alter"),
    "drop": _ddl("drop"),
    "grant": _grant_revoke("grant", "to"),
    "revoke": _grant_revoke("revoke", "from"),
    "list": _list,
}
