"""HTTP request targets -> the fewest full-match path regexes the data supports.

A target is read as a list of tokens, each with the separator before it:
``/users/12/posts?page=3&sort=asc`` is ``/users``, ``/12``, ``/posts``,
``?page=`` ``3`` and ``&sort=`` ``asc`` (a query parameter's name stays in its
separator, so only its value can vary). Targets are merged position by
position, top down, among targets that agree on everything before:

* **Typed values** (whole UUIDs, ISO dates, decimal numbers, and hex strings of 8
  or more characters with a digit and a letter) become their type's pattern once
  ``min_samples`` distinct values of that type share a position. ``2fa`` and
  ``123abc`` are none of these: they stay literal.
* **Free-form values** become a pattern only when ``max_literals`` distinct
  values of one shape share a position, and never as a path's first segment
  (the root of an API names its parts; a scanner's probes live there too). A
  shape is the sequence of letter-and-digit runs and the punctuation between
  them (``logo.png`` and ``app.js`` are both ``A.A``). A run that takes fewer
  than ``max_literals`` values splits the values by it and stays literal
  (``\\.png`` and ``\\.js`` apart); the runs that vary more become the
  narrowest character class that holds them, with the observed lengths as
  bounds. In a path, values that read as words (letters only, no fixed part beside
  them) are never folded, however many: an API's resource names and a scanner's
  guesses both look like that (a query parameter's value may be a word). Typed
  values are left to ``min_samples`` alone.

Patterns never cross a separator: a variable segment is ``[0-9]+`` or
``[a-z]{3,9}``, never ``.*``, so the number of segments, the literal segments
around a variable one and the query's parameter names are always kept. Rules
are full-match regexes (the policy engine and Cilium both match the whole
target), so every pattern is anchored at both ends.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# What regexes give meaning to; everything else in a target is literal as written.
_SPECIAL = frozenset("\\.^$*+?{}[]|()")

UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
DATE = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")
NUMBER = re.compile(r"[0-9]+")
HEX = re.compile(r"[0-9a-fA-F]{8,}")
_RUN = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9]")


@dataclass(frozen=True, slots=True)
class Bounds:
    """How general a suggestion may get.

    ``min_samples``: distinct values of a type (number, UUID, date, hex) needed at
    one position before it becomes that type's pattern; 0 never generalises.
    ``max_literals``: distinct free-form values of one shape at one position
    before they become a character-class pattern; 0 never does.
    """

    min_samples: int = 3
    max_literals: int = 20

    def __post_init__(self) -> None:
        if self.min_samples < 0 or self.max_literals < 0:
            raise ValueError("min_samples and max_literals must be >= 0")
        if self.min_samples == 1 or self.max_literals == 1:
            raise ValueError("one value is no evidence of a variable segment: use 0 or >= 2")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """One suggested path regex, the targets it came from and how many requests."""

    regex: str
    requests: int
    targets: tuple[str, ...]  # distinct targets it covers, most frequent first

    @property
    def literal(self) -> bool:
        return len(self.targets) == 1 and self.regex == escape(self.targets[0])


def escape(text: str) -> str:
    """``text`` as a regex that matches only itself, escaping only what needs it
    (``re.escape`` also escapes ``-``, ``/`` is fine, and the result is for people)."""
    return "".join("\\" + c if c in _SPECIAL else c for c in text)


Token = tuple[str, str]  # (separator, value)


def tokens(target: str) -> tuple[Token, ...]:
    """A request target as (separator, value) tokens; see the module docstring.
    A target that is not a path (``*``, absolute form) is one literal token."""
    if not target.startswith("/"):
        return (("", target),)
    path, question, query = target.partition("?")
    out: list[Token] = [("/", seg) for seg in path[1:].split("/")]
    if question:
        for i, param in enumerate(query.split("&")):
            name, equals, value = param.partition("=")
            lead = "?" if i == 0 else "&"
            out.append((lead + name + "=", value) if equals else (lead, param))
    return tuple(out)


def _variable_position(separator: str, index: int) -> bool:
    """May a free-form value here be generalised? Not the first path segment, nor a
    bare query word; a later segment or a parameter's value may."""
    return (separator == "/" and index > 0) or separator.endswith("=")


# ----------------------------------------------------------------------------- typed values


def value_type(value: str) -> str | None:
    """``uuid``, ``date``, ``number``, ``hex`` or None (free-form)."""
    if UUID.fullmatch(value):
        return "uuid"
    if DATE.fullmatch(value):
        return "date"
    if NUMBER.fullmatch(value):
        return "number"
    if HEX.fullmatch(value) and any(c.isdigit() for c in value) and any(c.isalpha() for c in value):
        return "hex"
    return None


def _case_class(values: Iterable[str], lower: str, upper: str, mixed: str) -> str:
    letters = "".join(c for v in values for c in v if c.isalpha())
    if letters.islower() or not letters:
        return lower
    if letters.isupper():
        return upper
    return mixed


def _lengths(values: Iterable[str]) -> str:
    sizes = {len(v) for v in values}
    lo, hi = min(sizes), max(sizes)
    return f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"


def typed_regex(kind: str, values: Iterable[str]) -> str:
    values = list(values)
    if kind == "number":
        return "[0-9]+"
    if kind == "date":
        return "[0-9]{4}-[0-9]{2}-[0-9]{2}"
    hexdigit = _case_class(values, "[0-9a-f]", "[0-9A-F]", "[0-9A-Fa-f]")
    if kind == "uuid":
        return "-".join(f"{hexdigit}{{{n}}}" for n in (8, 4, 4, 4, 12))
    return hexdigit + _lengths(values)


# ----------------------------------------------------------------------------- free-form values


def shape(value: str) -> tuple[str, ...]:
    """Letter-and-digit runs as ``A``, punctuation as itself: ``v1.2-rc`` -> A . A - A."""
    return tuple("A" if run[0].isalnum() else run for run in _RUN.findall(value))


def _run_class(runs: list[str]) -> str:
    chars = set("".join(runs))
    digits = any(c.isdigit() for c in chars)
    letters = {c for c in chars if c.isalpha()}
    if not letters:
        return "[0-9]"
    lower = all(c.islower() for c in letters)
    upper = all(c.isupper() for c in letters)
    if not digits:
        return "[a-z]" if lower else "[A-Z]" if upper else "[A-Za-z]"
    if lower and letters <= set("abcdef"):
        return "[0-9a-f]"
    if upper and letters <= set("ABCDEF"):
        return "[0-9A-F]"
    return "[0-9a-z]" if lower else "[0-9A-Z]" if upper else "[0-9A-Za-z]"


def _by_fixed_runs(values: list[str], max_literals: int, words: bool) -> list[list[str]]:
    """Values of one shape, split by the runs that take few values (``png`` and ``js``
    in ``*.png``, ``*.js``): the groups with ``max_literals`` distinct values, each to
    become one regex. A run that varies less than that is kept as it was seen."""
    if len(values) < max_literals:
        return []
    columns = list(zip(*(_RUN.findall(v) for v in values), strict=True))
    fixed = [i for i, column in enumerate(columns) if len(set(column)) < max_literals]
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for n, value in enumerate(values):
        groups[tuple(columns[i][n] for i in fixed)].append(value)
    return [g for g in groups.values() if len(g) >= max_literals and (words or _token_like(g))]


def _token_like(values: list[str]) -> bool:
    """Do these values look generated rather than named? Names of an API's parts (and
    a scanner's guesses) are words: letters only, of any length. Generated values have
    a fixed part beside the varying one (``*.png``, ``user-*``), or vary in runs that
    hold digits or keep one length (``a1b2c3``, ``x7k2q9``). Words are never folded."""
    columns = list(zip(*(_RUN.findall(v) for v in values), strict=True))
    if any(len(set(c)) == 1 and c[0][0].isalnum() for c in columns):
        return True
    return all(
        len({len(run) for run in c}) == 1 or any(ch.isdigit() for run in c for ch in run)
        for c in columns
        if len(set(c)) > 1
    )


def freeform_regex(values: Iterable[str]) -> str:
    """One regex for values of one shape: constant runs literal, varying runs a class."""
    split = [_RUN.findall(v) for v in values]
    parts = []
    for column in zip(*split, strict=True):
        if len(set(column)) == 1:
            parts.append(escape(column[0]))
        else:
            runs = list(column)
            parts.append(_run_class(runs) + _lengths(runs))
    return "".join(parts)


# ----------------------------------------------------------------------------- the merge


@dataclass(slots=True)
class _Group:
    """Targets that agree on their first ``depth`` tokens, and the regex of those."""

    regex: str
    depth: int
    members: list[tuple[tuple[Token, ...], str, int]] = field(default_factory=list)


def generalise(targets: Mapping[str, int], bounds: Bounds = Bounds()) -> list[PathPattern]:
    """The path patterns for one method's targets (target -> requests), sorted by regex."""
    patterns: list[PathPattern] = []
    work = [_Group("", 0, [(tokens(t), t, n) for t, n in targets.items() if n > 0])]
    while work:  # a stack, not recursion: a target may have thousands of segments
        group = work.pop()
        ended = [(t, n) for toks, t, n in group.members if len(toks) == group.depth]
        if ended:
            ended.sort(key=lambda tn: (-tn[1], len(tn[0]), tn[0]))  # 7, 42, 501
            patterns.append(
                PathPattern(group.regex, sum(n for _, n in ended), tuple(t for t, _ in ended))
            )
        by_separator: dict[str, dict[str, list[tuple[tuple[Token, ...], str, int]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for member in group.members:
            toks = member[0]
            if len(toks) > group.depth:
                separator, value = toks[group.depth]
                by_separator[separator][value].append(member)
        for separator, by_value in by_separator.items():
            lead = group.regex + escape(separator)
            for regex, members in _merge(separator, group.depth, by_value, bounds):
                work.append(_Group(lead + regex, group.depth + 1, members))
    patterns.sort(key=lambda p: p.regex)
    return patterns


def _merge(
    separator: str,
    index: int,
    by_value: dict[str, list[tuple[tuple[Token, ...], str, int]]],
    bounds: Bounds,
) -> list[tuple[str, list[tuple[tuple[Token, ...], str, int]]]]:
    """The values at one position -> (token regex, the targets under it)."""
    out: list[tuple[str, list[tuple[tuple[Token, ...], str, int]]]] = []
    left = dict(by_value)
    if bounds.min_samples:
        by_type: dict[str, list[str]] = defaultdict(list)
        for value in left:
            kind = value_type(value)
            if kind is not None:
                by_type[kind].append(value)
        for kind, values in by_type.items():
            if len(values) >= bounds.min_samples:
                members = [m for v in values for m in left.pop(v)]
                out.append((typed_regex(kind, values), members))
    if bounds.max_literals and _variable_position(separator, index):
        by_shape: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for value in left:
            if value and value_type(value) is None:  # typed values answer to min_samples
                by_shape[shape(value)].append(value)
        for values in by_shape.values():
            # A query value is data for a path already named: words may vary there.
            words = separator.endswith("=")
            for group in _by_fixed_runs(values, bounds.max_literals, words):
                members = [m for v in group for m in left.pop(v)]
                out.append((freeform_regex(group), members))
    out += [(escape(value), members) for value, members in left.items()]
    return out
