"""The bundled sample: deterministic generation, the committed copy, layout and size."""

from __future__ import annotations

import ast
import filecmp
from collections import Counter

import pyarrow.parquet as pq
import pytest

from litovis.data.sample_data import generate
from tests.data.tiny_inputs import SAMPLE_DIR

TEXT_FILES = ["dacon/train.csv", "dacon/test.csv", "dacon/sample_submission.csv",
              "chat/messages.jsonl", "chat/query.jsonl", "chat/llava.json"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    generate(out)
    return out


def test_generation_is_deterministic(generated, tmp_path):
    generate(tmp_path)
    files = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(filecmp.cmp(generated / f, tmp_path / f, shallow=False) for f in files)


def test_committed_sample_is_what_the_script_generates(generated):
    committed = sorted(p.relative_to(SAMPLE_DIR) for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert [p for p in committed if p.name != "README.md"] == sorted(
        p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    for name in TEXT_FILES:  # text is independent of the image encoder's version
        assert (SAMPLE_DIR / name).read_text() == (generated / name).read_text(), name
    for name in ("challenge/train.parquet", "challenge/test.parquet"):
        ours, theirs = pq.read_table(SAMPLE_DIR / name), pq.read_table(generated / name)
        assert ours.column_names == theirs.column_names
        for column in set(ours.column_names) - {"input"}:
            assert ours[column].to_pylist() == theirs[column].to_pylist(), (name, column)


def test_layout_and_size():
    train = pq.read_table(SAMPLE_DIR / "challenge/train.parquet").to_pylist()
    test = pq.read_table(SAMPLE_DIR / "challenge/test.parquet")
    assert Counter(r["task"] for r in train) == {t: 16 for t in
                                                ("captioning", "vqa", "summarization", "text_qa", "math_reasoning")}
    assert "output" not in test.column_names and test.num_rows == 20
    for row in train:
        if row["task"] == "text_qa":
            questions = ast.literal_eval(row["question"])
            assert len(questions) == len(ast.literal_eval(row["output"])["input_text"]) >= 5
    multi = [r for r in test.to_pylist() if r["task"] == "text_qa" and len(ast.literal_eval(r["question"])) > 1]
    assert len(multi) == 2
    total = sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert total < 2 * 2**20


def test_images_are_small_and_decodable():
    import base64
    import io

    from PIL import Image

    rows = pq.read_table(SAMPLE_DIR / "challenge/train.parquet").to_pylist()
    blobs = [base64.b64decode(r["input"]) for r in rows if r["input_type"] == "image"]
    files = [p.read_bytes() for p in SAMPLE_DIR.rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(blobs) == 32 and len(files) == 20
    for blob in blobs + files:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            assert 64 <= min(image.size) and max(image.size) <= 160
