"""Dacon VQA reader: ids, literal answers, image folder layout, missing images."""

from __future__ import annotations

import pytest

from litovis.data.dacon import read_dacon
from litovis.data.drops import DropReport
from litovis.data.raw_records import SourceError
from tests.data.tiny_inputs import image_bytes


def _dataset(tmp_path, missing=()):
    for split, ids in (("train", ("train_0", "train_1", "train_2")), ("test", ("test_0",))):
        (tmp_path / "image" / split).mkdir(parents=True)
        for image_id in ids:
            if image_id not in missing:
                (tmp_path / "image" / split / f"{image_id}.jpg").write_bytes(image_bytes("JPEG"))
    (tmp_path / "train.csv").write_text(
        "ID,image_id,question,answer\n"
        "TRAIN_0,train_0,Is it red?,yes\n"
        "TRAIN_1,train_0,What is shown?,None\n"
        "TRAIN_2,train_1,What color?,NA\n"
        "TRAIN_3,train_2,How many?,2\n"
        "TRAIN_4,train_1,,blue\n"
        "TRAIN_5,../train_0,Escape?,x\n"
    )
    (tmp_path / "test.csv").write_text("ID,image_id,question\nTEST_0,test_0,What is it?\nTEST_1,test_0,Color?\n")
    return tmp_path


def test_train_rows_keep_literal_answers_and_drop_bad_rows(tmp_path):
    root = _dataset(tmp_path, missing=("train_2",))
    report = DropReport(max_examples=None)
    samples = read_dacon(root / "train.csv", "train", report)
    assert [s.id for s in samples] == ["TRAIN_0", "TRAIN_1", "TRAIN_2"]
    assert [s.target for s in samples] == ["yes", "None", "NA"]
    assert samples[0].task == "dacon_vqa" and samples[0].fields == {"question": "Is it red?"}
    assert samples[0].images == [str(root / "image" / "train" / "train_0.jpg")]
    assert samples[0].group == "train_0" and samples[0].source == f"{root / 'train.csv'}:0"
    reasons = {e.source.rsplit(":", 1)[1]: e.reason for e in report.examples}
    assert reasons == {"3": "missing image", "4": "missing question", "5": "image outside root"}
    assert report.seen == 6 == len(samples) + report.dropped


def test_test_rows_have_no_target_and_use_the_test_folder(tmp_path):
    root = _dataset(tmp_path)
    samples = read_dacon(root / "test.csv", "test", DropReport())
    assert [(s.id, s.target) for s in samples] == [("TEST_0", None), ("TEST_1", None)]
    assert samples[0].images == [str(root / "image" / "test" / "test_0.jpg")]


def test_explicit_image_dir(tmp_path):
    root = _dataset(tmp_path)
    samples = read_dacon(root / "test.csv", "test", DropReport(), image_dir=root / "image" / "train")
    assert samples == []  # test_0.jpg is not in the train folder...
    report = DropReport()
    read_dacon(root / "test.csv", "test", report, image_dir=root / "image" / "train")
    assert report.counts == {("read", "missing image"): 2}  # ...and each row says so


def test_missing_columns_name_the_file(tmp_path):
    (tmp_path / "train.csv").write_text("ID,image_id,question\nA,b,c\n")
    with pytest.raises(SourceError, match=r"train.csv: missing required column\(s\) \['answer'\]"):
        read_dacon(tmp_path / "train.csv", "train", DropReport())
    with pytest.raises(SourceError, match="not found"):
        read_dacon(tmp_path / "absent.csv", "train", DropReport())


def test_malformed_csv_rows_are_dropped_and_the_rest_survive(tmp_path):
    (tmp_path / "image" / "train").mkdir(parents=True)
    (tmp_path / "image" / "train" / "a.jpg").write_bytes(image_bytes("JPEG"))
    (tmp_path / "train.csv").write_bytes(
        b"\xef\xbb\xbf\n"  # a byte-order mark and a blank line before the header
        b"ID,image_id,question,answer\n"
        b"T0,a,Is it red?,yes\n"
        b"T1,a,Too,many,fields\n"
        b"T2,a,Bad byte \xff here?,no\n"
        b'T3,a,"' + b"q" * 200_000 + b'",long\n'  # a field over csv.field_size_limit()
        b"T4,a\n"
        b"\n"
        b"T5,a\x00,NUL in the image id?,x\n"
        b"T6,a,Still read?,yes\n"
    )
    report = DropReport(max_examples=None)
    samples = read_dacon(tmp_path / "train.csv", "train", report)
    assert [s.id for s in samples] == ["T0", "T6"]
    reasons = {e.source.rsplit(":", 1)[1]: e.reason for e in report.examples}
    assert reasons == {"1": "bad csv row", "2": "bad encoding", "3": "bad csv row", "4": "bad csv row",
                       "5": "bad image path"}
    assert report.seen == 7 == len(samples) + report.dropped


def test_an_empty_csv_is_a_source_error(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"")
    with pytest.raises(SourceError, match="train.csv: not a readable CSV"):
        read_dacon(tmp_path / "train.csv", "train", DropReport())
