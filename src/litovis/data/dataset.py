"""`SampleDataset`: prepared `Sample`s → model inputs, lazily, inside DataLoader workers.

Each item renders the task prompt (`litovis.data.prompts`, the same templates for training and
inference), loads and patchifies its images and tokenizes the conversation (`OvisProcessor`).
`measure_samples` computes every sample's exact length and target count up front from text and
image headers only, so over-long samples and decompression bombs are dropped (train/val) or refused
(test) before training starts, and the batch sampler can budget tokens without decoding a single
image. Under DDP/FSDP each rank measures its share and gathers the others'. A training image
that breaks after measuring makes its item None (skipped by the collators).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from litovis.data.batching import EncodedSample
from litovis.data.drops import DropReport
from litovis.data.prompts import PromptError, Template, render_messages
from litovis.data.sample import Sample
from litovis.processing.chat import ConversationError
from litovis.processing.image import ImageAspectRatioError, ImageLoadError
from litovis.processing.image_size import read_image_size
from litovis.processing.processor import ImageCountError, OvisProcessor

log = logging.getLogger(__name__)

#: Errors that make one sample unusable without saying anything about the others.
SAMPLE_ERRORS = (ImageLoadError, ImageAspectRatioError, ImageCountError, ConversationError, PromptError)


@dataclass
class MeasuredSamples:
    """Samples that fit, with their exact sizes.

    Attributes:
        samples: kept samples, in input order.
        lengths: tokens of each kept sample (visual spans included).
        num_targets: loss-taking tokens of each kept sample.
    """

    samples: list[Sample]
    lengths: list[int]
    num_targets: list[int]


class TestSampleError(ValueError):
    """A test (prediction) sample cannot be processed; test rows are never dropped."""


Measure = tuple[int, int] | tuple[str, str]
"""One sample's measurement: `(length, targets)`, or `(reason, detail)` when it cannot be used."""

AllGather = Callable[[list[Measure]], list[list[Measure]]]
"""Every rank's list, in rank order, given this rank's (`torch.distributed.all_gather_object`)."""


def _measure_one(sample: Sample, processor: OvisProcessor, templates: Mapping[str, Template], generation: bool,
                 enable_thinking: bool, shared: bool) -> Measure:
    try:
        messages = render_messages(sample, templates, include_target=not generation)
        cap = processor.image_preprocessor.max_image_pixels  # bombs are refused here, not at load time
        sizes = [
            read_image_size(image, name=f"{sample.source} image {i}", max_image_pixels=cap)
            for i, image in enumerate(sample.images)
        ]
        return processor.measure(messages, sizes, add_generation_prompt=generation, enable_thinking=enable_thinking)
    except SAMPLE_ERRORS as err:
        return type(err).__name__, str(err)
    except Exception as err:
        if not shared:
            raise
        # Raised on every rank after the gather: the other ranks would otherwise wait in it forever.
        return "unexpected", f"{type(err).__name__}: {err}"


def measure_samples(
    samples: Sequence[Sample],
    processor: OvisProcessor,
    templates: Mapping[str, Template],
    report: DropReport,
    generation: bool = False,
    stage: str = "measure",
    enable_thinking: bool = False,
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather | None = None,
) -> MeasuredSamples:
    """Exact length and targets of every sample; unusable or over-long ones are dropped and reported.

    With `generation=True` (prompts for prediction) nothing may be dropped: every failure is
    collected and raised together as `TestSampleError`. `enable_thinking` must be the
    `SampleDataset`'s (it decides whether a generation prompt carries the empty think block), so
    the lengths measured here are the lengths the dataset produces.

    Several processes share the work: rank r measures samples r, r + world_size, ..., and
    `all_gather` hands every rank all the measurements, so each ends with the same result and the
    same report. A sample that fails unexpectedly (a bug, not bad data) raises on every rank.
    """
    shared = world_size > 1
    if shared and all_gather is None:
        raise ValueError("measuring over several ranks needs all_gather")
    mine = [_measure_one(s, processor, templates, generation, enable_thinking, shared)
            for s in samples[rank::world_size]]
    shards = all_gather(mine) if shared else [mine]
    kept = MeasuredSamples([], [], [])
    failures: list[str] = []
    limit = processor.max_length
    for index, sample in enumerate(samples):
        first, second = shards[index % world_size][index // world_size]
        name = sample.source or sample.id
        if first == "unexpected":
            raise RuntimeError(f"measuring {name} failed: {second}")
        if isinstance(first, str):
            reason, detail = first, second
        elif limit is not None and first > limit:
            reason, detail = "too_long", f"{first} tokens > max_length {limit}"
        elif not generation and second == 0:
            reason, detail = "no_targets", "nothing to train on"
        else:
            kept.samples.append(sample)
            kept.lengths.append(first)
            kept.num_targets.append(second)
            report.keep(stage)
            continue
        if generation:
            failures.append(f"{name}: {reason}: {detail}")
        else:
            report.drop(stage, reason, name, detail)
    if failures:
        shown = "\n  ".join(failures[:20])
        raise TestSampleError(f"{len(failures)} test sample(s) cannot be processed (test rows are never dropped):\n  {shown}")
    return kept


class SampleDataset(Dataset[EncodedSample | None]):
    """Lazily processed samples.

    Args:
        samples: prepared samples (images as local paths).
        processor: the processor matching the model.
        templates: task prompt templates.
        generation: build prompts for generation (no target, generation prompt appended).
        enable_thinking: with `generation`, let the model think before answering.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        processor: OvisProcessor,
        templates: Mapping[str, Template],
        generation: bool = False,
        enable_thinking: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.processor = processor
        self.templates = templates
        self.generation = generation
        self.enable_thinking = enable_thinking

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> EncodedSample | None:
        sample = self.samples[index]
        try:
            return self.encode(sample)
        except (ImageLoadError, ImageAspectRatioError) as err:
            if self.generation:
                raise
            # The image measured fine but broke or changed since: skip the sample, loudly.
            log.warning("skipping sample %s: %s", sample.id, err)
            return None

    def encode(self, sample: Sample) -> EncodedSample:
        """Process one sample into model inputs (errors name the sample's source)."""
        messages = render_messages(sample, self.templates, include_target=not self.generation)
        processed = self.processor(
            messages,
            sample.images,
            add_generation_prompt=self.generation,
            enable_thinking=self.enable_thinking,
            source=sample.source or sample.id,
        )
        return EncodedSample(
            id=sample.id,
            task=sample.task,
            input_ids=processed.input_ids,
            labels=processed.labels,
            pixel_values=processed.pixel_values,
            grid_thws=processed.grid_thws,
        )
