"""Reader for the Dacon image VQA CSVs (`ID, image_id, question[, answer]` + `image/<split>/`).

Every cell is read as text (the `csv` module, no NA parsing), so answers such as "None" or "NA"
stay strings; a row that is not valid CSV or UTF-8 (wrong field count, over-long field, bad bytes)
is dropped with its reason instead of failing the whole file. `id` is the `ID` column (the submission key), task `dacon_vqa`, fields `{"question"}`,
`group` the image id (so a split keeps all questions about one image on one side).
A train row whose image file is missing is dropped with a reason; on a test split nothing may be
dropped, and `read_source` turns any drop into an error listing every affected ID.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from litovis.data.drops import DropReport
from litovis.data.raw_records import (
    ImageRoot,
    RowError,
    SourceError,
    require_columns,
    require_file,
    required_text,
)
from litovis.data.sample import Sample

DACON_TASK = "dacon_vqa"


def default_dacon_image_dir(csv_path: str | Path, split: str) -> Path:
    """`<folder of the CSV>/image/<train|test>`, the competition's layout (val reads train)."""
    return Path(csv_path).parent / "image" / ("test" if split == "test" else "train")


def read_dacon(
    path: str | Path,
    split: str,
    report: DropReport,
    image_dir: str | Path | None = None,
    allow_outside_root: bool = False,
    stage: str = "read",
) -> list[Sample]:
    """Samples of a Dacon VQA CSV; rows with a blank cell or missing image are dropped.

    Args:
        path: `train.csv` or `test.csv`.
        split: `train`/`val` (an `answer` column is required) or `test`.
        report: receives one keep/drop per row.
        image_dir: folder of `<image_id>.jpg`; default `default_dacon_image_dir(path, split)`.
            Image ids that resolve outside it are refused unless `allow_outside_root`.
        stage: stage name in `report`.
    """
    path = require_file(path, "Dacon CSV")
    with_answer = split != "test"
    columns = ["ID", "image_id", "question"] + (["answer"] if with_answer else [])
    root = ImageRoot(
        Path(image_dir) if image_dir is not None else default_dacon_image_dir(path, split),
        allow_outside=allow_outside_root,
    )
    samples: list[Sample] = []
    for index, values in _csv_rows(path, columns):
        source = f"{path}:{index}"
        if isinstance(values, RowError):
            report.drop(stage, values.reason, source, values.detail)
            continue
        row = dict(zip(columns, values, strict=True))
        try:
            image_id = required_text(row["image_id"], "image_id").strip()
            sample = Sample(
                id=required_text(row["ID"], "ID").strip(),
                task=DACON_TASK,
                fields={"question": required_text(row["question"], "question").strip()},
                images=[root.resolve(image_id + ".jpg")],
                target=required_text(row["answer"], "answer").strip() if with_answer else None,
                group=image_id,
                source=source,
            )
        except RowError as err:
            report.drop(stage, err.reason, source, f"ID {row['ID']!r}: {err.detail}")
            continue
        report.keep(stage)
        samples.append(sample)
    return samples


def _csv_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, list[str] | RowError]]:
    """(row index, the `columns` cells) per non-blank data row; a malformed row yields `RowError`.

    Raises `SourceError` when the header is unreadable or lacks a column.
    """
    # surrogateescape: a bad byte spoils only its own row (checked below), not the whole file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
            while not header:  # blank lines before the header
                header = next(reader)
        except (StopIteration, csv.Error) as err:
            raise SourceError(f"{path}: not a readable CSV (no header row: {err or 'empty file'})") from None
        require_columns(path, header, columns)
        positions = [header.index(c) for c in columns]
        index = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # e.g. a field over csv.field_size_limit()
                yield index, RowError("bad csv row", f"line {reader.line_num}: {err}")
                index += 1
                continue
            if not cells:
                continue  # blank line
            if len(cells) != len(header):
                yield index, RowError("bad csv row", f"line {reader.line_num}: {len(cells)} fields, header has {len(header)}")
            elif any(_has_bad_bytes(cell) for cell in cells):
                yield index, RowError("bad encoding", f"line {reader.line_num}: not UTF-8")
            else:
                yield index, [cells[i] for i in positions]
            index += 1


def _has_bad_bytes(cell: str) -> bool:
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes survive as lone surrogates
        return True
    return False
