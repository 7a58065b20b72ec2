"""DropReport: per-stage invariant, bounded examples, merge, JSON round trip, table."""

from __future__ import annotations

import json

import pytest

from litovis.data.drops import DropReport


def _report() -> DropReport:
    report = DropReport(max_examples=2)
    report.keep("read", 5)
    for row in range(3):
        report.drop("read", "bad json", f"f.jsonl:{row}", "detail")
    report.drop("read", "missing image", "f.jsonl:9")
    report.keep("fetch", 4)
    report.drop("fetch", "http 404", "f.jsonl:4")
    return report


def test_counts_seen_kept_dropped():
    report = _report()
    assert report.counts == {("read", "bad json"): 3, ("read", "missing image"): 1, ("fetch", "http 404"): 1}
    assert report.stages["read"].seen == 9 and report.stages["read"].kept == 5
    assert (report.seen, report.kept, report.dropped) == (14, 9, 5)
    assert report.seen == report.kept + report.dropped
    report.check()


def test_examples_are_bounded_per_reason():
    report = _report()
    bad_json = [e for e in report.examples if e.reason == "bad json"]
    assert [e.source for e in bad_json] == ["f.jsonl:0", "f.jsonl:1"]
    assert len(report.examples) == 4
    unbounded = DropReport(max_examples=None)
    for row in range(50):
        unbounded.drop("read", "x", f"f:{row}")
    assert len(unbounded.examples) == 50


def test_check_detects_a_broken_invariant():
    report = _report()
    report.stages["fetch"].kept += 1
    with pytest.raises(AssertionError, match="fetch"):
        report.check()


def test_merge_sums_counts_and_keeps_the_example_bound():
    a, b = _report(), _report()
    a.merge(b)
    assert a.counts[("read", "bad json")] == 6
    assert a.stages["fetch"].seen == 10
    assert sum(e.reason == "bad json" for e in a.examples) == 2
    a.check()
    combined = DropReport.combine([_report(), _report(), _report()])
    assert combined.dropped == 15 and combined.kept == 27


def test_json_round_trip():
    report = _report()
    data = json.loads(json.dumps(report.to_dict()))
    again = DropReport.from_dict(data)
    assert again.counts == report.counts
    assert again.examples == report.examples
    assert (again.seen, again.kept) == (report.seen, report.kept)
    again.check()


def test_table_lists_stages_reasons_and_examples():
    text = _report().format_table()
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "reason", "seen", "kept", "dropped"]
    assert any(line.split()[:1] == ["read"] and line.split()[-3:] == ["9", "5", "4"] for line in lines)
    assert any("bad json" in line and line.split()[-1] == "3" for line in lines)
    assert "f.jsonl:9" in text
    assert str(_report()) == text
