"""`DropReport`: what every data stage saw, kept and dropped, and why.

Every reader, the fetcher and every curation rule records each record it looks at with `keep` or
`drop`, so per stage `seen == kept + dropped` holds by construction; `check()` re-verifies it
(useful after `merge` or `from_dict`). Drops are counted per (stage, reason) and a bounded number
of examples per (stage, reason) keeps `source` (`file:row`) and a detail for the user to look at.
Reports merge (parallel sources, or successive stages) and round-trip through JSON.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DropExample:
    """One dropped record: where it came from and why it was dropped."""

    stage: str
    reason: str
    source: str
    detail: str = ""


@dataclass
class StageTally:
    """Counts of one stage: records seen, kept, and dropped per reason."""

    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


def _cell(text: str, width: int, left: bool) -> str:
    return text.ljust(width) if left else text.rjust(width)


class DropReport:
    """Seen/kept/dropped counts per stage, drop reasons, and example drops.

    Args:
        max_examples: examples kept per (stage, reason); None keeps every one (used where the
            caller must list every failure, e.g. test rows that may not be dropped).
    """

    def __init__(self, max_examples: int | None = 5) -> None:
        self.max_examples = max_examples
        self.stages: dict[str, StageTally] = {}
        self.examples: list[DropExample] = []

    def _tally(self, stage: str) -> StageTally:
        if stage not in self.stages:
            self.stages[stage] = StageTally()
        return self.stages[stage]

    def keep(self, stage: str, n: int = 1) -> None:
        """Record `n` records that `stage` looked at and kept."""
        tally = self._tally(stage)
        tally.seen += n
        tally.kept += n

    def drop(self, stage: str, reason: str, source: str, detail: str = "") -> None:
        """Record one record that `stage` looked at and dropped, with its `file:row` and why."""
        tally = self._tally(stage)
        tally.seen += 1
        tally.dropped[reason] += 1
        if self.max_examples is None or tally.dropped[reason] <= self.max_examples:
            self.examples.append(DropExample(stage, reason, source, detail))

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        """Dropped records per (stage, reason)."""
        return {(s, r): n for s, t in self.stages.items() for r, n in t.dropped.items()}

    @property
    def seen(self) -> int:
        """Records looked at, summed over stages."""
        return sum(t.seen for t in self.stages.values())

    @property
    def kept(self) -> int:
        """Records kept, summed over stages."""
        return sum(t.kept for t in self.stages.values())

    @property
    def dropped(self) -> int:
        """Records dropped, summed over stages."""
        return sum(t.total_dropped for t in self.stages.values())

    def check(self) -> None:
        """Raise `AssertionError` naming the stage where seen != kept + dropped."""
        for stage, tally in self.stages.items():
            if tally.seen != tally.kept + tally.total_dropped:
                raise AssertionError(
                    f"drop report stage {stage!r}: seen {tally.seen} != kept {tally.kept} "
                    f"+ dropped {tally.total_dropped}"
                )

    def merge(self, other: DropReport) -> DropReport:
        """Add `other`'s counts and examples into this report (in place) and return it."""
        for stage, theirs in other.stages.items():
            mine = self._tally(stage)
            mine.seen += theirs.seen
            mine.kept += theirs.kept
            mine.dropped.update(theirs.dropped)
        per_key = Counter((e.stage, e.reason) for e in self.examples)
        for example in other.examples:
            key = (example.stage, example.reason)
            if self.max_examples is None or per_key[key] < self.max_examples:
                per_key[key] += 1
                self.examples.append(example)
        return self

    @classmethod
    def combine(cls, reports: list[DropReport], max_examples: int | None = 5) -> DropReport:
        """A new report holding the sum of `reports`."""
        out = cls(max_examples=max_examples)
        for report in reports:
            out.merge(report)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (see `from_dict`)."""
        return {
            "seen": self.seen,
            "kept": self.kept,
            "dropped": self.dropped,
            "stages": {
                stage: {"seen": t.seen, "kept": t.kept, "dropped": dict(t.dropped)}
                for stage, t in self.stages.items()
            },
            "examples": [
                {"stage": e.stage, "reason": e.reason, "source": e.source, "detail": e.detail}
                for e in self.examples
            ],
            "max_examples": self.max_examples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DropReport:
        """Inverse of `to_dict`."""
        report = cls(max_examples=data.get("max_examples", 5))
        for stage, t in data.get("stages", {}).items():
            report.stages[stage] = StageTally(t["seen"], t["kept"], Counter(t["dropped"]))
        report.examples = [DropExample(**e) for e in data.get("examples", [])]
        return report

    def format_table(self) -> str:
        """A plain-text table: one line per stage, then one per (stage, reason), then examples."""
        rows = [("stage", "reason", "seen", "kept", "dropped")]
        for stage, t in self.stages.items():
            rows.append((stage, "", str(t.seen), str(t.kept), str(t.total_dropped)))
            for reason, n in sorted(t.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
                rows.append(("", reason, "", "", str(n)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(_cell(c, w, left=i < 2) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        if self.examples:
            lines.append("examples:")
            lines += [
                f"  [{e.stage}] {e.reason}: {e.source}" + (f" ({e.detail})" if e.detail else "")
                for e in self.examples
            ]
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.format_table()

    def __repr__(self) -> str:
        return f"DropReport(seen={self.seen}, kept={self.kept}, dropped={self.dropped})"
