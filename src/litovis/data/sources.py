"""`SourceSpec` and `read_source`: one typed description of a raw dataset, one dispatcher.

Formats: `challenge` (2025 challenge parquet), `dacon_vqa` (Dacon CSV + image folder),
`messages`, `query` and `llava` (conversation JSON/JSONL). Each reader yields `Sample`s and
reports every malformed record into a `DropReport`; a missing file or column raises
`SourceError`. Test rows are never dropped: on a `test` split any drop becomes a
`TestRowsError` listing every affected row, because a submission needs one output per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from litovis.data.challenge import read_challenge
from litovis.data.conversations import (
    llava_record,
    messages_record,
    query_record,
    read_conversations,
)
from litovis.data.dacon import read_dacon
from litovis.data.drops import DropReport
from litovis.data.raw_records import SPLITS, SourceError
from litovis.data.sample import Sample

FORMATS = ("challenge", "dacon_vqa", "messages", "query", "llava")
_CONVERTERS = {"messages": messages_record, "query": query_record, "llava": llava_record}


class TestRowsError(SourceError):
    """Rows of a test split could not be read or fetched; lists every one of them."""

    __test__ = False  # not a pytest test class despite the name


@dataclass
class SourceSpec:
    """One raw dataset to read.

    Attributes:
        format: `challenge`, `dacon_vqa`, `messages`, `query` or `llava`.
        path: the file: challenge parquet, Dacon `train.csv`/`test.csv`, or JSON/JSONL.
        split: `train` (curated, then split into train/val), `val` (used as given for
            validation) or `test` (never curated or dropped; order preserved).
        image_root: folder that relative image paths are relative to. Default: the file's folder;
            Dacon: `<folder>/image/<train|test>`. Not used by `challenge` (images are inline).
        allow_outside_root: accept image files that resolve outside `image_root`.
        id_prefix: prepended to every sample id, to keep ids unique when several sources are
            mixed; not allowed on test splits, whose ids are the submission ids.
    """

    format: str
    path: str
    split: str = "train"
    image_root: str | None = None
    allow_outside_root: bool = False
    id_prefix: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SourceError(
                f"{self.path}: unknown source format {self.format!r}; one of {FORMATS}"
            )
        if self.split not in SPLITS:
            raise SourceError(f"{self.path}: unknown split {self.split!r}; one of {SPLITS}")
        if self.format == "challenge" and (self.image_root is not None or self.allow_outside_root):
            raise SourceError(
                f"{self.path}: image_root/allow_outside_root do not apply to the challenge "
                "format (its images are inline URLs, bytes or base64)"
            )
        if self.split == "test" and self.id_prefix:
            raise SourceError(
                f"{self.path}: id_prefix would change the submission ids of a test split"
            )

    @property
    def stage(self) -> str:
        """Stage name of this source's reading in drop reports."""
        return f"read {Path(self.path).name}"


def read_source(spec: SourceSpec) -> tuple[list[Sample], DropReport]:
    """Read one source: (samples in file order, drop report of the reading stage).

    Raises:
        SourceError: the file or a required column is missing, or the container is unreadable.
        TestRowsError: a test split had rows that would have been dropped.
    """
    test = spec.split == "test"
    report = DropReport(max_examples=None if test else 5)
    if spec.format == "challenge":
        read = partial(read_challenge, spec.path)
    elif spec.format == "dacon_vqa":
        read = partial(
            read_dacon,
            spec.path,
            image_dir=spec.image_root,
            allow_outside_root=spec.allow_outside_root,
        )
    else:
        read = partial(
            read_conversations,
            spec.path,
            convert=_CONVERTERS[spec.format],
            image_root=spec.image_root,
            allow_outside_root=spec.allow_outside_root,
        )
    samples = read(split=spec.split, report=report, stage=spec.stage)
    if test and report.dropped:
        listing = "\n".join(
            f"  {e.source}: {e.reason} {e.detail}".rstrip() for e in report.examples
        )
        raise TestRowsError(
            f"{spec.path}: {report.dropped} test row(s) cannot be used, and test rows are never "
            f"dropped (the submission needs every row):\n{listing}"
        )
    if spec.id_prefix:
        for sample in samples:
            sample.id = spec.id_prefix + sample.id
    return samples, report
