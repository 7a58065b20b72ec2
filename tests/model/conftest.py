"""Fixtures for the model tests: the tiny reference model and its expected outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litovis.model.checkpoint import build_ovis, load_ovis
from litovis.model.ovis import Ovis2_5
from litovis.model.presets import preset


@pytest.fixture(scope="session")
def expected(tiny_reference_dir: Path) -> dict[str, torch.Tensor]:
    """What the official implementation computed for the tiny reference model."""
    return load_file(tiny_reference_dir / "expected.safetensors")


@pytest.fixture(scope="session")
def reference_model(tiny_reference_dir: Path) -> Ovis2_5:
    """The tiny reference checkpoint loaded in float32 (shared: tests must not modify it)."""
    model, _ = load_ovis(tiny_reference_dir, dtype=torch.float32)
    return model


@pytest.fixture(scope="session")
def tiny_model_f64() -> Ovis2_5:
    """A tiny random model in float64 (no near-ties between paths that differ only in rounding)."""
    torch.manual_seed(0)
    return build_ovis(preset("tiny"), dtype=torch.float64).eval()
