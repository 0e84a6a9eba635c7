"""``l7proxy policy suggest``, the whole pipeline: select, draft, replay, write.

The suggestion is written twice: once to be loaded and replayed, and once more
with what the replay counted in its comments. Nothing here reads files or the
clock; the command line passes records in and prints what comes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from l7proxy.policy.model import EGRESS, INGRESS
from l7proxy.policy.suggest.check import Replay, enforced, replay
from l7proxy.policy.suggest.draft import Limits, PolicyDraft, draft_policies
from l7proxy.policy.suggest.observed import Selection, SkippedCount, select
from l7proxy.policy.suggest.render import (
    Counts,
    describe_peers,
    plural,
    render,
    rule_path,
    section_path,
)

MAX_DENIALS_SHOWN = 20
EVERYTHING_LET_THROUGH = Selection()
DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Suggestion:
    yaml: str
    report: str
    ok: bool  # every observation allowed by the suggestion, enforced
    policies: int
    observations: int


def suggest(
    records: Iterable[Mapping[str, Any]],
    selection: Selection = EVERYTHING_LET_THROUGH,
    limits: Limits = DEFAULT_LIMITS,
    *,
    name_prefix: str = "suggested",
    audit: bool = False,
    source: str = "the flow log",
) -> Suggestion:
    """Raises ``SuggestError`` when the data cannot be written within ``limits``."""
    skipped = SkippedCount()
    counted = _Counting(records)
    observed = select(counted, selection, skipped)
    total = sum(observed.values())
    drafts = draft_policies(observed, limits, name_prefix)
    first = render(drafts, audit=audit)
    result = replay(enforced(first), observed)
    counts = {
        name: Counts(dict(result.alone.get(name, {})), dict(result.jointly.get(name, {})))
        for name in {d.name for d in drafts}
    }
    verdict = (
        f"all {total:,} allowed" if result.ok else f"{result.denied:,} of {total:,} NOT allowed"
    )
    header = [
        f"Suggested by `l7proxy policy suggest` from {source}: "
        f"{plural(total, 'observed request')} "
        f"({', '.join(sorted(selection.verdicts))}).",
        f"Replayed through the policy engine, enforced: {verdict}.",
        "Review before importing: every rule allows what was seen, and nothing else was seen.",
    ]
    text = render(drafts, counts=counts, header=header, audit=audit)
    enforced(text)  # what is printed loads, as the replayed text did
    report = _report(counted.count, total, skipped, drafts, result, counts)
    return Suggestion(text, report, result.ok, len(drafts), total)


class _Counting:
    """Iterates over records, counting them."""

    def __init__(self, records: Iterable[Mapping[str, Any]]):
        self.records = records
        self.count = 0

    def __iter__(self) -> Any:
        for record in self.records:
            self.count += 1
            yield record


def _report(
    read: int,
    used: int,
    skipped: SkippedCount,
    drafts: list[PolicyDraft],
    result: Replay,
    counts: dict[str, Counts],
) -> str:
    lines = [f"flow records read: {read:,}; observations used: {used:,}"]
    if skipped:
        parts = ", ".join(f"{n:,} {why}" for why, n in sorted(skipped.items()))
        lines.append(f"left out: {parts}")
    state = "every observed request allowed" if result.ok else "SOME OBSERVED REQUESTS DENIED"
    lines.append(
        f"replayed through the policy engine, enforced: {result.allowed:,} of {used:,} "
        f"allowed ({state})"
    )
    for draft in drafts:
        lines.append(f"policy {draft.name} (endpoint {draft.target.name}):")
        rows = _rows(draft, counts[draft.name])
        width = max((len(r[0]) for r in rows), default=0)
        lines += [f"  {what:<{width}}  {n}" for what, n in rows]
    if result.denials:
        lines.append(f"denied ({result.denied:,}):")
        for denial in result.denials[:MAX_DENIALS_SHOWN]:
            obs = denial.observation
            what = obs.request.describe() if obs.request else f"{obs.transport} connection"
            times = f" (x{denial.count:,})" if denial.count > 1 else ""
            lines.append(f"  {what} to {obs.target.name}:{obs.port}{times}: {denial.reason}")
            lines += [f"    {line}" for line in denial.trace]
        if len(result.denials) > MAX_DENIALS_SHOWN:
            lines.append(f"  ... and {len(result.denials) - MAX_DENIALS_SHOWN:,} more")
    return "\n".join(lines)


def _rows(draft: PolicyDraft, counts: Counts) -> list[tuple[str, str]]:
    rows = []
    for direction in (INGRESS, EGRESS):
        way = "from" if direction == INGRESS else "to"
        for i, rule in enumerate(draft.section(direction)):
            peers = describe_peers(rule.peers)
            l4 = counts.alone.get(section_path(direction, i), 0)
            if l4:
                rows.append((f"{direction} {way} {peers} L3/L4 only", f"{l4:,}"))
            for j, port in enumerate(rule.ports):
                where = f"{direction} {way} {peers} port {port.port}/{port.transport}"
                if port.server_names:
                    path = rule_path(direction, i, j, "serverNames")
                    names = " ".join(port.server_names)
                    rows.append((f"{where} serverNames {names}", _n(counts, path)))
                for kind, rules in (
                    ("http", port.http),
                    ("grpc", port.grpc),
                    ("kafka", port.kafka),
                    ("cassandra", port.cassandra),
                ):
                    for k, rule_draft in enumerate(rules):
                        fields = " ".join(
                            v if kind == "http" else f"{key}={v}" for key, v in rule_draft.fields
                        )
                        path = rule_path(direction, i, j, kind, k)
                        rows.append((f"{where} {kind} {fields}", _n(counts, path)))
    return rows


def _n(counts: Counts, path: str) -> str:
    alone, jointly = counts.alone.get(path, 0), counts.jointly.get(path, 0)
    return f"{alone:,}" + (f" (+{jointly:,} jointly)" if jointly else "")
