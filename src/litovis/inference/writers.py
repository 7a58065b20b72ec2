"""Submission files from prediction records: the challenge CSV, the Dacon CSV, and JSONL.

A prediction record is `{"id", "task", "prompt", "raw", "answer"}` (see `prediction_store`);
submissions carry the cleaned `answer`. Every writer checks completeness before writing (each
expected id exactly once, no stranger ids) and writes atomically and durably: the file is written
to a temporary sibling, synced, renamed over the target, and the directory synced
(`litovis.atomic_files`), so a crash never leaves half a file.

CSV text fields are always quoted (so quotes, commas, any line breaks and unicode are safe;
integer ids and the header are plain) and round-trip exactly through
`pandas.read_csv(path, dtype=str, keep_default_na=False)`. With pandas' defaults an empty answer
or one like `NA`/`None`/`null` reads back as NaN; the writers warn when a file holds such answers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from litovis.atomic_files import atomic_write_bytes

log = logging.getLogger(__name__)

RECORD_KEYS = ("id", "task", "prompt", "raw", "answer")
# Strings pandas.read_csv turns into NaN by default (pandas' STR_NA_VALUES, plus the empty string).
_PANDAS_NA_STRINGS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)
_SHOWN_IDS = 10
T = TypeVar("T")


def format_ids(ids: Iterable[Any], limit: int = _SHOWN_IDS) -> str:
    """A short, readable list of ids for error messages: the first `limit`, then a count."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8, line endings as given) to `path` atomically and durably
    (`litovis.atomic_files.atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def unique_by_id(items: Iterable[T], key: Callable[[T], Any], what: str) -> dict[str, T]:
    """`items` by `str(key(item))`; a `ValueError` naming `what` lists the duplicate ids, if any."""
    by_id: dict[str, T] = {}
    duplicates = []
    for item in items:
        identifier = str(key(item))
        if identifier in by_id:
            duplicates.append(identifier)
        by_id.setdefault(identifier, item)
    if duplicates:
        raise ValueError(f"{what}: {len(duplicates)} duplicate ids: {format_ids(duplicates)}")
    return by_id


def _answers_by_id(records: Iterable[Mapping[str, Any]], what: str) -> dict[str, str]:
    records = list(records)
    for position, record in enumerate(records):
        if "id" not in record or "answer" not in record:
            raise ValueError(f"{what}: record {position} lacks 'id' or 'answer': {dict(record)!r}")
    return {key: str(record["answer"]) for key, record in unique_by_id(records, lambda r: r["id"], what).items()}


def _warn_pandas_na(ids_and_answers: Sequence[tuple[Any, str]], path: Path) -> None:
    risky = [i for i, answer in ids_and_answers if answer in _PANDAS_NA_STRINGS]
    if risky:
        log.warning(
            "%s: %d answers (ids %s) are read back as NaN by pandas.read_csv defaults "
            "(empty or NA-like text); read with keep_default_na=False to keep them",
            path, len(risky), format_ids(risky),
        )


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    # Every text field is quoted: the csv module's minimal quoting leaves a lone "\r" bare,
    # which readers take for a line break. The header stays plain (`id,output`).
    buffer = io.StringIO()
    buffer.write(",".join(header) + "\n")
    csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_challenge_csv(
    records: Iterable[Mapping[str, Any]], path: str | Path, n_rows: int | None = None
) -> Path:
    """Write the challenge submission: columns `id,output`, ids as integers in ascending order
    (the test rows' order), `output` = the record's cleaned `answer`.

    Args:
        records: prediction records; ids must be integer strings (the test row index).
        path: the CSV to write.
        n_rows: when given, the ids must be exactly `0 .. n_rows - 1`.
    """
    path = Path(path)
    answers = _answers_by_id(records, str(path))
    # Only canonical spellings ("7", not "07" or " 7"), so two records never map to one row.
    not_rows = [k for k in answers if not (k.isascii() and k.isdigit() and str(int(k)) == k)]
    if not_rows:
        raise ValueError(
            f"{path}: challenge ids must be test row indices (0, 1, 2, ...); "
            f"{len(not_rows)} are not: {format_ids(not_rows)}"
        )
    by_row = {int(key): answer for key, answer in answers.items()}
    if n_rows is not None:
        missing = [i for i in range(n_rows) if i not in by_row]
        extra = sorted(i for i in by_row if not 0 <= i < n_rows)
        if missing or extra:
            raise ValueError(
                f"{path}: expected ids 0..{n_rows - 1}; missing {len(missing)}: "
                f"{format_ids(missing)}; unexpected {len(extra)}: {format_ids(extra)}"
            )
    rows = sorted(by_row.items())
    _warn_pandas_na(rows, path)
    return atomic_write_text(path, _csv_text(("id", "output"), rows))


def write_dacon_csv(
    records: Iterable[Mapping[str, Any]], path: str | Path, sample_submission_path: str | Path
) -> Path:
    """Write the Dacon submission: columns `ID,answer` in `sample_submission.csv` order, every ID
    of the sample submission answered and no other."""
    path = Path(path)
    sample_path = Path(sample_submission_path)
    import pandas as pd

    sample = pd.read_csv(sample_path, dtype=str, keep_default_na=False)
    if "ID" not in sample.columns:
        raise ValueError(f"{sample_path}: no 'ID' column (columns: {list(sample.columns)})")
    order = sample["ID"].tolist()
    answers = _answers_by_id(records, str(path))
    missing = [i for i in order if i not in answers]
    extra = sorted(set(answers) - set(order))
    if missing or extra:
        raise ValueError(
            f"{path}: predictions must cover {sample_path} exactly; missing {len(missing)}: "
            f"{format_ids(missing)}; not in the sample submission {len(extra)}: {format_ids(extra)}"
        )
    rows = [(i, answers[i]) for i in order]
    _warn_pandas_na(rows, path)
    return atomic_write_text(path, _csv_text(("ID", "answer"), rows))


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per record (keys `id, task, prompt, raw, answer`, in that order)."""
    path = Path(path)
    lines = []
    for position, record in enumerate(records):
        absent = [key for key in RECORD_KEYS if key not in record]
        if absent:
            raise ValueError(f"{path}: record {position} lacks {absent}: {dict(record)!r}")
        lines.append(json.dumps({key: record[key] for key in RECORD_KEYS}, ensure_ascii=False))
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


@dataclass
class SubmissionConfig:
    """Which files to write once predictions are complete; unset paths are skipped.

    Attributes:
        jsonl: all records (id, task, prompt, raw, answer) as JSON lines.
        challenge_csv: the challenge submission `id,output`.
        challenge_rows: expected number of challenge test rows (2,493 for the 2025 test set);
            when set, the CSV must hold exactly ids 0..challenge_rows-1.
        dacon_csv: the Dacon submission `ID,answer`; needs `dacon_sample_submission`.
        dacon_sample_submission: the competition's `sample_submission.csv` (row order and IDs).
    """

    jsonl: str | None = None
    challenge_csv: str | None = None
    challenge_rows: int | None = None
    dacon_csv: str | None = None
    dacon_sample_submission: str | None = None

    def __post_init__(self) -> None:
        if self.dacon_csv and not self.dacon_sample_submission:
            raise ValueError("dacon_csv needs dacon_sample_submission (the row order and IDs)")
        if self.challenge_rows is not None and not self.challenge_csv:
            raise ValueError("challenge_rows is set but challenge_csv is not")


def write_submissions(records: Sequence[Mapping[str, Any]], config: SubmissionConfig) -> list[Path]:
    """Write every file `config` names; returns the paths written."""
    written = []
    if config.jsonl:
        written.append(write_jsonl(records, config.jsonl))
    if config.challenge_csv:
        written.append(write_challenge_csv(records, config.challenge_csv, config.challenge_rows))
    if config.dacon_csv and config.dacon_sample_submission:
        written.append(write_dacon_csv(records, config.dacon_csv, config.dacon_sample_submission))
    for path in written:
        log.info("wrote %s (%d records)", path, len(records))
    return written
