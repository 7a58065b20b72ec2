"""Score prediction records against references, per task and overall.

`evaluate` reads a predictions file (prediction JSONL, or a submission CSV) and a references file
(prepared parquet/JSONL of samples), joins them by id, prints a per-task table and optionally
writes the result as JSON. `score_records` does the scoring on in-memory data, for the training
loop's validation.

Join rules: a reference without a target cannot be scored and is reported; a reference without a
prediction counts as a missing prediction and scores 0 on every metric; a prediction without a
reference is reported as extra. Row-mean metrics are computed over the answered rows and scaled
by answered / n, which is exactly "missing rows score 0"; corpus BLEU, which is not a row mean,
sees missing rows as empty predictions. Overall, `bleu` is the mean sentence BLEU over all scored
rows (the reconstructed public leaderboard), and `primary_mean` the mean over tasks of each task's
primary metric (the reconstructed private leaderboard when captioning uses CLIPScore and
summarization BERTScore; see `metrics.PRIMARY_METRICS`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from litovis.data.sample import Sample
from litovis.evaluation import metrics
from litovis.evaluation.embedding_metrics import BERTScorer, CLIPScorer
from litovis.inference.writers import atomic_write_text, format_ids

log = logging.getLogger(__name__)

_LISTED_IDS = 20  # ids listed per category in the result; the counts are always complete


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON object: {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {row!r}")
            rows.append(row)
    return rows


def load_predictions(path: str | Path) -> list[dict[str, str]]:
    """Prediction records `{"id", "answer", ...}` from a prediction JSONL, a challenge CSV
    (`id,output`) or a Dacon CSV (`ID,answer`)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        import pandas as pd

        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for id_column, answer_column in (("id", "output"), ("ID", "answer")):
            if {id_column, answer_column} <= set(frame.columns):
                return [
                    {"id": i, "answer": a}
                    for i, a in zip(frame[id_column], frame[answer_column], strict=True)
                ]
        raise ValueError(
            f"{path}: a predictions CSV needs columns id,output or ID,answer; "
            f"found {list(frame.columns)}"
        )
    records = _read_jsonl(path)
    for line_number, record in enumerate(records, 1):
        if "id" not in record or "answer" not in record:
            raise ValueError(f"{path}: record {line_number} lacks 'id' or 'answer'")
        record["id"] = str(record["id"])
    return records


def _sample_from_row(row: Mapping[str, Any]) -> Sample:
    row = dict(row)
    for key in ("fields", "messages"):
        # JSONL written by hand may hold these as objects rather than JSON strings.
        if isinstance(row.get(key), (dict, list)):
            row[key] = json.dumps(row[key], ensure_ascii=False)
    for key in ("target", "group"):
        if isinstance(row.get(key), float) and math.isnan(row[key]):
            row[key] = None
    return Sample.from_record(row)


def load_references(path: str | Path) -> list[Sample]:
    """Samples from a prepared parquet or JSONL file (columns id, task, target, ...)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        rows = _read_jsonl(path)
    samples = []
    for position, row in enumerate(rows):
        if "id" not in row or "task" not in row:
            raise ValueError(f"{path}: row {position} lacks 'id' or 'task'")
        samples.append(_sample_from_row(row))
    return samples


def _unique_by_id(items: Sequence[Any], key: Any, what: str) -> dict[str, Any]:
    by_id: dict[str, Any] = {}
    duplicates = []
    for item in items:
        identifier = str(key(item))
        if identifier in by_id:
            duplicates.append(identifier)
        by_id.setdefault(identifier, item)
    if duplicates:
        raise ValueError(f"{what}: {len(duplicates)} duplicate ids: {format_ids(duplicates)}")
    return by_id


def _image_path(sample: Sample, images_dir: str | Path | None) -> Path | None:
    if not sample.images:
        return None
    path = Path(str(sample.images[0]))
    if not path.is_absolute() and images_dir is not None:
        path = Path(images_dir) / path
    return path if path.is_file() else None


def _score_task(
    task: str,
    samples: Sequence[Sample],
    answers: Sequence[str | None],
    bertscorer: BERTScorer | None,
    clipscorer: CLIPScorer | None,
    images_dir: str | Path | None,
) -> dict[str, Any]:
    answered = [(s, a) for s, a in zip(samples, answers, strict=True) if a is not None]
    scale = len(answered) / len(samples)
    predictions = [a for _, a in answered]
    targets = [s.target or "" for s, _ in answered]
    notes: list[str] = []
    if answered:
        text_scores = metrics.score_text_metrics(task, predictions, targets)
        values = {name: value * scale for name, value in text_scores.items()}
    else:
        values = {name: 0.0 for name in metrics.text_metrics_for(task)}
    if task == "summarization":
        if bertscorer is None:
            notes.append("bertscore_f1 skipped: no bertscore_model given (a local model directory)")
        else:
            values["bertscore_f1"] = bertscorer(predictions, targets) * scale if answered else 0.0
    if task == "captioning":
        if clipscorer is None:
            notes.append("clipscore skipped: no clip_model given (a local CLIP directory)")
        else:
            with_image = [(a, _image_path(s, images_dir)) for s, a in answered]
            usable = [(a, p) for a, p in with_image if p is not None]
            if len(usable) < len(with_image):
                notes.append(
                    f"clipscore over {len(usable)} of {len(with_image)} answered rows: "
                    f"{len(with_image) - len(usable)} have no readable image file"
                )
            # Rows without a prediction score 0; rows without an image are left out.
            rows = len(samples) - len(with_image) + len(usable)
            if rows:
                scores = clipscorer.row_scores([a for a, _ in usable], [p for _, p in usable])
                values["clipscore"] = sum(scores) / rows
    return {
        "n": len(samples),
        "missing": len(samples) - len(answered),
        "metrics": values,
        "primary": metrics.primary_metric(task, list(values)),
        "notes": notes,
    }


def score_records(
    records: Sequence[Mapping[str, Any]],
    references: Sequence[Sample],
    tasks: Sequence[str] | None = None,
    bertscore_model: str | Path | BERTScorer | None = None,
    clip_model: str | Path | CLIPScorer | None = None,
    images_dir: str | Path | None = None,
    bertscore_layer: int | None = None,
) -> dict[str, Any]:
    """Score prediction records (`id`, `answer`) against reference samples, joined by id.

    Args:
        records: prediction records; only `id` and `answer` are read (`task` is cross-checked).
        references: samples with `id`, `task` and `target`.
        tasks: score only these tasks (default: every task of the references).
        bertscore_model: local model directory (or a loaded `BERTScorer`) for summarization.
        clip_model: local CLIP directory (or a loaded `CLIPScorer`) for captioning.
        images_dir: base directory of relative image paths (CLIPScore only).
        bertscore_layer: hidden layer for BERTScore (None: the last).

    Returns the result described in the module docstring: `counts`, id lists, `tasks`
    (per task: n, missing, metrics, primary, notes) and `overall`.
    """
    by_id = _unique_by_id(references, lambda s: s.id, "references")
    answers = _unique_by_id(records, lambda r: r["id"], "predictions")
    known_tasks = sorted({s.task for s in references})
    if tasks is not None:
        unknown = sorted(set(tasks) - set(known_tasks))
        if unknown:
            raise ValueError(
                f"tasks {unknown} have no references; the references hold {known_tasks}"
            )
    selected = set(known_tasks if tasks is None else tasks)

    without_target = [s.id for s in references if s.task in selected and s.target is None]
    scored = [s for s in references if s.task in selected and s.target is not None]
    missing = [s.id for s in scored if s.id not in answers]
    extra = [i for i in answers if i not in by_id]
    task_mismatch = [
        s.id for s in scored
        if s.id in answers and answers[s.id].get("task") not in (None, s.task)
    ]
    if task_mismatch:
        log.warning(
            "%d predictions name a different task than their reference (ids %s): are the ids "
            "aligned with the references?", len(task_mismatch), format_ids(task_mismatch),
        )
    if isinstance(bertscore_model, (str, Path)):
        bertscore_model = BERTScorer(bertscore_model, layer=bertscore_layer)
    if isinstance(clip_model, (str, Path)):
        clip_model = CLIPScorer(clip_model)

    samples_by_task: dict[str, list[Sample]] = defaultdict(list)
    for sample in scored:
        samples_by_task[sample.task].append(sample)
    task_results = {}
    for task in sorted(samples_by_task):
        samples = samples_by_task[task]
        task_answers = [str(answers[s.id]["answer"]) if s.id in answers else None for s in samples]
        task_results[task] = _score_task(
            task, samples, task_answers, bertscore_model, clip_model, images_dir
        )

    overall: dict[str, Any] = {"n": len(scored)}
    if scored:
        answered = [s for s in scored if s.id in answers]
        predictions = [str(answers[s.id]["answer"]) for s in answered]
        overall["bleu"] = (
            metrics.sentence_bleu(predictions, [s.target for s in answered]) * len(answered)
            / len(scored) if answered else 0.0
        )
        overall["corpus_bleu"] = metrics.corpus_bleu(
            [str(answers[s.id]["answer"]) if s.id in answers else "" for s in scored],
            [s.target or "" for s in scored],
        )
        primaries = {task: result["primary"] for task, result in task_results.items()}
        overall["primary_metrics"] = primaries
        overall["primary_mean"] = sum(
            task_results[t]["metrics"][m] for t, m in primaries.items()
        ) / len(primaries)
    return {
        "counts": {
            "references": len(references),
            "excluded_by_task_filter": sum(1 for s in references if s.task not in selected),
            "without_target": len(without_target),
            "scored": len(scored),
            "predictions": len(records),
            "missing_predictions": len(missing),
            "extra_predictions": len(extra),
        },
        "missing_ids": missing[:_LISTED_IDS],
        "extra_ids": extra[:_LISTED_IDS],
        "without_target_ids": without_target[:_LISTED_IDS],
        "tasks": task_results,
        "overall": overall,
    }


def format_report(result: Mapping[str, Any]) -> str:
    """The per-task table of a `score_records` result, as printable text."""
    lines = [f"{'task':<16} {'n':>6} {'missing':>7}  metrics"]
    for task, entry in result["tasks"].items():
        values = "  ".join(f"{k}={v:.4f}" for k, v in entry["metrics"].items())
        lines.append(f"{task:<16} {entry['n']:>6} {entry['missing']:>7}  {values}")
        lines.extend(f"{'':<32}note: {note}" for note in entry["notes"])
    overall = result["overall"]
    values = "  ".join(
        f"{k}={overall[k]:.4f}" for k in ("bleu", "corpus_bleu", "primary_mean") if k in overall
    )
    missing_total = result["counts"]["missing_predictions"]
    lines.append(f"{'overall':<16} {overall['n']:>6} {missing_total:>7}  {values}")
    counts = result["counts"]
    for key, ids_key in (
        ("missing_predictions", "missing_ids"),
        ("extra_predictions", "extra_ids"),
        ("without_target", "without_target_ids"),
    ):
        if counts[key]:
            lines.append(f"{key.replace('_', ' ')}: {counts[key]} ({format_ids(result[ids_key])})")
    return "\n".join(lines)


def evaluate(
    predictions: str | Path,
    references: str | Path,
    output: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    bertscore_model: str | Path | None = None,
    clip_model: str | Path | None = None,
    images_dir: str | Path | None = None,
    bertscore_layer: int | None = None,
) -> dict[str, Any]:
    """Score a predictions file against a references file, print the table, write JSON.

    Args:
        predictions: prediction JSONL (records with `id`, `answer`), or a challenge CSV
            (`id,output`) or Dacon CSV (`ID,answer`).
        references: prepared parquet or JSONL of samples with `id`, `task`, `target`.
        output: where to write the result as JSON (atomically); not written when None.
        tasks: score only these tasks.
        bertscore_model: local model directory for summarization BERTScore (skipped if None).
        clip_model: local CLIP directory for captioning CLIPScore (skipped if None).
        images_dir: base directory of relative image paths in the references (CLIPScore).
        bertscore_layer: hidden layer for BERTScore (None: the last).
    """
    result = score_records(
        load_predictions(predictions),
        load_references(references),
        tasks=tasks,
        bertscore_model=bertscore_model,
        clip_model=clip_model,
        images_dir=images_dir,
        bertscore_layer=bertscore_layer,
    )
    result["predictions_file"] = str(predictions)
    result["references_file"] = str(references)
    print(format_report(result))
    if output is not None:
        atomic_write_text(output, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
