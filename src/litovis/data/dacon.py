"""Reader for the Dacon image VQA CSVs (`ID, image_id, question[, answer]` + `image/<split>/`).

Every cell is read as text with pandas' NA parsing off, so answers such as "None" or "NA" stay
strings. `id` is the `ID` column (the submission key), task `dacon_vqa`, fields `{"question"}`,
`group` the image id (so a split keeps all questions about one image on one side).
A train row whose image file is missing is dropped with a reason; on a test split nothing may be
dropped, and `read_source` turns any drop into an error listing every affected ID.
"""

from __future__ import annotations

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
    import pandas as pd

    path = require_file(path, "Dacon CSV")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: not a readable CSV ({err})") from err
    with_answer = split != "test"
    require_columns(
        path, frame.columns, ("ID", "image_id", "question") + (("answer",) if with_answer else ())
    )
    root = ImageRoot(
        Path(image_dir) if image_dir is not None else default_dacon_image_dir(path, split),
        allow_outside=allow_outside_root,
    )
    columns = ["ID", "image_id", "question"] + (["answer"] if with_answer else [])
    samples: list[Sample] = []
    for index, values in enumerate(frame[columns].itertuples(index=False, name=None)):
        source = f"{path}:{index}"
        row = dict(zip(columns, values))
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
