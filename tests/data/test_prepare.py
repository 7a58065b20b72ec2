"""`run_prepare` end to end on the bundled sample, the prepare configs, and its refusals."""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from litovis.data.curate import CurationConfig
from litovis.data.drops import DropReport
from litovis.data.fetch import FetchOptions, ImageFetchError
from litovis.data.prepare import PrepareConfig, load_prepared, run_prepare
from litovis.data.prompts import load_templates, render_messages
from litovis.data.sources import SourceSpec
from tests.data.tiny_inputs import PROMPTS_YAML, REPO, image_bytes, write_parquet

CONFIGS = REPO / "configs" / "prepare"


def _parse(path) -> PrepareConfig:
    import warnings

    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--prepare", type=PrepareConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parser.instantiate(parser.parse_args(["--prepare", str(path)])).prepare


@pytest.mark.parametrize("name", ["sample", "challenge", "dacon_vqa"])
def test_configs_parse_into_prepare_config_and_name_their_command(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# litovis prepare --config configs/prepare/{name}.yaml"
    cfg = _parse(path)
    assert isinstance(cfg, PrepareConfig) and cfg.sources and cfg.seed == 42
    assert all(isinstance(s, SourceSpec) for s in cfg.sources)
    assert isinstance(cfg.fetch, FetchOptions) and isinstance(cfg.curation, CurationConfig)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("prepared")
    cwd = os.getcwd()
    os.chdir(REPO)  # the config's paths are relative to the repository root
    try:
        cfg = _parse(CONFIGS / "sample.yaml")
        cfg = replace(cfg, output_dir=str(out / "out"), image_dir=str(out / "images"),
                      fetch=replace(cfg.fetch, progress=False))
        result = run_prepare(cfg)
    finally:
        os.chdir(cwd)
    return cfg, result


def test_writes_every_split_and_the_report(prepared):
    cfg, result = prepared
    assert set(result.files) == {"train", "val", "test"}
    train, val, test = (load_prepared(result.files[s]) for s in ("train", "val", "test"))
    counts = result.task_counts
    for task, c in counts.items():
        assert c.get("train", 0) == sum(s.task == task for s in train)
        assert c.get("val", 0) == sum(s.task == task for s in val)
        assert c.get("curated", 0) == c.get("train", 0) + c.get("val", 0)
    for task in ("captioning", "vqa", "summarization", "text_qa", "math_reasoning", "dacon_vqa"):
        assert counts[task]["val"] >= 1 and counts[task]["train"] > counts[task]["val"]
    data = json.loads(result.report_path.read_text())
    report = DropReport.from_dict(data["drops"])
    report.check()
    assert data["tasks"] == counts and data["config"]["seed"] == 42
    assert report.counts[("curate.group_cap", "over group cap")] > 0


def test_test_rows_keep_order_ids_and_have_local_images(prepared):
    _, result = prepared
    test = load_prepared(result.files["test"])
    assert [s.id for s in test] == [str(i) for i in range(20)]
    assert [s.task for s in test[::4]] == ["captioning", "vqa", "summarization", "text_qa", "math_reasoning"]
    assert all(s.target is None for s in test)
    for sample in test[:8]:
        assert len(sample.images) == 1 and sample.images[0].endswith(".jpg")
        with open(sample.images[0], "rb") as handle:
            assert handle.read(2) == b"\xff\xd8"  # a JPEG


def test_training_data_is_curated_grouped_and_renderable(prepared):
    _, result = prepared
    train, val = load_prepared(result.files["train"]), load_prepared(result.files["val"])
    qa = [s for s in train + val if s.task == "text_qa"]
    assert max(Counter(s.group for s in qa).values()) <= 3
    assert not {s.group for s in train if s.group} & {s.group for s in val if s.group}
    assert all(len(s.fields["question"].split()) >= 6 for s in qa)
    templates = load_templates(PROMPTS_YAML)
    for sample in train + val:
        render_messages(sample, templates)
        for image in sample.images:
            assert not image.startswith(("http", "data:")) and Path(image).stat().st_size > 0


def test_rerun_is_identical_and_downloads_nothing_new(prepared, tmp_path):
    import os

    cfg, result = prepared
    image_dir = sorted(os.listdir(cfg.image_dir))
    stamps = [os.stat(os.path.join(cfg.image_dir, n)).st_mtime_ns for n in image_dir]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        again = run_prepare(replace(cfg, output_dir=str(tmp_path / "again")))
    finally:
        os.chdir(cwd)
    for split in ("train", "val", "test"):
        first = [s.to_record() for s in load_prepared(result.files[split])]
        assert first == [s.to_record() for s in load_prepared(again.files[split])]
    assert sorted(os.listdir(cfg.image_dir)) == image_dir
    assert [os.stat(os.path.join(cfg.image_dir, n)).st_mtime_ns for n in image_dir] == stamps


def _tiny_config(tmp_path, rows, split="train", **kw) -> PrepareConfig:
    path = write_parquet(rows, tmp_path / f"{split}.parquet")
    return PrepareConfig(
        sources=[SourceSpec(format="challenge", path=str(path), split=split)],
        output_dir=str(tmp_path / "out"), image_dir=str(tmp_path / "img"), prompts=str(PROMPTS_YAML),
        fetch=FetchOptions(progress=False, retries=0), **kw)


def test_a_test_image_that_cannot_be_fetched_is_an_error(tmp_path):
    rows = [{"task": "vqa", "input_type": "image", "input": "bm90IGFuIGltYWdl", "question": "q"}]
    with pytest.raises(ImageFetchError, match="sample 0"):
        run_prepare(_tiny_config(tmp_path, rows, split="test"))
    assert not (tmp_path / "out" / "test.parquet").exists()


def test_an_unrenderable_train_sample_is_dropped(tmp_path):
    png = base64.b64encode(image_bytes()).decode()
    rows = [{"task": "vqa", "input_type": "image", "input": png, "question": None, "output": "x"},
            {"task": "vqa", "input_type": "image", "input": "bm90", "question": "q", "output": "x"},
            {"task": "summarization", "input_type": "text", "input": "bill", "question": None, "output": "s"}]
    cfg = _tiny_config(tmp_path, rows, curation=CurationConfig(val_fraction=0.0))
    cfg.sources.append(cfg.sources[0])  # same ids twice
    with pytest.raises(ValueError, match="duplicate sample id.*id_prefix"):
        run_prepare(cfg)
    cfg.sources.pop()
    result = run_prepare(cfg)
    assert [s.task for s in load_prepared(result.files["train"])] == ["summarization"]
    assert result.report.counts[("fetch train", "corrupt image")] == 1
    assert result.report.counts[("render", "prompt error")] == 1
    assert "test" not in result.files


def test_stale_test_file_is_removed_and_empty_sources_refused(tmp_path, capsys):
    rows = [{"task": "summarization", "input_type": "text", "input": "bill", "question": None, "output": "s"}]
    cfg = _tiny_config(tmp_path, rows, curation=CurationConfig(val_fraction=0.0))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "test.parquet").write_bytes(b"old")
    run_prepare(cfg)
    assert not (tmp_path / "out" / "test.parquet").exists() and "removed" in capsys.readouterr().out
    with pytest.raises(ValueError, match="sources is empty"):
        run_prepare(PrepareConfig())
    with pytest.raises(FileNotFoundError, match="litovis prepare"):
        load_prepared(tmp_path / "nope.parquet")
