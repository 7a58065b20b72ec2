"""Crash-safe streaming storage of prediction records, and the Lightning writer that uses it.

Each rank appends its records as JSON lines to `part-{rank:05d}.jsonl` in one directory, with a
flush and an fsync per batch, so a killed run loses at most the batch in flight. A crash can
only damage the end of a file (a last line cut short): readers ignore it with a warning and the
rank's own store cuts it off before appending again. A damaged line anywhere else is corruption
and an error naming the file and line.

A rerun skips what is done: `PredictionStore.done_ids` (or `completed_ids`) lists the ids
already stored in any part of the directory, so the data layer can leave them out, even when the
rerun uses a different number of ranks. `merge` joins all parts into one list, each id once.

A prediction record is `{"id": str, "task": str, "prompt": str, "raw": str, "answer": str}`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from litovis.inference.writers import RECORD_KEYS, SubmissionConfig, format_ids, write_submissions

log = logging.getLogger(__name__)

PART_GLOB = "part-*.jsonl"


def part_path(directory: str | Path, rank: int) -> Path:
    """The file rank `rank` appends to."""
    return Path(directory) / f"part-{rank:05d}.jsonl"


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise TypeError(f"{where}: a prediction record must be a dict, got {type(record).__name__}")
    absent = [key for key in RECORD_KEYS if key not in record]
    if absent:
        raise ValueError(f"{where}: prediction record lacks {absent}: {dict(record)!r}")
    if not isinstance(record["id"], str):
        raise TypeError(f"{where}: record id must be a str, got {record['id']!r}")
    return dict(record)


def _read_part(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a part and the byte length they span.

    The last line counts only when it ends with a newline and parses; otherwise it is the
    remnant of a crash, left out (the caller warns). Any other bad line raises.
    """
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    offset = 0
    line_number = 0
    while offset < len(data):
        line_number += 1
        end = data.find(b"\n", offset)
        if end == -1:
            break
        try:
            record = json.loads(data[offset:end])
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            if end == len(data) - 1:
                break
            raise ValueError(f"{path}:{line_number}: corrupt prediction record: {error}") from None
        records.append(_check_record(record, f"{path}:{line_number}"))
        offset = end + 1
    return records, offset


def _read_parts(directory: Path, exclude: Path | None = None) -> list[tuple[Path, list[dict]]]:
    parts = []
    for path in sorted(directory.glob(PART_GLOB)):
        if path == exclude:
            continue
        records, valid_length = _read_part(path)
        if valid_length < path.stat().st_size:
            log.warning(
                "%s: ignoring an incomplete last line (%d bytes) left by an interrupted run",
                path, path.stat().st_size - valid_length,
            )
        parts.append((path, records))
    return parts


def completed_ids(directory: str | Path) -> set[str]:
    """Ids with a complete record in any part of `directory` (empty when there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return set()
    return {record["id"] for _, records in _read_parts(directory) for record in records}


class PredictionStore:
    """Append-only, crash-safe record storage for one rank.

    Construction reads the directory: the rank's own part is repaired (an incomplete last line
    is cut off, with a warning) and `done_ids` holds every id stored in any part. `append`
    writes records whose ids are not done yet and refuses (skips, with a warning) the others.
    One store per rank and directory at a time.
    """

    def __init__(self, directory: str | Path, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.path = part_path(self.directory, rank)
        self._done: set[str] = set()
        if self.path.exists():
            records, valid_length = _read_part(self.path)
            size = self.path.stat().st_size
            if valid_length < size:
                log.warning(
                    "%s: removing an incomplete last line (%d bytes) left by an interrupted run; "
                    "its sample will be predicted again",
                    self.path, size - valid_length,
                )
                os.truncate(self.path, valid_length)
            self._done.update(record["id"] for record in records)
        for _, records in _read_parts(self.directory, exclude=self.path):
            self._done.update(record["id"] for record in records)

    @property
    def done_ids(self) -> frozenset[str]:
        """Ids already stored in any part of the directory."""
        return frozenset(self._done)

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Durably append the records whose ids are new; returns how many were written."""
        lines = []
        refused = []
        for position, record in enumerate(records):
            record = _check_record(record, f"{self.path} (appending record {position})")
            if record["id"] in self._done:
                refused.append(record["id"])
                continue
            self._done.add(record["id"])
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if refused:
            log.warning(
                "%s: refusing %d records whose ids are already stored (%s); the data layer "
                "should skip PredictionStore.done_ids",
                self.path, len(refused), format_ids(refused),
            )
        if lines:
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write("".join(lines))
                stream.flush()
                os.fsync(stream.fileno())
        return len(lines)


def merge(directory: str | Path, expected_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """All records of all parts of `directory`, each id once.

    Parts are read in rank order and the first complete record of an id wins; identical
    duplicates (a rerun that did not skip the ids already stored writes them again) are dropped
    quietly, conflicting ones with a warning. With `expected_ids`, every expected id must be present and no other, and the
    result follows `expected_ids` order; otherwise it is in order of first appearance.
    """
    directory = Path(directory)
    parts = _read_parts(directory) if directory.is_dir() else []
    if not parts:
        raise FileNotFoundError(f"{directory}: no prediction parts ({PART_GLOB}) to merge")
    merged: dict[str, dict[str, Any]] = {}
    conflicting = []
    for _, records in parts:
        for record in records:
            first = merged.setdefault(record["id"], record)
            if first is not record and first != record:
                conflicting.append(record["id"])
    if conflicting:
        log.warning(
            "%s: %d ids have conflicting records in different parts; kept the first of each: %s",
            directory, len(conflicting), format_ids(conflicting),
        )
    if expected_ids is None:
        return list(merged.values())
    expected = list(dict.fromkeys(str(i) for i in expected_ids))
    missing = [i for i in expected if i not in merged]
    extra = sorted(set(merged) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{directory}: predictions do not match the expected ids: missing {len(missing)} "
            f"({format_ids(missing)}); unexpected {len(extra)} ({format_ids(extra)})"
        )
    return [merged[i] for i in expected]


class StreamingPredictionWriter(BasePredictionWriter):
    """Stream each predict batch's records to disk and write the submissions at the end.

    `predict_step` must return a list of prediction records. After every batch they are appended
    to the rank's `PredictionStore` in `output_dir`; when prediction ends (also when a rerun
    finds nothing left to predict), rank 0 waits for all ranks, merges the parts and writes the
    files named in `submission`. After a failed run nothing is merged or written.

    Args:
        output_dir: directory of the part files (reuse it to resume an interrupted run).
        write_interval: only `"batch"` (streaming) is supported.
        submission: the files to write from the merged records; none when None.
        expected_ids: when given, the merged records must hold exactly these ids.
    """

    def __init__(
        self,
        output_dir: str | Path,
        write_interval: str = "batch",
        submission: SubmissionConfig | None = None,
        expected_ids: Sequence[str] | None = None,
    ) -> None:
        if write_interval != "batch":
            raise ValueError(
                f"StreamingPredictionWriter writes after every batch; write_interval="
                f"{write_interval!r} is not supported (use 'batch')"
            )
        super().__init__(write_interval)
        self.output_dir = Path(output_dir)
        self.submission = submission
        self.expected_ids = expected_ids
        self.store: PredictionStore | None = None
        self.merged: list[dict[str, Any]] | None = None
        self._finished = True  # until `setup` starts a predict run

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "predict":
            self.store = PredictionStore(self.output_dir, trainer.global_rank)
            self.merged = None
            self._finished = False

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self.store is None:
            raise RuntimeError("StreamingPredictionWriter used outside a Trainer predict run")
        if not isinstance(prediction, (list, tuple)):
            raise TypeError(
                f"predict_step must return a list of prediction records for "
                f"StreamingPredictionWriter, got {type(prediction).__name__} (batch {batch_idx})"
            )
        self.store.append(prediction)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning skips the predict loop, and `on_predict_end`, when there is nothing left to
        # predict (a rerun after every id was stored); the submissions are still owed.
        if stage == "predict" and not self._finished:
            self._finish(trainer)

    def _finish(self, trainer: Any) -> None:
        self._finished = True
        trainer.strategy.barrier("litovis_predictions_stored")
        if not trainer.is_global_zero:
            return
        self.merged = merge(self.output_dir, self.expected_ids)
        log.info("merged %d prediction records from %s", len(self.merged), self.output_dir)
        if self.submission is not None:
            write_submissions(self.merged, self.submission)
