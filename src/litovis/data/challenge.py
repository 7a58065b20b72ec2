"""Reader for the 2025 multi-task challenge parquet (`task, input_type, input, question, output`).

Ids: the challenge has no id column, so a sample's id derives from the 0-based row index — on
test splits `"{row}"` is exactly the submission id. Train text_qa rows are nested (`question` a
Python list literal, `output` a dict literal whose `input_text` holds the answers) and explode to
one sample per (question, answer) with id `"{row}-{i}"` and `group = "{row}"` (the passage), so
caps and splits can keep a passage together. Literals are parsed with `ast.literal_eval` only.

Test text_qa rows stay ONE sample per row so the submission gets exactly one output per row: a
single question is rendered like training; several questions are put in `question` as a
numbered list and the sample asks for the `text_qa_multi` template (one answer per line, in
order). A plain (non-list) question string is accepted as a single question.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from litovis.data.drops import DropReport
from litovis.data.raw_records import (
    RowError,
    SourceError,
    is_missing,
    optional_text,
    require_columns,
    require_file,
    required_text,
)
from litovis.data.sample import Sample

CHALLENGE_TASKS = ("captioning", "vqa", "summarization", "text_qa", "math_reasoning")
MULTI_QUESTION_TEMPLATE = "text_qa_multi"
_COLUMNS = ("task", "input_type", "input", "question")
_LITERAL_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


def _literal(text: str, what: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except _LITERAL_ERRORS as err:
        raise RowError(f"bad {what} literal", f"{type(err).__name__}: {str(err)[:80]}") from None


def _strings(values: Any, what: str) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise RowError(f"bad {what} list", f"expected a list, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise RowError(f"bad {what} list", f"element {i} is {type(value).__name__}")
    return list(values)


def parse_questions(raw: Any) -> list[str]:
    """The questions of a text_qa cell: a list literal string, a list, or one plain question."""
    if is_missing(raw):
        raise RowError("missing question")
    if isinstance(raw, str):
        if not raw.strip():
            raise RowError("missing question")
        if not raw.lstrip().startswith(("[", "(")):
            return [raw.strip()]
        raw = _literal(raw, "question")
    elif hasattr(raw, "tolist"):  # numpy arrays from list columns
        raw = raw.tolist()
    questions = _strings(raw, "question")
    if not questions:
        raise RowError("no questions")
    return questions


def parse_answers(raw: Any) -> list[str]:
    """The answers of a text_qa `output` cell: a dict (or its literal) holding `input_text`."""
    if is_missing(raw):
        raise RowError("missing output")
    if isinstance(raw, str):
        raw = _literal(raw, "output")
    if not isinstance(raw, dict) or "input_text" not in raw:
        raise RowError("bad output dict", "expected a dict with an 'input_text' list")
    answers = raw["input_text"]
    if hasattr(answers, "tolist"):
        answers = answers.tolist()
    return _strings(answers, "answer")


def parse_text_qa(question: Any, output: Any) -> list[tuple[str, str]]:
    """(question, answer) pairs of one train text_qa row; `RowError` when malformed."""
    questions = parse_questions(question)
    answers = parse_answers(output)
    if len(questions) != len(answers):
        raise RowError(
            "question/answer count mismatch", f"{len(questions)} questions, {len(answers)} answers"
        )
    return list(zip(questions, answers, strict=True))


def _image_input(value: Any) -> str | bytes:
    """The image reference kept for fetching: URL/base64 string, raw bytes, or HF image struct."""
    if isinstance(value, dict):  # `datasets` Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") if value.get("bytes") else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise RowError("missing input")
        return bytes(value)
    if isinstance(value, str) and value.strip():
        return value
    if is_missing(value) or isinstance(value, str):
        raise RowError("missing input")
    raise RowError("bad image input", f"got {type(value).__name__}")


def _text_input(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):  # binary input columns hold text rows as UTF-8
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RowError("text input not UTF-8", str(err)) from None
    return required_text(value, "input")


def _row_samples(row: dict[str, Any], index: int, source: str, split: str) -> list[Sample]:
    """Samples of one raw row (several for an exploded text_qa row)."""
    task = required_text(row["task"], "task").strip()
    if task not in CHALLENGE_TASKS:
        raise RowError("unknown task", repr(task))
    input_type = required_text(row["input_type"], "input_type").strip()
    base = Sample(id=str(index), task=task, source=source)
    if input_type == "image":
        base.images = [_image_input(row["input"])]
    elif input_type == "text":
        base.fields["text"] = _text_input(row["input"])
    else:
        raise RowError("bad input_type", repr(input_type))

    if task == "text_qa":
        base.group = str(index)
        if split == "test":
            questions = [q.strip() for q in parse_questions(row["question"])]
            if not all(questions):
                raise RowError("empty question", f"questions: {questions!r:.120}")
            if len(questions) == 1:
                base.fields["question"] = questions[0]
            else:
                base.fields["question"] = "\n".join(
                    f"{i}. {q}" for i, q in enumerate(questions, 1)
                )
                base.fields["template"] = MULTI_QUESTION_TEMPLATE
            return [base]
        return [
            Sample(
                id=f"{index}-{i}",
                task=task,
                fields={**base.fields, "question": q.strip()},
                images=list(base.images),
                target=a.strip(),
                group=base.group,
                source=source,
            )
            for i, (q, a) in enumerate(parse_text_qa(row["question"], row.get("output")))
        ]

    question = optional_text(row["question"], "question")
    if question is not None:
        base.fields["question"] = question.strip()
    if split != "test":
        base.target = required_text(row.get("output"), "output").strip()
    return [base]


def read_challenge(
    path: str | Path, split: str, report: DropReport, stage: str = "read"
) -> list[Sample]:
    """Samples of a challenge parquet; malformed rows are dropped into `report` with reasons.

    Args:
        path: the parquet file.
        split: `train`/`val` (the `output` column is required) or `test` (`output` ignored).
        report: receives one keep/drop per candidate sample (an exploded text_qa row counts
            once per question; a row that cannot be parsed counts once).
        stage: stage name in `report`.
    """
    import pyarrow.parquet as pq

    path = require_file(path, "challenge parquet")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise SourceError(f"{path}: not a readable parquet file ({err})") from err
    names = parquet.schema_arrow.names
    require_columns(path, names, _COLUMNS + (("output",) if split != "test" else ()))
    columns = [c for c in (*_COLUMNS, "output") if c in names]
    samples: list[Sample] = []
    index = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            source = f"{path}:{index}"
            try:
                produced = _row_samples(row, index, source, split)
            except RowError as err:
                report.drop(stage, err.reason, source, err.detail)
            else:
                for sample in produced:
                    # Only text_qa can produce blank parts here: its list items are not checked
                    # by `required_text`.
                    if sample.fields.get("question") == "":
                        report.drop(stage, "empty question", source, f"sample {sample.id}")
                    elif sample.target == "":
                        report.drop(stage, "empty answer", source, f"sample {sample.id}")
                    else:
                        report.keep(stage)
                        samples.append(sample)
            index += 1
    return samples
