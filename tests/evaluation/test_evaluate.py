"""`evaluate` / `score_records`: the join of predictions and references, per-task and overall scores, and readable errors."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest

from litovis.data.sample import Sample
from litovis.evaluation.embedding_metrics import BERTScorer, CLIPScorer
from litovis.evaluation.evaluate import evaluate, load_references, score_records
from litovis.inference.writers import write_challenge_csv, write_jsonl

# id, task, target, prediction (None: no prediction)
ROWS = [
    ("0", "math_reasoning", "3 * 4 = 12\n#### 12", "#### 12"),
    ("1", "math_reasoning", "#### 6", "#### 5"),
    ("2", "vqa", "red car", "The Red Car."),
    ("3", "vqa", "blue", None),
    ("4", "text_qa", "the park", "in the park"),
    ("5", "text_qa", "blue", "Blue"),
    ("6", "captioning", "the cat sat on a mat", "the cat sat on the mat"),
    ("7", "summarization", "the cat sat on the mat", "the cat sat on"),
]


Row = tuple[str, str, str | None, str | None]


def write_references(path: Path, rows: list[Row], images: dict[str, str] | None = None) -> Path:
    images = images or {}
    samples = [
        Sample(id=i, task=task, fields={"question": "q"}, target=target,
               images=[images[i]] if i in images else [])
        for i, task, target, _ in rows
    ]
    pd.DataFrame([s.to_record() for s in samples]).to_parquet(path)
    return path


def prediction_records(rows: list[Row]) -> list[dict[str, str]]:
    return [
        {"id": i, "task": task, "prompt": "q", "raw": answer, "answer": answer}
        for i, task, _, answer in rows
        if answer is not None
    ]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    references = write_references(tmp_path / "refs.parquet", ROWS + [("8", "vqa", None, "x")])
    stranger = {"id": "99", "task": "vqa", "prompt": "q", "raw": "y", "answer": "y"}
    records = prediction_records(ROWS) + [stranger]
    predictions = write_jsonl(records, tmp_path / "predictions.jsonl")
    return predictions, references


def test_evaluate_end_to_end(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions, references = files
    result = evaluate(predictions, references, output=tmp_path / "scores" / "result.json")
    assert result["counts"] == {
        "references": 9, "excluded_by_task_filter": 0, "without_target": 1, "scored": 8,
        "predictions": 8, "missing_predictions": 1, "extra_predictions": 1,
    }
    assert result["missing_ids"] == ["3"]
    assert result["extra_ids"] == ["99"]
    assert result["without_target_ids"] == ["8"]
    tasks = result["tasks"]
    assert tasks["math_reasoning"]["metrics"] == {"exact_match": 0.5}  # 12 = 12, 5 != 6
    # "the red car" == "red car" after normalisation; the missing row scores 0.
    assert tasks["vqa"] == {"n": 2, "missing": 1, "metrics": {"normalized_exact_match": 0.5},
                            "primary": "normalized_exact_match", "notes": []}
    # "in park" != "park"; token F1 of row 4: P = 1/2, R = 1 -> 2/3; row 5: exact -> 1.
    assert tasks["text_qa"]["metrics"] == pytest.approx({"accuracy": 0.5, "f1": (2 / 3 + 1) / 2})
    # BLEU (hand-computed in test_metrics): (1/12)^(1/4); LCS 5 of 6 tokens both ways -> 5/6.
    assert tasks["captioning"]["metrics"] == pytest.approx(
        {"bleu": (1 / 12) ** 0.25, "rouge_l": 5 / 6}, abs=1e-6
    )
    assert tasks["captioning"]["primary"] == "rouge_l"
    assert "clipscore skipped" in tasks["captioning"]["notes"][0]
    # LCS 4: P = 1, R = 4/6 -> F = 0.8
    assert tasks["summarization"]["metrics"] == pytest.approx({"rouge_l": 0.8}, abs=1e-6)
    assert "bertscore_f1 skipped" in tasks["summarization"]["notes"][0]

    # Sentence BLEU per row (13a splits "####" into four "#" tokens and "*", "=" off numbers):
    # row 0: "# # # # 12" lies inside the 10-token reference -> precisions 1, BP = exp(1 - 10/5);
    # row 1: "# # # # 5" vs "# # # # 6" -> (4/5·3/4·2/3·1/2)^(1/4); rows 2-5 have no matching
    # 4-gram (or no prediction) -> 0; row 6: (1/12)^(1/4); row 7: exp(1 - 6/4).
    row_bleu = [math.exp(-1), (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, 0, 0, 0, 0,
                (1 / 12) ** 0.25, math.exp(-0.5)]
    overall = result["overall"]
    assert overall["n"] == 8
    assert overall["bleu"] == pytest.approx(sum(row_bleu) / 8, abs=1e-6)
    assert overall["primary_mean"] == pytest.approx((0.5 + 0.5 + 0.5 + 5 / 6 + 0.8) / 5)
    assert overall["primary_metrics"]["summarization"] == "rouge_l"
    assert 0 < overall["corpus_bleu"] < 1

    written = json.loads((tmp_path / "scores" / "result.json").read_text())
    assert written["tasks"] == json.loads(json.dumps(tasks))
    printed = capsys.readouterr().out
    assert "math_reasoning" in printed and "exact_match=0.5000" in printed
    assert "missing predictions: 1 ('3')" in printed and "extra predictions: 1 ('99')" in printed


def test_challenge_csv_predictions_score_like_jsonl(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    predictions, references = files
    csv_path = write_challenge_csv(prediction_records(ROWS), tmp_path / "submission.csv")
    from_csv = evaluate(csv_path, references)
    from_jsonl = evaluate(predictions, references)
    assert from_csv["tasks"] == from_jsonl["tasks"]
    assert from_csv["counts"]["extra_predictions"] == 0


def test_task_filter_and_errors(files: tuple[Path, Path], tmp_path: Path) -> None:
    predictions, references = files
    result = evaluate(predictions, references, tasks=["vqa"])
    assert list(result["tasks"]) == ["vqa"]
    assert result["counts"]["excluded_by_task_filter"] == 6
    assert result["counts"]["scored"] == 2 and result["counts"]["without_target"] == 1
    with pytest.raises(ValueError, match=r"tasks \['ocr'\] have no references"):
        evaluate(predictions, references, tasks=["ocr"])
    duplicated = write_jsonl(prediction_records(ROWS) * 2, tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match="predictions: 7 duplicate ids"):
        evaluate(duplicated, references)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("row,text\n0,a\n")
    with pytest.raises(ValueError, match="needs columns id,output or ID,answer"):
        evaluate(bad_csv, references)


def test_task_mismatch_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    references = [Sample(id="0", task="vqa", target="a"), Sample(id="1", task="vqa", target="b")]
    records = [{"id": "0", "task": "captioning", "answer": "a"}, {"id": "1", "answer": "b"}]
    with caplog.at_level(logging.WARNING):
        result = score_records(records, references)
    assert "1 predictions name a different task than their reference (ids '0')" in caplog.text
    assert result["tasks"]["vqa"]["metrics"]["normalized_exact_match"] == 1.0


def test_jsonl_references_with_object_fields(tmp_path: Path) -> None:
    path = tmp_path / "refs.jsonl"
    row = {"id": 5, "task": "vqa", "fields": {"question": "q"}, "target": "x"}
    path.write_text(json.dumps(row) + "\n")
    [sample] = load_references(path)
    assert (sample.id, sample.fields, sample.target) == ("5", {"question": "q"}, "x")


def test_model_metrics_with_local_models(
    tmp_path: Path, tiny_bert_dir: Path, tiny_clip_dir: Path, tiny_images: list[Path]
) -> None:
    rows = [
        ("c0", "captioning", "a red square", "a red square on white"),
        ("c1", "captioning", "a green square", None),
        ("c2", "captioning", "a blue square", "blue"),
        ("s0", "summarization", "the tax act", "the tax act . the bill"),
    ]
    images = {"c0": tiny_images[0].name, "c1": tiny_images[1].name, "c2": "no_such_image.jpg"}
    references = write_references(tmp_path / "refs.parquet", rows, images)
    predictions = write_jsonl(prediction_records(rows), tmp_path / "p.jsonl")
    result = evaluate(
        predictions, references, bertscore_model=tiny_bert_dir, clip_model=tiny_clip_dir,
        images_dir=tiny_images[0].parent,
    )
    captioning = result["tasks"]["captioning"]
    # c0 is scored, c1 has no prediction (0), c2's image is missing (left out, with a note).
    clip = CLIPScorer(tiny_clip_dir, device="cpu")
    c0 = clip.row_scores(["a red square on white"], [tiny_images[0]])[0]
    assert captioning["metrics"]["clipscore"] == pytest.approx((c0 + 0) / 2, abs=1e-5)
    assert captioning["primary"] == "clipscore"
    assert "clipscore over 1 of 2 answered rows" in captioning["notes"][0]
    summarization = result["tasks"]["summarization"]
    bert = BERTScorer(tiny_bert_dir, device="cpu")
    expected_f1 = bert(["the tax act . the bill"], ["the tax act"])
    assert summarization["metrics"]["bertscore_f1"] == pytest.approx(expected_f1, abs=1e-5)
    assert summarization["primary"] == "bertscore_f1" and summarization["notes"] == []
    expected_mean = (captioning["metrics"]["clipscore"] + expected_f1) / 2
    assert result["overall"]["primary_mean"] == pytest.approx(expected_mean)


def test_an_unreadable_image_is_noted_by_file_name(tmp_path: Path, tiny_clip_dir: Path, tiny_images: list[Path]) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not really a JPEG")
    rows = [
        ("c0", "captioning", "a red square", "a red square on white"),
        ("c1", "captioning", "a broken square", "a square"),
        ("c2", "captioning", "a missing square", "a square"),
    ]
    references = [Sample(id=i, task=task, target=target, images=[str(image)])
                  for (i, task, target, _), image in zip(rows, [tiny_images[0], broken, tmp_path / "gone.jpg"],
                                                          strict=True)]
    result = score_records(prediction_records(rows), references, clip_model=tiny_clip_dir)
    captioning = result["tasks"]["captioning"]
    [note] = captioning["notes"]
    assert note.startswith("clipscore over 1 of 3 answered rows: 2 have no readable image file: ")
    assert f"{broken}: cannot read image" in note and f"{tmp_path / 'gone.jpg'}: no such file" in note
    c0 = CLIPScorer(tiny_clip_dir, device="cpu").row_scores(["a red square on white"], [tiny_images[0]])[0]
    assert captioning["metrics"]["clipscore"] == pytest.approx(c0, abs=1e-5)


def test_bad_rows_are_named_by_file_and_line(tmp_path: Path) -> None:
    references = tmp_path / "refs.jsonl"
    good = json.dumps({"id": "1", "task": "vqa", "target": "x"})
    references.write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(ValueError, match=rf"{references}:3: bad json"):
        load_references(references)
    references.write_text(f"\n{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{references}:3: expected a JSON object"):
        load_references(references)
    references.write_text(f"{good}\n\n\n" + json.dumps({"id": "2", "target": "y"}) + "\n")
    with pytest.raises(ValueError, match=rf"{references}:4: record lacks 'id' or 'task'"):
        load_references(references)
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('\n{"id": "1", "answer": "x"}\n\n{"id": "2"}\n')
    with pytest.raises(ValueError, match=rf"{predictions}:4: record lacks 'id' or 'answer'"):
        evaluate(predictions, write_references(tmp_path / "r.parquet", ROWS))
    listed = tmp_path / "refs.json"
    listed.write_text(json.dumps([json.loads(good), {"id": "2"}]))
    with pytest.raises(ValueError, match=rf"{listed}: record 1: record lacks 'id' or 'task'"):
        load_references(listed)
    no_task = tmp_path / "no_task.parquet"
    pd.DataFrame([{"id": "1", "target": "x"}]).to_parquet(no_task)
    with pytest.raises(ValueError, match=rf"{no_task}: no 'task' column"):
        load_references(no_task)


def test_sentence_bleu_is_computed_once_per_row(files: tuple[Path, Path], monkeypatch) -> None:
    import torchmetrics.functional.text as text_metrics

    calls: list[int] = []
    real = text_metrics.sacre_bleu_score

    def counting(predictions, references, **kwargs):
        calls.append(len(predictions))
        return real(predictions, references, **kwargs)

    monkeypatch.setattr(text_metrics, "sacre_bleu_score", counting)
    predictions, references = files
    result = evaluate(predictions, references)
    answered = result["counts"]["scored"] - result["counts"]["missing_predictions"]
    assert sorted(calls) == [1] * answered + [result["counts"]["scored"]]  # rows, then corpus BLEU once
