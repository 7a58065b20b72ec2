"""Shared test fixtures: paths to the committed reference assets, the tiny tokenizer, the repository
as working directory, and the bundled sample's prepare settings for end-to-end `litovis fit` runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def tiny_reference_dir() -> Path:
    """Tiny Ovis2.5 in the official checkpoint format, with the official implementation's outputs."""
    return ASSETS / "ovis_tiny_reference"


@pytest.fixture(scope="session")
def weights_tsv_9b() -> Path:
    """Every tensor name and shape of the official Ovis2.5-9B checkpoint."""
    return ASSETS / "ovis2_5_9b_weights.tsv"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The deterministic 512-id byte-level BPE tokenizer with the Qwen chat tokens."""
    from litovis.processing.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test in the repository root: the configs' and the sample's paths are relative to it."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture(scope="module")
def sample_prepare(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`configs/prepare/sample.yaml` writing into a temporary directory (one per test module: the
    first run that uses it prepares the data there, later runs of the module reuse it)."""
    root = tmp_path_factory.mktemp("prepared")
    prepare = yaml.safe_load((REPO / "configs/prepare/sample.yaml").read_text())
    prepare["output_dir"] = str(root / "sample")
    prepare["image_dir"] = str(root / "images")
    prepare["fetch"]["progress"] = False
    return prepare
