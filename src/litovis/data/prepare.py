"""`run_prepare`: raw sources -> fetched images -> curated, split parquet files plus a report.

Steps: read every source (ids must be unique per output, checked before any download), fetch
images (test samples first, and a failing test image is an error, never a drop), check that
every sample renders with the prompt templates, curate the `train` sources and split them
90/10 per task by group, then write `train.parquet`, `val.parquet` and (with test sources)
`test.parquet` in source order, each row `Sample.to_record`, plus `report.json` with the merged
drop report, per-task counts, the files and the config. Files are written to a temporary name and
renamed; `report.json` is removed before the first file changes and written after the last, so it
vouches for the files beside it: `is_prepared` compares its config with the current one (settings
that cannot change the files, such as `fetch.workers`, left out) to skip a needless rerun.
Image paths in the parquet files are as the config gives them (relative paths are relative to
the working directory `prepare` ran in).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from litovis.data.curate import CurationConfig, curate, split_train_val
from litovis.data.drops import DropReport
from litovis.data.fetch import FetchOptions, fetch_images
from litovis.data.prompts import PromptError, load_templates, render_messages
from litovis.data.sample import Sample
from litovis.data.sources import SourceSpec, TestRowsError, read_source

SPLIT_FILES = {"train": "train.parquet", "val": "val.parquet", "test": "test.parquet"}
COUNT_COLUMNS = ("read", "fetched", "rendered", "curated", "train", "val", "test")
REPORT_FILE = "report.json"
#: (section, field) of the settings that change how `run_prepare` runs, never what it writes.
NOT_IN_OUTPUT = (("fetch", "workers"), ("fetch", "progress"))


@dataclass
class PrepareConfig:
    """Everything `litovis prepare` needs (one YAML file under `configs/prepare/`).

    Attributes:
        sources: raw datasets to read, each with its format, path and split.
        output_dir: where train/val/test parquet files and `report.json` are written.
        image_dir: where fetched and decoded images are stored (shared across runs: a rerun
            skips images already there).
        prompts: prompt template file every sample must render with; None skips the check.
        fetch: image download and conversion options.
        curation: filters, caps and the validation split of `train` sources.
        seed: seed of every random choice (caps, split).
    """

    sources: list[SourceSpec] = field(default_factory=list)
    output_dir: str = "data/prepared"
    image_dir: str = "data/images"
    prompts: str | None = "configs/prompts.yaml"
    fetch: FetchOptions = field(default_factory=FetchOptions)
    curation: CurationConfig = field(default_factory=CurationConfig)
    seed: int = 42


@dataclass
class PrepareResult:
    """What `run_prepare` wrote.

    Attributes:
        files: split name -> parquet path (`train`, `val`, and `test` when there were test sources).
        report_path: the `report.json` path.
        report: drop report of every stage, merged.
        task_counts: task -> stage column (`COUNT_COLUMNS`) -> samples.
    """

    files: dict[str, Path]
    report_path: Path
    report: DropReport
    task_counts: dict[str, dict[str, int]]


def _check_unique_ids(samples: list[Sample], what: str) -> None:
    counts = Counter(s.id for s in samples)
    duplicates = [i for i, n in counts.items() if n > 1]
    if duplicates:
        first = {i: [s.source for s in samples if s.id == i][:3] for i in duplicates[:5]}
        raise ValueError(
            f"{len(duplicates)} duplicate sample id(s) in the {what} data, e.g. {first}; "
            "give mixed sources distinct `id_prefix` values"
        )


def _render_check(
    samples: list[Sample], templates: dict, report: DropReport, test: bool
) -> list[Sample]:
    """Samples that render with `templates`; failures are dropped, or raise for test data."""
    stage = "render test" if test else "render"
    kept, failures = [], []
    for sample in samples:
        try:
            render_messages(sample, templates, include_target=not test)
        except PromptError as err:
            failures.append((sample, err))
            continue
        kept.append(sample)
    if test and failures:
        listing = "\n".join(f"  {err}" for _, err in failures)
        raise TestRowsError(f"test samples that cannot be rendered may not be dropped:\n{listing}")
    for sample, err in failures:
        report.drop(stage, "prompt error", sample.source, str(err))
    if kept:
        report.keep(stage, len(kept))
    return kept


def _write_parquet(samples: list[Sample], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("id", pa.string()), ("task", pa.string()), ("fields", pa.string()),
         ("messages", pa.string()), ("images", pa.list_(pa.string())), ("target", pa.string()),
         ("group", pa.string()), ("source", pa.string())]
    )
    table = pa.Table.from_pylist([s.to_record() for s in samples], schema=schema)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_prepared(path: str | Path) -> list[Sample]:
    """Samples of one prepared parquet file (`train.parquet`, `val.parquet`, `test.parquet`)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared file not found: {path} (run `litovis prepare` first)")
    return [Sample.from_record(record) for record in pq.read_table(path).to_pylist()]


def _output_settings(config: dict) -> dict:
    """A JSON-form `PrepareConfig` without the `NOT_IN_OUTPUT` settings."""
    settings = json.loads(json.dumps(config))
    for section, name in NOT_IN_OUTPUT:
        settings.get(section, {}).pop(name, None)
    return settings


def is_prepared(cfg: PrepareConfig) -> bool:
    """Whether `cfg.output_dir` holds what `run_prepare(cfg)` would write.

    True when its `report.json` (written after every file) records the same settings as `cfg`,
    apart from `NOT_IN_OUTPUT`, and every file it lists is there.
    """
    out_dir = Path(cfg.output_dir)
    try:
        report = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if not isinstance(report.get("config"), dict) or not isinstance(report.get("files"), dict):
        return False
    if _output_settings(report["config"]) != _output_settings(asdict(cfg)):
        return False
    return all((out_dir / name).is_file() for name in report["files"].values())


def format_task_table(task_counts: dict[str, dict[str, int]]) -> str:
    """Per-task sample counts through the stages, as a plain-text table."""
    rows = [("task", *COUNT_COLUMNS)]
    for task in sorted(task_counts):
        rows.append((task, *(str(task_counts[task].get(c, 0)) for c in COUNT_COLUMNS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    )


def run_prepare(cfg: PrepareConfig) -> PrepareResult:
    """Read, fetch, check, curate, split and write; print the per-task and drop tables."""
    if not cfg.sources:
        raise ValueError("PrepareConfig.sources is empty: list at least one source")
    counts: dict[str, Counter] = defaultdict(Counter)

    def count(column: str, samples: list[Sample]) -> None:
        for sample in samples:
            counts[sample.task][column] += 1

    reports: list[DropReport] = []
    by_split: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for spec in cfg.sources:
        samples, report = read_source(spec)
        reports.append(report)
        by_split[spec.split].extend(samples)
        count("read", samples)
    _check_unique_ids(by_split["train"] + by_split["val"], "train/val")
    _check_unique_ids(by_split["test"], "test")

    for split in ("test", "train", "val"):  # test first: its failures are errors
        if by_split[split]:
            by_split[split], report = fetch_images(
                by_split[split],
                cfg.image_dir,
                cfg.fetch,
                on_failure="raise" if split == "test" else "drop",
                stage=f"fetch {split}",
            )
            reports.append(report)
            count("fetched", by_split[split])

    if cfg.prompts is not None:
        templates = load_templates(cfg.prompts)
        render_report = DropReport()
        for split in ("test", "train", "val"):
            test = split == "test"
            by_split[split] = _render_check(by_split[split], templates, render_report, test)
            count("rendered", by_split[split])
        reports.append(render_report)

    curated, report = curate(by_split["train"], cfg.curation, cfg.seed)
    reports.append(report)
    count("curated", curated)
    train, val = split_train_val(curated, cfg.curation.val_fraction, cfg.seed)
    outputs = {"train": train, "val": val + by_split["val"]}
    if by_split["test"]:
        outputs["test"] = by_split["test"]

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT_FILE
    report_path.unlink(missing_ok=True)  # it would vouch for files that are about to change
    files = {}
    for split, samples in outputs.items():
        files[split] = out_dir / SPLIT_FILES[split]
        _write_parquet(samples, files[split])
        count(split, samples)
    stale = out_dir / SPLIT_FILES["test"]
    if "test" not in outputs and stale.exists():
        stale.unlink()
        print(f"removed {stale} left by an earlier run (this config has no test source)")

    merged = DropReport.combine(reports)
    merged.check()
    task_counts = {task: dict(c) for task, c in counts.items()}
    tmp = report_path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "tasks": task_counts,
                "drops": merged.to_dict(),
                "files": {split: path.name for split, path in files.items()},
                "config": asdict(cfg),
            },
            indent=2,
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    os.replace(tmp, report_path)
    print(format_task_table(task_counts))
    print(merged.format_table())
    print("wrote " + ", ".join(f"{split}: {path}" for split, path in files.items()))
    return PrepareResult(files, report_path, merged, task_counts)
