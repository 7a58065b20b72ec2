"""Score prediction records against references, per task and overall.

`evaluate` reads a predictions file (prediction JSONL, or a submission CSV) and a references file
(prepared parquet/JSONL of samples), joins them by id, prints a per-task table and optionally
writes the result as JSON. `score_records` does the scoring on records and samples already in
memory.

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
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from litovis.data.prepare import load_prepared
from litovis.data.raw_records import RowError, read_json_records
from litovis.data.sample import Sample
from litovis.evaluation import metrics
from litovis.evaluation.embedding_metrics import BERTScorer, CLIPScorer
from litovis.inference.writers import atomic_write_text, format_ids, unique_by_id
from litovis.processing.image import ImageLoadError, load_image

log = logging.getLogger(__name__)

_LISTED_IDS = 20  # ids listed per category in the result; the counts are always complete


def _where(path: Path, index: int) -> str:
    """`path:line` of the `index`-th record of a JSONL file (blank lines hold none), or
    `path: record N` in a JSON list; only computed for an error, it reads the file again."""
    if path.suffix.lower() != ".jsonl":
        return f"{path}: record {index}"
    with path.open("rb") as stream:
        records = -1
        for number, line in enumerate(stream, 1):
            records += bool(line.strip())
            if records == index:
                return f"{path}:{number}"
    return f"{path}: record {index}"


def _json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, record) of a `.jsonl` file or `.json` list, read by
    `litovis.data.raw_records.read_json_records`; a record that is not valid JSON or not a JSON
    object raises a `ValueError` naming its `path:line`."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected a .jsonl or .json file (or .parquet references, .csv predictions)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    for index, record in read_json_records(path):
        if isinstance(record, RowError):
            raise ValueError(f"{_where(path, index)}: {record}")
        if not isinstance(record, dict):
            raise ValueError(f"{_where(path, index)}: expected a JSON object, got {record!r:.80}")
        yield index, record


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
    records = []
    for index, record in _json_records(path):
        if "id" not in record or "answer" not in record:
            raise ValueError(f"{_where(path, index)}: record lacks 'id' or 'answer'")
        record["id"] = str(record["id"])
        records.append(record)
    return records


def load_references(path: str | Path) -> list[Sample]:
    """Samples from a prepared parquet file (`litovis.data.prepare.load_prepared`) or a JSONL /
    JSON list of sample records (columns id, task, target, ...; `fields` and `messages` as JSON
    text or as objects)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        try:
            return load_prepared(path)
        except KeyError as err:
            raise ValueError(f"{path}: no {err} column: not a file of prepared samples") from None
    samples = []
    for index, record in _json_records(path):
        if "id" not in record or "task" not in record:
            raise ValueError(f"{_where(path, index)}: record lacks 'id' or 'task'")
        for key in ("fields", "messages"):
            if isinstance(record.get(key), (dict, list)):  # written by hand as objects, not JSON text
                record[key] = json.dumps(record[key], ensure_ascii=False)
        try:
            samples.append(Sample.from_record(record))
        except ValueError as err:  # `fields` / `messages` text that is not JSON
            raise ValueError(f"{_where(path, index)}: {err}") from None
    return samples


def _image_path(sample: Sample, images_dir: str | Path | None) -> Path | None:
    if not sample.images:
        return None
    path = Path(str(sample.images[0]))
    if not path.is_absolute() and images_dir is not None:
        path = Path(images_dir) / path
    return path


def _clip_scores(
    clipscorer: CLIPScorer, rows: Sequence[tuple[Sample, str]], images_dir: str | Path | None
) -> tuple[list[float], list[str]]:
    """CLIPScores of the (sample, caption) rows whose image loads, and why the others have none.

    Images are loaded with `litovis.processing.image.load_image` one scorer batch at a time.
    """
    scores: list[float] = []
    problems: list[str] = []
    for start in range(0, len(rows), clipscorer.batch_size):
        captions, pictures = [], []
        for sample, caption in rows[start:start + clipscorer.batch_size]:
            path = _image_path(sample, images_dir)
            if path is None:
                problems.append(f"{sample.id}: no image")
                continue
            try:
                pictures.append(load_image(path, name=str(path)))
            except ImageLoadError as err:
                problems.append(str(err))
                continue
            captions.append(caption)
        if captions:
            scores.extend(clipscorer.row_scores(captions, pictures))
    return scores, problems


def _score_task(
    task: str,
    samples: Sequence[Sample],
    answers: Sequence[str | None],
    bleu_rows: Sequence[float],
    bertscorer: BERTScorer | None,
    clipscorer: CLIPScorer | None,
    images_dir: str | Path | None,
) -> dict[str, Any]:
    """Metrics of one task; `bleu_rows` holds the sentence BLEU of each answered row, in order."""
    answered = [(s, a) for s, a in zip(samples, answers, strict=True) if a is not None]
    scale = len(answered) / len(samples)
    predictions = [a for _, a in answered]
    targets = [s.target or "" for s, _ in answered]
    notes: list[str] = []
    if answered:
        text_scores = metrics.score_text_metrics(task, predictions, targets, bleu_rows)
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
            scores, problems = _clip_scores(clipscorer, answered, images_dir)
            if problems:
                notes.append(
                    f"clipscore over {len(scores)} of {len(answered)} answered rows: "
                    f"{len(problems)} have no readable image file: " + "; ".join(problems[:_LISTED_IDS])
                    + (f"; ... ({len(problems) - _LISTED_IDS} more)" if len(problems) > _LISTED_IDS else "")
                )
            # Rows without a prediction score 0; rows without a readable image are left out.
            rows = len(samples) - len(problems)
            if rows:
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
    by_id = unique_by_id(references, lambda s: s.id, "references")
    answers = unique_by_id(records, lambda r: r["id"], "predictions")
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

    # Sentence BLEU once per answered row: the task means and the overall mean share it.
    answered = [s for s in scored if s.id in answers]
    bleu = dict(zip(
        [s.id for s in answered],
        metrics.sentence_bleu_rows([str(answers[s.id]["answer"]) for s in answered], [s.target for s in answered])
        if answered else [],
        strict=True,
    ))
    samples_by_task: dict[str, list[Sample]] = defaultdict(list)
    for sample in scored:
        samples_by_task[sample.task].append(sample)
    task_results = {}
    for task in sorted(samples_by_task):
        samples = samples_by_task[task]
        task_answers = [str(answers[s.id]["answer"]) if s.id in answers else None for s in samples]
        task_results[task] = _score_task(
            task, samples, task_answers, [bleu[s.id] for s in samples if s.id in bleu],
            bertscore_model, clip_model, images_dir,
        )

    overall: dict[str, Any] = {"n": len(scored)}
    if scored:
        overall["bleu"] = sum(bleu.values()) / len(scored)
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
