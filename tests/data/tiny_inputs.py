"""Small inputs the data tests build: images, parquet files, repository paths."""

from __future__ import annotations

import io
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS_YAML = REPO / "configs" / "prompts.yaml"
SAMPLE_DIR = REPO / "data" / "sample"


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 6), color=(200, 30, 30), mode="RGB") -> bytes:
    """A small solid-colour image encoded as `fmt`."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def write_parquet(rows: list[dict], path: Path, schema=None) -> Path:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
