"""Shared reader pieces: cells, JSON records, image paths confined to a root."""

from __future__ import annotations

import json
import math
import os

import pytest

from litovis.data.raw_records import (
    ImageRoot,
    RowError,
    SourceError,
    is_missing,
    optional_text,
    read_json_records,
    require_columns,
    required_text,
    url_scheme,
)


def test_cells():
    assert is_missing(None) and is_missing(math.nan) and not is_missing("")
    assert optional_text("  ", "q") is None and optional_text(None, "q") is None
    assert optional_text("a", "q") == "a"
    with pytest.raises(RowError, match="q not a string"):
        optional_text(3, "q")
    with pytest.raises(RowError, match="missing answer"):
        required_text(math.nan, "answer")


def test_require_columns_names_file_missing_and_found(tmp_path):
    with pytest.raises(SourceError) as err:
        require_columns(tmp_path / "x.csv", ["ID", "question"], ["ID", "image_id", "answer"])
    message = str(err.value)
    assert "x.csv" in message and "['image_id', 'answer']" in message and "['ID', 'question']" in message


def test_json_records_jsonl_bad_line_and_json_list(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"a": 1}\n\n{broken\n{"a": 2}\n')
    records = list(read_json_records(jsonl))
    assert [i for i, _ in records] == [0, 1, 2]
    assert records[0][1] == {"a": 1} and records[2][1] == {"a": 2}
    assert isinstance(records[1][1], RowError) and records[1][1].reason == "bad json"
    listing = tmp_path / "b.json"
    listing.write_text(json.dumps([{"x": 1}, {"x": 2}]))
    assert list(read_json_records(listing)) == [(0, {"x": 1}), (1, {"x": 2})]
    listing.write_text('{"x": 1}')
    with pytest.raises(SourceError, match="expected a JSON list"):
        list(read_json_records(listing))
    listing.write_text("[{")
    with pytest.raises(SourceError, match="b.json: not valid JSON"):
        list(read_json_records(listing))


def test_url_scheme():
    assert url_scheme("https://x/y.jpg") == "https"
    assert url_scheme("FILE:///etc/passwd") == "file"
    assert url_scheme("images/a.jpg") is None
    assert url_scheme("iVBORw0KGgo=") is None


def test_image_root_resolves_inside_and_refuses_escapes(tmp_path):
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", root / "img" / "link.jpg")
    images = ImageRoot(root)
    assert images.resolve("img/a.jpg") == str(root / "img" / "a.jpg")
    assert images.resolve("http://h/x.jpg") == "http://h/x.jpg"
    for ref in ("../secret.jpg", "img/../../secret.jpg", str(tmp_path / "secret.jpg"), "img/link.jpg"):
        with pytest.raises(RowError) as err:
            images.resolve(ref)
        assert err.value.reason == "image outside root", ref
    assert ImageRoot(root, allow_outside=True).resolve("../secret.jpg") == str(root / "../secret.jpg")
    with pytest.raises(RowError, match="missing image"):
        images.resolve("img/nope.jpg")
    with pytest.raises(RowError, match="bad image scheme"):
        images.resolve("file:///etc/passwd")
    with pytest.raises(RowError, match="bad image reference"):
        images.resolve(7)


def test_a_hostile_jsonl_line_spoils_only_itself(tmp_path):
    jsonl = tmp_path / "hostile.jsonl"
    jsonl.write_bytes(
        b'\xef\xbb\xbf{"a": 0}\n'  # a byte-order mark before the first record
        b'\xff\xfe{"a": 1}\n'  # not UTF-8
        + b"[" * 100_000 + b"\n"  # nesting deep enough to exhaust the recursion limit
        + b'{"a": ' + b"9" * 5000 + b"}\n"  # an integer longer than Python converts
        + b"\x00\x00\n"
        + b'{"a": 5}\r\n'
    )
    records = list(read_json_records(jsonl))
    assert [i for i, _ in records] == [0, 1, 2, 3, 4, 5]
    assert records[0][1] == {"a": 0} and records[5][1] == {"a": 5}
    reasons = [r.reason for _, r in records[1:5]]
    assert reasons == ["bad encoding", "bad json", "bad json", "bad json"]


def test_a_hostile_json_list_is_one_clear_source_error(tmp_path):
    listing = tmp_path / "deep.json"
    listing.write_text("[" * 100_000)
    with pytest.raises(SourceError, match="deep.json: not valid JSON"):
        list(read_json_records(listing))
    listing.write_bytes(b"[\xff]")
    with pytest.raises(SourceError, match="deep.json: not valid JSON"):
        list(read_json_records(listing))


@pytest.mark.parametrize("ref", ["img/a\x00.jpg", "a" * 5000 + ".jpg", "a/" * 3000 + "x.jpg"])
def test_paths_the_filesystem_cannot_take_are_row_errors(tmp_path, ref):
    with pytest.raises(RowError) as err:
        ImageRoot(tmp_path).resolve(ref)
    assert err.value.reason == "bad image path"
