"""Prediction parts: append and reopen, crash remnants vs corruption, duplicates, merge, and reruns that skip finished ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from litovis.inference.postprocess import clean_answer
from litovis.inference.prediction_store import (
    PredictionStore,
    StreamingPredictionWriter,
    completed_ids,
    merge,
    part_path,
)
from litovis.inference.writers import SubmissionConfig


def record(i: str, answer: str = "") -> dict[str, str]:
    text = answer or f"a{i}"
    return {"id": i, "task": "vqa", "prompt": f"q{i}", "raw": text, "answer": text}


def test_append_and_reopen(tmp_path: Path) -> None:
    store = PredictionStore(tmp_path, rank=3)
    assert store.path == tmp_path / "part-00003.jsonl"
    assert store.done_ids == frozenset()
    assert store.append([record("0"), record("1", "東京, \"x\"\nline")]) == 2
    assert store.append([record("2")]) == 1
    lines = store.path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["0", "1", "2"]
    reopened = PredictionStore(tmp_path, rank=3)
    assert reopened.done_ids == {"0", "1", "2"}


def test_truncated_last_line_is_cut_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    PredictionStore(tmp_path, 0).append([record("0"), record("1")])
    path = part_path(tmp_path, 0)
    intact = path.read_bytes()
    # A crash mid-write: half of the next record, no newline.
    path.write_bytes(intact + json.dumps(record("2")).encode()[:25])
    assert completed_ids(tmp_path) == {"0", "1"}  # readers ignore the remnant, file untouched
    assert path.read_bytes() != intact
    with caplog.at_level(logging.WARNING):
        store = PredictionStore(tmp_path, 0)
    assert "incomplete last line" in caplog.text
    assert path.read_bytes() == intact
    assert store.done_ids == {"0", "1"}
    store.append([record("2")])
    assert [r["id"] for r in merge(tmp_path)] == ["0", "1", "2"]


def test_unparseable_newline_terminated_last_line_is_a_crash_remnant(tmp_path: Path) -> None:
    PredictionStore(tmp_path, 0).append([record("0")])
    path = part_path(tmp_path, 0)
    path.write_bytes(path.read_bytes() + b'{"id": "1", "ta\x00\x00\n')
    assert PredictionStore(tmp_path, 0).done_ids == {"0"}
    assert path.read_bytes().count(b"\n") == 1


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    path = part_path(tmp_path, 0)
    path.write_text(json.dumps(record("0")) + "\nnot json\n" + json.dumps(record("1")) + "\n")
    with pytest.raises(ValueError, match=r"part-00000.jsonl:2: corrupt prediction record"):
        PredictionStore(tmp_path, 0)
    path.write_text(json.dumps({"id": "0"}) + "\n")
    with pytest.raises(ValueError, match=r"part-00000.jsonl:1: prediction record lacks \['task'"):
        merge(tmp_path)


def test_store_refuses_duplicates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    PredictionStore(tmp_path, 1).append([record("7")])
    store = PredictionStore(tmp_path, 0)
    assert store.done_ids == {"7"}  # ids of other ranks' parts count as done too
    with caplog.at_level(logging.WARNING):
        written = store.append([record("7"), record("8"), record("8", "other")])
    assert written == 1
    assert "refusing 2 records" in caplog.text
    with pytest.raises(TypeError, match="id must be a str"):
        store.append([{**record("9"), "id": 9}])


def write_part(directory: Path, rank: int, records: list[dict[str, str]]) -> None:
    part_path(directory, rank).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_merge_dedups_and_checks_expected_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Written directly: the stores themselves never produce cross-part duplicates.
    write_part(tmp_path, 0, [record("b"), record("a")])
    write_part(tmp_path, 1, [record("a"), record("b", "changed"), record("c")])
    with caplog.at_level(logging.WARNING):
        merged = merge(tmp_path)
    assert [(r["id"], r["answer"]) for r in merged] == [("b", "ab"), ("a", "aa"), ("c", "ac")]
    assert "1 ids have conflicting records" in caplog.text and "'b'" in caplog.text
    assert [r["id"] for r in merge(tmp_path, expected_ids=["c", "a", "b"])] == ["c", "a", "b"]
    with pytest.raises(ValueError, match=r"missing 2 \('d', 'e'\); unexpected 1 \('c'\)"):
        merge(tmp_path, expected_ids=["a", "b", "d", "e"])
    many = [str(i) for i in range(100)]
    with pytest.raises(ValueError, match=r"missing 100 \('0', .*'9', \.\.\. \(90 more\)\)"):
        merge(tmp_path, expected_ids=many + ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="no prediction parts"):
        merge(tmp_path / "empty")


# --- A real Lightning predict loop on CPU -------------------------------------------------------

N_SAMPLES = 10


class FakeGenerator(pl.LightningModule):
    """Returns one record per sample; raises when it reaches `crash_at` (a killed run)."""

    def __init__(self, crash_at: str | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.crash_at = crash_at

    def predict_step(self, batch: list[dict[str, str]], batch_idx: int) -> list[dict[str, str]]:
        records = []
        for sample in batch:
            if sample["id"] == self.crash_at:
                raise RuntimeError("killed")
            raw = f"\n The answer is {int(sample['id']) * 3}.<|im_end|>"
            records.append({**sample, "raw": raw, "answer": clean_answer(raw, sample["task"])})
        return records


def samples(skip: set[str] | frozenset[str] = frozenset()) -> list[dict[str, str]]:
    every = [{"id": str(i), "task": "math_reasoning", "prompt": f"p{i}"} for i in range(N_SAMPLES)]
    return [s for s in every if s["id"] not in skip]


def run_predict(
    model: pl.LightningModule, data: list[dict[str, str]], writer: StreamingPredictionWriter
) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
    )
    loader = DataLoader(data, batch_size=3, collate_fn=list)
    trainer.predict(model, dataloaders=loader, return_predictions=False)


def expected_answer(i: int) -> str:
    return f"The answer is {i * 3}.\n#### {i * 3}"


def test_killed_and_rerun_gives_each_id_once(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    submission = SubmissionConfig(
        challenge_csv=str(tmp_path / "submission.csv"), challenge_rows=N_SAMPLES
    )
    all_ids = [str(i) for i in range(N_SAMPLES)]
    with pytest.raises(RuntimeError, match="killed"):
        writer = StreamingPredictionWriter(out, submission=submission)
        run_predict(FakeGenerator(crash_at="7"), samples(), writer)
    # Batches [0,1,2] and [3,4,5] were stored before the crash in the third batch.
    assert completed_ids(out) == {"0", "1", "2", "3", "4", "5"}
    assert not (tmp_path / "submission.csv").exists()
    # The kill also tore the last write.
    part = part_path(out, 0)
    part.write_bytes(part.read_bytes() + b'{"id": "6", "task": "math')

    done = PredictionStore(out, 0).done_ids
    writer = StreamingPredictionWriter(out, submission=submission, expected_ids=all_ids)
    run_predict(FakeGenerator(), samples(skip=done), writer)

    merged = merge(out)
    assert sorted(int(r["id"]) for r in merged) == list(range(N_SAMPLES))
    assert writer.merged is not None and [r["id"] for r in writer.merged] == all_ids
    frame = pd.read_csv(tmp_path / "submission.csv")
    assert frame["id"].tolist() == list(range(N_SAMPLES))
    assert frame["output"].tolist() == [expected_answer(i) for i in range(N_SAMPLES)]


def test_rerun_with_nothing_left_still_writes_submissions(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    run_predict(FakeGenerator(), samples(), StreamingPredictionWriter(out))
    submission = SubmissionConfig(jsonl=str(tmp_path / "all.jsonl"))
    writer = StreamingPredictionWriter(out, submission=submission)
    run_predict(FakeGenerator(), samples(skip=completed_ids(out)), writer)  # an empty loader
    lines = (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line)["answer"] for line in lines]
    assert answers == [expected_answer(i) for i in range(N_SAMPLES)]


def test_rerun_without_skipping_writes_no_duplicates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_predict(FakeGenerator(), samples(), StreamingPredictionWriter(tmp_path))
    with caplog.at_level(logging.WARNING):
        run_predict(FakeGenerator(), samples(), StreamingPredictionWriter(tmp_path))
    assert "refusing 3 records" in caplog.text
    lines = part_path(tmp_path, 0).read_text().splitlines()
    stored = sorted(json.loads(line)["id"] for line in lines)
    assert stored == sorted(str(i) for i in range(N_SAMPLES))


def test_writer_rejects_unsupported_settings_and_outputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="write_interval='epoch' is not supported"):
        StreamingPredictionWriter(tmp_path, write_interval="epoch")

    class TensorGenerator(FakeGenerator):
        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            return torch.zeros(1)

    with pytest.raises(TypeError, match="must return a list of prediction records"):
        run_predict(TensorGenerator(), samples(), StreamingPredictionWriter(tmp_path))
