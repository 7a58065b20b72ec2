"""Synthetic optimizer steps for bench/train_step.py: random ids and pixels, reproducible.

Workload a is equal-length text; b and c are a challenge-like mix (60 % one image, 40 % long
text) packed by `TokenBudgetBatchSampler`'s best-fit within a 64-budget bucket and collated by
`collate_packed`, as the data module does. Imported by bench/train_step.py, not run on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from litovis.data.batching import EncodedSample, PackedBatch, collate_packed
from litovis.data.sampler import TokenBudgetBatchSampler
from litovis.model.tokens import IGNORE_INDEX, IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID

TASKS = ["text", "image"]
BUCKET_BUDGETS = 64  # the data module's default


@dataclass(frozen=True)
class Scale:
    """Sizes of the synthetic workloads."""

    preset: str
    text_length: int  # workload a: tokens per sample
    text_samples: int  # workload a: samples per step
    mix_samples: int  # workloads b/c: samples per step
    image_side: tuple[int, int]  # pixels, both multiples of 32
    question: tuple[int, int]  # prompt tokens of an image sample
    answer: tuple[int, int]  # trained tokens of a mix sample
    text_mix_length: tuple[int, int]  # tokens of a text sample of the mix
    budget: int  # default tokens per micro-batch
    image_share: float = 0.6


FULL = Scale("9b", 2048, 8, 16, (448, 1792), (20, 100), (50, 400), (300, 3000), 16384)
SMALL = Scale("tiny", 128, 8, 16, (64, 128), (4, 12), (5, 40), (30, 300), 1024)


def text_sample(name: str, rng: np.random.Generator, length: int, answer: int, vocab: int) -> EncodedSample:
    """`length` random ids; the last `answer` are trained (the first never is)."""
    ids = torch.from_numpy(rng.integers(0, vocab, length))
    labels = ids.clone()
    labels[: max(1, length - answer)] = IGNORE_INDEX
    return EncodedSample(name, "text", ids, labels)


def image_sample(name: str, rng: np.random.Generator, scale: Scale, vocab: int, pool: torch.Tensor) -> EncodedSample:
    """Header, one image span, question and a trained answer; pixels are rows of `pool`."""
    low, high = scale.image_side
    height, width = (int(rng.integers(low // 32, high // 32 + 1)) * 32 for _ in range(2))
    patches = (height // 16) * (width // 16)
    header, question = rng.integers(0, vocab, 3), rng.integers(0, vocab, int(rng.integers(*scale.question, endpoint=True)))
    answer = rng.integers(0, vocab, int(rng.integers(*scale.answer, endpoint=True)))
    span = [IMAGE_START_ID] + [VISUAL_ATOM_ID] * (patches // 4) + [IMAGE_END_ID]
    ids = torch.tensor([*header, *span, *question, *answer])
    labels = ids.clone()
    labels[: len(ids) - len(answer)] = IGNORE_INDEX
    grid = torch.tensor([[1, height // 16, width // 16]])
    return EncodedSample(name, "image", ids, labels, pool[:patches], grid)


def mix_samples(rng: np.random.Generator, scale: Scale, vocab: int, pool: torch.Tensor) -> list[EncodedSample]:
    """One step's challenge-like mix: exactly round(60 %) image samples, the rest text, shuffled."""
    n_images = round(scale.image_share * scale.mix_samples)
    items = [image_sample(f"img{i}", rng, scale, vocab, pool) for i in range(n_images)]
    for i in range(scale.mix_samples - n_images):
        length = int(rng.integers(*scale.text_mix_length, endpoint=True))
        answer = int(rng.integers(scale.answer[0], min(scale.answer[1], length // 2), endpoint=True))
        items.append(text_sample(f"txt{i}", rng, length, answer, vocab))
    return [items[i] for i in rng.permutation(len(items))]


def pack_step(items: list[EncodedSample], budget: int, pin: bool) -> list[PackedBatch]:
    """One optimizer step: micro-batches of at most `budget` tokens, `step_num_targets` set."""
    lengths = [item.input_ids.numel() for item in items]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=budget, shuffle=False, bucket_budgets=BUCKET_BUDGETS)
    batches = [collate_packed([items[i] for i in indices], TASKS) for indices in sampler]
    total = sum(b.num_targets for b in batches)
    for batch in batches:
        batch.step_num_targets = total
    return [b.pin_memory() for b in batches] if pin else batches


@dataclass
class Workload:
    """Warm-up and timed optimizer steps of one workload (micro-batches on the host)."""

    name: str
    loss_kind: str
    warmup: list[list[PackedBatch]]
    timed: list[list[PackedBatch]]


def make_workloads(scale: Scale, budget: int, warmup: int, steps: int, vocab: int, pin: bool) -> dict[str, Workload]:
    rng = np.random.default_rng(0)
    text = [pack_step([text_sample(f"t{i}", rng, scale.text_length, scale.text_length, vocab)
                       for i in range(scale.text_samples)], budget, pin) for _ in range(warmup + steps)]
    pool = torch.randn(scale.image_side[1] ** 2 // 256, 768, generator=torch.Generator().manual_seed(0))
    workloads = {"a": Workload("a", "ce", text[:warmup], text[warmup:])}
    try:
        mix = [pack_step(mix_samples(rng, scale, vocab, pool), budget, pin) for _ in range(warmup + steps)]
    except ValueError as err:  # a budget below the mix's longest sample still runs workload a
        print(f"no mix workloads at budget {budget}: {err}", flush=True)
        return workloads
    workloads["b"] = Workload("b", "ce", mix[:warmup], mix[warmup:])
    workloads["c"] = Workload("c", "dft", mix[:warmup], mix[warmup:])
    return workloads

