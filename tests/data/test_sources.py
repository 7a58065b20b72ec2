"""`SourceSpec` validation and `read_source`: dispatch, id prefixes, test rows never dropped."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from litovis.data.raw_records import SourceError
from litovis.data.sources import SourceSpec, TestRowsError, read_source
from tests.data.tiny_inputs import SAMPLE_DIR, write_parquet


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


# ------------------------------------------------------------------------------------------ fuzz
# Whatever a file holds, a reader drops bad rows with a reason and returns the rest: the only
# exceptions are a missing file/column (`SourceError`) and, on a test split, `TestRowsError`.

_KEYS = st.sampled_from(["messages", "role", "content", "images", "image", "query", "input", "response",
                         "output", "history", "system", "conversations", "from", "value", "id", "task", "path"])
_TEXTS = st.one_of(st.text(max_size=12), st.sampled_from(
    ["<image>", "<image>q", "user", "assistant", "system", "human", "gpt", "img.png", "../img.png",
     "http://127.0.0.1:9/x.jpg", "file:///etc/passwd", "a\x00.jpg", "x" * 300]))
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXTS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS | st.text(max_size=4), inner, max_size=5),
    max_leaves=16,
)
_TURN = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]), "content": _TEXTS})
_NEAR_VALID = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(_TURN, max_size=4)},
                          optional={"images": st.lists(_TEXTS, max_size=2), "id": _JSON, "task": _JSON}),
    st.fixed_dictionaries({"query": _TEXTS, "response": _TEXTS},
                          optional={"history": _JSON, "system": _JSON, "images": _JSON}),
    st.fixed_dictionaries({"conversations": st.lists(
        st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "bot"]), "value": _TEXTS}), max_size=4)},
        optional={"image": _JSON, "id": _JSON}),
)
_FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _read_all(fmt: str, path: Path, split: str, image_root: Path | None = None):
    spec = SourceSpec(format=fmt, path=str(path), split=split, image_root=str(image_root) if image_root else None)
    try:
        samples, report = read_source(spec)
    except TestRowsError:
        assert split == "test"
        return None
    report.check()
    assert report.kept == len(samples)
    for sample in samples:
        assert isinstance(sample.id, str) and sample.id and isinstance(sample.task, str) and sample.task
        assert all(isinstance(image, (str, bytes)) for image in sample.images)
    return samples, report


def _jsonl_lines(data: bytes) -> int:
    lines = data.split(b"\n")
    lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")
    return sum(1 for line in lines if line.strip())


@_FUZZ
@given(fmt=st.sampled_from(["messages", "query", "llava"]), split=st.sampled_from(["train", "test"]),
       lines=st.lists(st.one_of(_JSON.map(lambda v: json.dumps(v).encode()), _NEAR_VALID.map(lambda v: json.dumps(v).encode()),
                                st.binary(max_size=30)), min_size=1, max_size=6))
def test_fuzz_conversation_jsonl_never_raises(tmp_path_factory, fmt, split, lines):
    root = tmp_path_factory.mktemp("jsonl")
    (root / "img.png").write_bytes(b"not checked here")
    data = b"\n".join(lines) + b"\n"
    path = root / "f.jsonl"
    path.write_bytes(data)
    result = _read_all(fmt, path, split, image_root=root)
    if result is not None:
        assert result[1].seen == _jsonl_lines(data)


@_FUZZ
@given(fmt=st.sampled_from(["messages", "query", "llava"]), records=st.lists(st.one_of(_JSON, _NEAR_VALID), max_size=6))
def test_fuzz_conversation_json_lists_never_raise(tmp_path_factory, fmt, records):
    path = tmp_path_factory.mktemp("json") / "f.json"
    path.write_text(json.dumps(records))
    samples, report = _read_all(fmt, path, "train")
    assert report.seen == len(records)


_CELL = st.one_of(st.text(max_size=15), st.sampled_from(["", " ", "a", "../a", "a\x00", "x" * 2000, '"', "\r\n"]))


@_FUZZ
@given(rows=st.lists(st.lists(_CELL, min_size=4, max_size=4), max_size=6), junk=st.binary(max_size=60))
def test_fuzz_dacon_csv_never_raises(tmp_path_factory, rows, junk):
    root = tmp_path_factory.mktemp("dacon")
    (root / "image" / "train").mkdir(parents=True)
    (root / "image" / "train" / "a.jpg").write_bytes(b"not checked here")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["ID", "image_id", "question", "answer"])
    writer.writerows(rows)
    path = root / "train.csv"
    path.write_bytes(text.getvalue().encode())
    samples, report = _read_all("dacon_vqa", path, "train")
    assert report.seen == len(rows)
    path.write_bytes(text.getvalue().encode() + junk)  # plus arbitrary trailing bytes
    _read_all("dacon_vqa", path, "train")


def _column(kind: str, values: list):
    import pyarrow as pa

    if kind == "string":
        return pa.array([v if isinstance(v, str) else None for v in values], pa.string())
    if kind == "int":
        return pa.array([len(v) if isinstance(v, str) else None for v in values], pa.int64())
    if kind == "float":
        return pa.array([float("nan") if v == "" else None if not isinstance(v, str) else 1.5 for v in values], pa.float64())
    if kind == "binary":
        return pa.array([v.encode("utf-8", "surrogatepass") + b"\xff" if isinstance(v, str) else None for v in values], pa.binary())
    if kind == "list":
        return pa.array([[v, v] if isinstance(v, str) else None for v in values], pa.list_(pa.string()))
    return pa.array([{"bytes": None, "path": v} if isinstance(v, str) else None for v in values],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


_CHALLENGE_TEXT = st.one_of(st.none(), _TEXTS, st.sampled_from(
    ["captioning", "vqa", "summarization", "text_qa", "math_reasoning", "image", "text", "['q?']",
     "{'input_text': ['a']}", "['q1?', 'q2?']", "[__import__('os')]", "iVBORw0KGgo=", "data:image/png;base64,xx"]))


@_FUZZ
@given(split=st.sampled_from(["train", "test"]),
       kinds=st.lists(st.sampled_from(["string", "string", "int", "float", "binary", "list", "struct"]), min_size=5, max_size=5),
       rows=st.lists(st.lists(_CHALLENGE_TEXT, min_size=5, max_size=5), min_size=1, max_size=5))
def test_fuzz_challenge_parquet_of_any_column_types_never_raises(tmp_path_factory, split, kinds, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["task", "input_type", "input", "question", "output"]
    table = pa.table({name: _column(kind, [row[i] for row in rows]) for i, (name, kind) in enumerate(zip(names, kinds, strict=True))})
    path = tmp_path_factory.mktemp("challenge") / "f.parquet"
    pq.write_table(table, path)
    result = _read_all("challenge", path, split)
    if result is not None:
        samples, report = result
        rows_seen = {e.source for e in report.examples} | {s.source for s in samples}
        assert rows_seen == {f"{path}:{i}" for i in range(len(rows))}
