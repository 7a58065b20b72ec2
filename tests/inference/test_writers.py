"""Submission writers: column layout and order, id completeness checks, exact CSV round trips, durable atomic writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from litovis.inference.writers import (
    SubmissionConfig,
    atomic_write_text,
    unique_by_id,
    write_challenge_csv,
    write_dacon_csv,
    write_jsonl,
    write_submissions,
)

TRICKY = [
    'He said "hi", then left',
    "line one\nline two\r\nline three\rend",
    "comma, comma,, and a trailing comma,",
    "unicode: 東京 café — 🚀 ½",
    "  leading and trailing spaces  ",
    '"fully quoted"',
    "#### 1234",
]


def record(i: str, answer: str, task: str = "vqa") -> dict[str, str]:
    raw = f" {answer}<|im_end|>"
    return {"id": i, "task": task, "prompt": f"q{i}", "raw": raw, "answer": answer}


def read_exact(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_challenge_csv_columns_order_and_answers(tmp_path: Path) -> None:
    # Ids arrive out of order (as ranks finish) and "10" must sort after "9", numerically.
    records = [record(str(i), TRICKY[i % len(TRICKY)]) for i in (10, 2, 0, 9, 1, 3, 4, 5, 6, 7, 8)]
    path = write_challenge_csv(records, tmp_path / "sub" / "submission.csv", n_rows=11)
    assert path.read_text(encoding="utf-8").startswith('id,output\n0,"')
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["id", "output"]
    assert frame["id"].tolist() == list(range(11))
    assert frame["output"].tolist() == [TRICKY[i % len(TRICKY)] for i in range(11)]


def test_challenge_csv_checks_ids(tmp_path: Path) -> None:
    path = tmp_path / "submission.csv"
    with pytest.raises(ValueError, match=r"missing 2: 1, 3; unexpected 1: 7"):
        write_challenge_csv([record("0", "a"), record("2", "b"), record("7", "c")], path, n_rows=4)
    with pytest.raises(ValueError, match="test row indices.*'TEST_001', '07'"):
        write_challenge_csv([record("TEST_001", "a"), record("07", "b")], path)
    with pytest.raises(ValueError, match="duplicate ids: '1'"):
        write_challenge_csv([record("1", "a"), record("1", "b")], path)
    assert not path.exists()


def test_challenge_csv_warns_about_pandas_na(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [record("0", "NA"), record("1", ""), record("2", "ok")]
    with caplog.at_level(logging.WARNING):
        path = write_challenge_csv(records, tmp_path / "s.csv")
    assert "2 answers (ids 0, 1)" in caplog.text
    assert read_exact(path)["output"].tolist() == ["NA", "", "ok"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(answers=st.lists(st.text(), min_size=1, max_size=6))
def test_challenge_csv_round_trips_any_text(tmp_path: Path, answers: list[str]) -> None:
    records = [record(str(i), a) for i, a in enumerate(answers)]
    path = write_challenge_csv(records, tmp_path / "any.csv", n_rows=len(answers))
    assert read_exact(path)["output"].tolist() == answers


def test_dacon_csv_follows_sample_submission(tmp_path: Path) -> None:
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("ID,answer\nTEST_000002,\nTEST_000000,\nTEST_000001,\n", encoding="utf-8")
    records = [record("TEST_000000", "no"), record("TEST_000001", 'a "red", car'),
               record("TEST_000002", "東京\nbeach")]
    path = write_dacon_csv(records, tmp_path / "dacon.csv", sample)
    frame = read_exact(path)
    assert list(frame.columns) == ["ID", "answer"]
    assert frame.values.tolist() == [
        ["TEST_000002", "東京\nbeach"], ["TEST_000000", "no"], ["TEST_000001", 'a "red", car']
    ]


def test_dacon_csv_missing_and_unknown_ids(tmp_path: Path) -> None:
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("ID,answer\nTEST_0,\nTEST_1,\nTEST_2,\n", encoding="utf-8")
    expected = r"missing 2: 'TEST_1', 'TEST_2'; not in the sample submission 1: 'X'"
    with pytest.raises(ValueError, match=expected):
        write_dacon_csv([record("TEST_0", "a"), record("X", "b")], tmp_path / "d.csv", sample)
    bad_sample = tmp_path / "bad.csv"
    bad_sample.write_text("id,answer\n0,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'ID' column"):
        write_dacon_csv([record("0", "a")], tmp_path / "d.csv", bad_sample)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = [record(str(i), a) for i, a in enumerate(TRICKY)]
    records[0]["extra"] = "not part of the contract"
    path = write_jsonl(records, tmp_path / "predictions.jsonl")
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(records) + 1
    loaded = [json.loads(line) for line in lines[:-1]]
    assert [list(r) for r in loaded] == [["id", "task", "prompt", "raw", "answer"]] * len(records)
    assert [r["answer"] for r in loaded] == TRICKY
    assert "東京" in lines[3]  # written as UTF-8, not \u escapes
    with pytest.raises(ValueError, match=r"record 0 lacks \['raw'\]"):
        write_jsonl([{"id": "1", "task": "t", "prompt": "p", "answer": "a"}], tmp_path / "x.jsonl")


def test_atomic_write_text_keeps_line_endings_and_writes_utf8(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "out.txt", "a\r\nb\rc\n東京")
    assert path.read_bytes() == "a\r\nb\rc\n東京".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind


def test_submissions_are_durable_the_directory_is_synced_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    import os
    import stat

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_challenge_csv([record("0", "a")], tmp_path / "s.csv", n_rows=1)
    write_jsonl([record("0", "a")], tmp_path / "p.jsonl")
    assert events == ["file", "replace", "dir"] * 2


def test_duplicate_ids_are_all_listed(tmp_path: Path) -> None:
    records = [record("1", "a"), record("2", "b"), record("1", "c"), record("2", "d"), record("1", "e")]
    with pytest.raises(ValueError, match=r"s\.csv: 3 duplicate ids: '1', '2', '1'"):
        write_challenge_csv(records, tmp_path / "s.csv")


def test_unique_by_id_keys_items_by_their_id_as_text() -> None:
    items = [{"id": 7, "x": 1}, {"id": "8", "x": 2}]
    assert unique_by_id(items, lambda r: r["id"], "rows") == {"7": items[0], "8": items[1]}
    with pytest.raises(ValueError, match=r"rows: 1 duplicate ids: '7'"):
        unique_by_id([*items, {"id": "7"}], lambda r: r["id"], "rows")


def test_write_submissions_writes_each_configured_file(tmp_path: Path) -> None:
    records = [record("0", "a"), record("1", "b")]
    config = SubmissionConfig(
        jsonl=str(tmp_path / "p.jsonl"), challenge_csv=str(tmp_path / "c.csv"), challenge_rows=2
    )
    written = write_submissions(records, config)
    assert written == [tmp_path / "p.jsonl", tmp_path / "c.csv"]
    assert read_exact(tmp_path / "c.csv")["output"].tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="dacon_sample_submission"):
        SubmissionConfig(dacon_csv="d.csv")
