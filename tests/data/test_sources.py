"""`SourceSpec` validation and `read_source`: dispatch, id prefixes, test rows never dropped."""

from __future__ import annotations

import json

import pytest
from tiny_inputs import SAMPLE_DIR, write_parquet

from litovis.data.raw_records import SourceError
from litovis.data.sources import SourceSpec, TestRowsError, read_source


def test_spec_validation():
    with pytest.raises(SourceError, match="unknown source format 'csv'"):
        SourceSpec(format="csv", path="x")
    with pytest.raises(SourceError, match="unknown split 'dev'"):
        SourceSpec(format="llava", path="x", split="dev")
    with pytest.raises(SourceError, match="do not apply to the challenge"):
        SourceSpec(format="challenge", path="x", image_root="imgs")
    with pytest.raises(SourceError, match="submission ids"):
        SourceSpec(format="challenge", path="x", split="test", id_prefix="a-")


@pytest.mark.parametrize(
    "fmt, path, split, n",
    [("challenge", "challenge/train.parquet", "train", None), ("challenge", "challenge/test.parquet", "test", 20),
     ("dacon_vqa", "dacon/train.csv", "train", 30), ("dacon_vqa", "dacon/test.csv", "test", 8),
     ("messages", "chat/messages.jsonl", "train", 4), ("query", "chat/query.jsonl", "train", 2),
     ("llava", "chat/llava.json", "train", 2)],
)
def test_every_bundled_file_reads_cleanly(fmt, path, split, n):
    samples, report = read_source(SourceSpec(format=fmt, path=str(SAMPLE_DIR / path), split=split))
    assert report.dropped == 0 and report.kept == len(samples) > 0
    if n is not None:
        assert len(samples) == n
    assert all(s.source.startswith(str(SAMPLE_DIR / path) + ":") for s in samples)
    if split == "test":
        assert all(s.target is None for s in samples)
    else:  # the answer is the target, or the final assistant turn of a conversation
        assert all(s.target or s.messages[-1]["role"] == "assistant" for s in samples)


def test_id_prefix_and_stage_name(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    samples, report = read_source(SourceSpec(format="messages", path=str(path), id_prefix="m-"))
    assert [s.id for s in samples] == ["m-0"]
    assert list(report.stages) == ["read m.jsonl"]


def test_a_bad_test_row_is_an_error_listing_every_row(tmp_path):
    rows = [{"task": "vqa", "input_type": "image", "input": "https://h/x.jpg", "question": "q"},
            {"task": "nope", "input_type": "text", "input": "x", "question": None},
            {"task": "vqa", "input_type": "image", "input": None, "question": "q"}]
    path = write_parquet(rows, tmp_path / "test.parquet")
    with pytest.raises(TestRowsError) as err:
        read_source(SourceSpec(format="challenge", path=str(path), split="test"))
    message = str(err.value)
    assert "2 test row(s)" in message and f"{path}:1: unknown task" in message and f"{path}:2: missing input" in message


def test_missing_dacon_test_image_is_an_error_naming_the_ids(tmp_path):
    (tmp_path / "image" / "test").mkdir(parents=True)
    (tmp_path / "test.csv").write_text("ID,image_id,question\nTEST_0,t0,q\nTEST_1,t1,q\n")
    with pytest.raises(TestRowsError, match=r"(?s)TEST_0.*TEST_1"):
        read_source(SourceSpec(format="dacon_vqa", path=str(tmp_path / "test.csv"), split="test"))
