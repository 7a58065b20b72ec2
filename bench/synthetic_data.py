"""Write a prepared dataset of challenge-shaped samples with real-size images (for GPU runs).

    python bench/synthetic_data.py --out data/prepared/synthetic [--samples 320] [--workers 8]

60 % of the samples are image tasks (captioning, vqa) with one JPEG whose sides are random
multiples of 32 between 448 and 1792 px; 40 % are text tasks (summarization, text_qa,
math_reasoning) with 300-3,000-word inputs. Answers are 50-400 words. The files are
`train.parquet` and `val.parquet` in `--out` (the layout `litovis prepare` writes), so
`litovis fit --config configs/ovis2_5-9b/sft.yaml --data.prepare null --data.prepared_dir <out>`
trains on them. Words are random: this is for timing and memory, not for learning.
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from litovis.data.sample import Sample

WORDS = (
    "the image shows a document with text table figure total amount date invoice bill section "
    "purpose provision amend require establish question answer passage number step because "
    "therefore left right top bottom center red blue green mood calm bright"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_image(path: Path, height: int, width: int, seed: int) -> None:
    """A smooth random image (gradients + blocks): realistic JPEG sizes and decode cost."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [np.sin(x / rng.uniform(20, 200) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(20, 200)) for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 2) * 63).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_sample(index: int, out: Path, seed: int) -> Sample:
    rng = random.Random(seed * 1_000_003 + index)
    answer = words(rng, rng.randint(50, 400))
    if rng.random() < 0.6:
        height, width = (32 * rng.randint(14, 56) for _ in range(2))
        path = out / "images" / f"{index:06d}.jpg"
        write_image(path, height, width, seed + index)
        if rng.random() < 0.5:
            return Sample(id=str(index), task="captioning", images=[str(path)], target=answer, source=f"synthetic:{index}")
        fields = {"question": words(rng, rng.randint(20, 100))}
        return Sample(id=str(index), task="vqa", fields=fields, images=[str(path)], target=answer, source=f"synthetic:{index}")
    task = rng.choice(["summarization", "text_qa", "math_reasoning"])
    fields = {"text": words(rng, rng.randint(300, 3000)), "question": words(rng, rng.randint(10, 40))}
    return Sample(id=str(index), task=task, fields=fields, target=answer, source=f"synthetic:{index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--val", type=int, default=32, help="of which in val.parquet")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool:
        samples = list(pool.map(make_sample, range(args.samples), [args.out] * args.samples, [args.seed] * args.samples))
    records = [s.to_record() for s in samples]
    pd.DataFrame(records[args.val :]).to_parquet(args.out / "train.parquet")
    pd.DataFrame(records[: args.val]).to_parquet(args.out / "val.parquet")
    print(f"wrote {len(records) - args.val} train and {args.val} val samples to {args.out}")


if __name__ == "__main__":
    main()
