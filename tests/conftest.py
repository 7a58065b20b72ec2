"""Shared test fixtures: paths to the committed reference assets."""

from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def tiny_reference_dir() -> Path:
    """Tiny Ovis2.5 in the official checkpoint format, with the official implementation's outputs."""
    return ASSETS / "ovis_tiny_reference"


@pytest.fixture(scope="session")
def weights_tsv_9b() -> Path:
    """Every tensor name and shape of the official Ovis2.5-9B checkpoint."""
    return ASSETS / "ovis2_5_9b_weights.tsv"
