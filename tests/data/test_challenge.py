"""Challenge parquet reader: ids, explosion of text_qa, malformed rows, test rows, fuzzing."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from litovis.data.challenge import parse_text_qa, read_challenge
from litovis.data.drops import DropReport
from litovis.data.raw_records import RowError, SourceError
from tests.data.tiny_inputs import image_bytes, write_parquet

PNG = image_bytes("PNG")
B64 = base64.b64encode(PNG).decode()


def _row(task, input_type, input, question=None, output=None):  # noqa: A002 - the column name
    return {"task": task, "input_type": input_type, "input": input, "question": question, "output": output}


GOOD = [
    _row("captioning", "image", "https://example.com/a.jpg", None, "The image shows a cat."),
    _row("vqa", "image", B64, "What is written?", "STOP"),
    _row("summarization", "text", "A BILL to do things.", None, "Things Act - Does things."),
    _row("text_qa", "text", "Ann has a dog named Rex.",
         "['What is the name of the dog?', 'Who has a dog?', 'What animal does Ann have?']",
         "{'input_text': ['Rex', 'Ann', 'a dog'], 'span_start': [1, 2, 3]}"),
    _row("math_reasoning", "text", "What is 2 + 3?", None, "2 + 3 = <<2+3=5>>5\n#### 5"),
]
BAD = [  # (row, reason)
    (_row("poetry", "text", "x", None, "y"), "unknown task"),
    (_row("captioning", "video", "x", None, "y"), "bad input_type"),
    (_row("captioning", "image", None, None, "y"), "missing input"),
    (_row("summarization", "text", "x", None, None), "missing output"),
    (_row("text_qa", "text", "p", "['a?', 'b?'", "{'input_text': ['1', '2']}"), "bad question literal"),
    (_row("text_qa", "text", "p", "['a?', 'b?']", "{'input_text': ['1']}"), "question/answer count mismatch"),
    (_row("text_qa", "text", "p", "['a?', 3]", "{'input_text': ['1', '2']}"), "bad question list"),
    (_row("text_qa", "text", "p", "['a?']", "['1']"), "bad output dict"),
    (_row("text_qa", "text", "p", "['a?']", "{'input_text': [None]}"), "bad answer list"),
    (_row("text_qa", "text", "p", "['a?']", "__import__('os').system('true')"), "bad output literal"),
]


def test_reads_every_task_with_row_ids(tmp_path):
    path = write_parquet(GOOD, tmp_path / "train.parquet")
    report = DropReport()
    samples = read_challenge(path, "train", report)
    assert [s.id for s in samples] == ["0", "1", "2", "3-0", "3-1", "3-2", "4"]
    cap, vqa, summ, qa0, qa1, qa2, math = samples
    assert cap.images == ["https://example.com/a.jpg"] and cap.fields == {} and cap.target == "The image shows a cat."
    assert vqa.images == [B64] and vqa.fields == {"question": "What is written?"}
    assert summ.fields == {"text": "A BILL to do things."} and summ.images == []
    assert [(s.fields["question"], s.target) for s in (qa0, qa1, qa2)] == [
        ("What is the name of the dog?", "Rex"), ("Who has a dog?", "Ann"), ("What animal does Ann have?", "a dog")]
    assert {s.group for s in (qa0, qa1, qa2)} == {"3"} and qa0.fields["text"] == "Ann has a dog named Rex."
    assert math.target.endswith("#### 5") and math.source == f"{path}:4"
    assert (report.seen, report.kept, report.dropped) == (7, 7, 0)


def test_malformed_rows_are_dropped_with_reasons(tmp_path):
    rows = GOOD + [row for row, _ in BAD]
    path = write_parquet(rows, tmp_path / "train.parquet")
    report = DropReport(max_examples=None)
    samples = read_challenge(path, "train", report)
    assert len(samples) == 7
    assert report.seen == len(samples) + report.dropped and report.dropped == len(BAD)
    reasons = {e.source: e.reason for e in report.examples}
    for offset, (_, reason) in enumerate(BAD):
        assert reasons[f"{path}:{len(GOOD) + offset}"] == reason


def test_blank_question_or_answer_in_text_qa_drops_only_that_pair(tmp_path):
    row = _row("text_qa", "text", "p", "['Who is there?', '  ', 'Why?']", "{'input_text': ['Ann', 'x', '']}")
    report = DropReport()
    samples = read_challenge(write_parquet([row], tmp_path / "t.parquet"), "train", report)
    assert [s.id for s in samples] == ["0-0"]
    assert report.counts == {("read", "empty question"): 1, ("read", "empty answer"): 1}


def test_bytes_input_column_and_image_structs(tmp_path):
    schema = pa.schema([("task", pa.string()), ("input_type", pa.string()), ("input", pa.binary()),
                        ("question", pa.string()), ("output", pa.string())])
    rows = [_row("vqa", "image", PNG, "Q?", "A"), _row("summarization", "text", b"Some bill", None, "S"),
            _row("summarization", "text", b"\xff\xfe", None, "S")]
    report = DropReport()
    samples = read_challenge(write_parquet(rows, tmp_path / "b.parquet", schema), "train", report)
    assert samples[0].images == [PNG] and samples[1].fields["text"] == "Some bill"
    assert report.counts == {("read", "text input not UTF-8"): 1}
    struct_rows = [_row("captioning", "image", {"bytes": PNG, "path": None}, None, "c"),
                   _row("captioning", "image", {"bytes": None, "path": "https://h/x.jpg"}, None, "c")]
    samples = read_challenge(write_parquet(struct_rows, tmp_path / "s.parquet"), "train", DropReport())
    assert [s.images for s in samples] == [[PNG], ["https://h/x.jpg"]]


def test_test_split_keeps_row_ids_and_one_sample_per_text_qa_row(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "output"} for r in GOOD]
    rows.append({"task": "text_qa", "input_type": "text", "input": "P", "question": "['Only one?']"})
    rows.append({"task": "text_qa", "input_type": "text", "input": "P", "question": "A plain question?"})
    samples = read_challenge(write_parquet(rows, tmp_path / "test.parquet"), "test", DropReport())
    assert [s.id for s in samples] == ["0", "1", "2", "3", "4", "5", "6"]
    assert all(s.target is None for s in samples)
    multi = samples[3]
    assert multi.fields["question"] == (
        "1. What is the name of the dog?\n2. Who has a dog?\n3. What animal does Ann have?")
    assert multi.fields["template"] == "text_qa_multi"
    assert samples[5].fields == {"text": "P", "question": "Only one?"}
    assert samples[6].fields["question"] == "A plain question?"
    blank = [{"task": "text_qa", "input_type": "text", "input": "P", "question": "['Why?', ' ']"}]
    report = DropReport()
    assert read_challenge(write_parquet(blank, tmp_path / "blank.parquet"), "test", report) == []
    assert report.counts == {("read", "empty question"): 1}


def test_missing_file_and_columns_raise_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="not found: .*nope.parquet"):
        read_challenge(tmp_path / "nope.parquet", "train", DropReport())
    path = write_parquet([{"task": "vqa", "input": "x", "question": "q"}], tmp_path / "cols.parquet")
    with pytest.raises(SourceError) as err:
        read_challenge(path, "train", DropReport())
    assert "cols.parquet" in str(err.value) and "input_type" in str(err.value) and "output" in str(err.value)
    assert "columns found: ['task', 'input', 'question']" in str(err.value)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="junk.parquet: not a readable parquet"):
        read_challenge(tmp_path / "junk.parquet", "train", DropReport())


def test_parse_text_qa_uses_literals_only():
    assert parse_text_qa("('a?', 'b?')", {"input_text": ["1", "2"]}) == [("a?", "1"), ("b?", "2")]
    with pytest.raises(RowError) as err:
        parse_text_qa("[__import__('os').getcwd()]", "{'input_text': ['x']}")
    assert err.value.reason == "bad question literal"


_literalish = st.one_of(
    st.text(max_size=40),
    st.builds(repr, st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=4)),
    st.builds(lambda xs: repr({"input_text": xs}), st.lists(st.text(max_size=8), max_size=4)),
    st.builds(lambda s: "[" * 3 + s, st.text(max_size=20)),
    st.sampled_from(["[", "{'input_text': }", "[[[[[[[[[[]]]]]]]]]]", "\x00", "([1,)", "{" * 300]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_literalish, _literalish), min_size=1, max_size=5))
def test_fuzz_text_qa_cells_never_raise_out_of_the_reader(cells):
    rows = [_row("text_qa", "text", "passage", q, o) for q, o in cells]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_parquet(rows, Path(tmp) / "f.parquet")
        report = DropReport(max_examples=None)
        samples = read_challenge(path, "train", report)
    report.check()
    assert report.kept == len(samples)
    for sample in samples:
        assert isinstance(sample.fields["question"], str) and sample.fields["question"]
        assert isinstance(sample.target, str) and sample.target
    # Every row is accounted for: it produced samples, drops with a reason, or both.
    accounted = {s.source for s in samples} | {e.source for e in report.examples if e.reason}
    assert accounted == {f"{path}:{i}" for i in range(len(rows))}
