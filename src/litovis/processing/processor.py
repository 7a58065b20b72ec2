"""`OvisProcessor`: one conversation and its images -> Ovis2.5 model inputs.

It renders and tokenizes the conversation (`chat`), preprocesses each image (`image`), and expands
every image placeholder into its visual span `[-301] + [-300] * n + [-302]` with
`n = t*h*w / hidden_stride**2` (h, w in patches); visual and indicator positions get label -100.
Labels stay unshifted. A sample longer than `max_length` raises `SampleTooLongError`: nothing is
ever truncated, least of all inside an image span.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike

import torch

from litovis.model.tokens import (
    IGNORE_INDEX,
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    VISUAL_ATOM_ID,
)
from litovis.processing.chat import ThinkBlock, count_image_markers, tokenize_chat, validate_think_block
from litovis.processing.image import DEFAULT_MAX_IMAGE_PIXELS, ImagePreprocessor, ImageSource


class SampleTooLongError(ValueError):
    """A processed sample is longer than the allowed maximum.

    Attributes:
        length: tokens in the sample after image expansion.
        limit: the maximum allowed.
    """

    def __init__(self, length: int, limit: int, source: str = "") -> None:
        where = f"{source}: " if source else ""
        super().__init__(
            f"{where}sample has {length} tokens after image expansion, more than max_length={limit}"
        )
        self.length = length
        self.limit = limit
        self.source = source


class ImageCountError(ValueError):
    """The number of images differs from the number of `<image>` markers."""


@dataclass
class ProcessedSample:
    """Model inputs for one sample.

    Attributes:
        input_ids: `[L]` long; tokenizer ids and expanded visual spans.
        labels: `[L]` long, unshifted; -100 on prompt, visual and indicator positions.
        pixel_values: `[P, 768]` float32, the sample's images in span order; None if text-only.
        grid_thws: `[I, 3]` long, (t, h, w) in patches per image; None if text-only.
        num_visual_atoms: total visual atoms (-300 positions) over all images.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    grid_thws: torch.Tensor | None
    num_visual_atoms: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        """Number of images (visual spans)."""
        return 0 if self.grid_thws is None else int(self.grid_thws.shape[0])


class OvisProcessor:
    """Turns one conversation plus its images into `ProcessedSample` model inputs.

    Args:
        tokenizer: Hugging Face tokenizer with the Qwen chat tokens (`<|im_start|>`, ...).
        min_pixels: smallest resized image area (official 448*448).
        max_pixels: largest resized image area, a hard budget (official inference 1792*1792).
        patch_size: ViT patch side in pixels (Ovis2.5: 16).
        hidden_stride: patches merged per side into one visual atom (Ovis2.5: 2).
        temporal_patch_size: frames per temporal patch (Ovis2.5: 1, the only supported value).
        max_length: longest allowed sample after image expansion; None = unlimited.
        think_block: how answers without reasoning are written and trained
            ("masked" = official, "trained", "omitted"; see `litovis.processing.chat`).
        max_image_pixels: decompression-bomb cap on source images (None = no cap).
    """

    def __init__(
        self,
        tokenizer,
        min_pixels: int = 448 * 448,
        max_pixels: int = 1792 * 1792,
        patch_size: int = 16,
        hidden_stride: int = 2,
        temporal_patch_size: int = 1,
        max_length: int | None = None,
        think_block: ThinkBlock = "masked",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive or None, got {max_length}")
        validate_think_block(think_block)
        self.tokenizer = tokenizer
        self.image_preprocessor = ImagePreprocessor(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            patch_size=patch_size,
            hidden_stride=hidden_stride,
            temporal_patch_size=temporal_patch_size,
            max_image_pixels=max_image_pixels,
        )
        self.max_length = max_length
        self.think_block = think_block

    def __repr__(self) -> str:
        ip = self.image_preprocessor
        return (
            f"{type(self).__name__}(tokenizer={type(self.tokenizer).__name__}(vocab={len(self.tokenizer)}), "
            f"min_pixels={ip.min_pixels}, max_pixels={ip.max_pixels}, patch_size={ip.patch_size}, "
            f"hidden_stride={ip.hidden_stride}, temporal_patch_size={ip.temporal_patch_size}, "
            f"max_length={self.max_length}, think_block={self.think_block!r}, "
            f"max_image_pixels={ip.max_image_pixels})"
        )

    def num_atoms(self, grid_thw: Sequence[int]) -> int:
        """Visual atoms (2x2 patch blocks) of an image with patch grid (t, h, w)."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.image_preprocessor.hidden_stride**2

    def __call__(
        self,
        messages: Sequence[Mapping[str, object]],
        images: Sequence[ImageSource] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = False,
        source: str = "",
    ) -> ProcessedSample:
        """Process one conversation.

        Args:
            messages: `[{"role", "content"}]`; `<image>` markers mark where images go.
            images: one image per marker, in order: PIL images, paths or encoded bytes.
            add_generation_prompt: end with the assistant header (inference).
            enable_thinking: with `add_generation_prompt`, let the model think first.
            source: how errors name the sample (e.g. `file:row`).

        Raises:
            ImageCountError: markers and images differ in number.
            SampleTooLongError: the expanded sample exceeds `max_length`.
            ConversationError, ImageLoadError, ImageAspectRatioError: bad conversation or image.
        """
        where = f"{source}: " if source else ""
        images = list(images or [])
        markers = count_image_markers(messages)
        if markers != len(images):
            raise ImageCountError(
                f"{where}conversation has {markers} <image> marker(s) but {len(images)} image(s)"
            )
        chat = self._tokenize(messages, add_generation_prompt, enable_thinking)
        patches, grids = [], []
        for index, image in enumerate(images):
            name = f"{where}image {index}" + (f" ({image})" if isinstance(image, (str, PathLike)) else "")
            pixel_values, grid = self.image_preprocessor(image, name=name)
            patches.append(pixel_values)
            grids.append(grid)
        input_ids, labels, atoms = self._expand(chat.input_ids, chat.labels, grids)
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise SampleTooLongError(len(input_ids), self.max_length, source)
        return ProcessedSample(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=(patches[0] if len(patches) == 1 else torch.cat(patches)) if patches else None,
            grid_thws=torch.tensor(grids, dtype=torch.long) if grids else None,
            num_visual_atoms=atoms,
        )

    def measure(
        self,
        messages: Sequence[Mapping[str, object]],
        image_sizes: Sequence[tuple[int, int]],
        add_generation_prompt: bool = False,
        enable_thinking: bool = False,
    ) -> tuple[int, int]:
        """(tokens, trained targets) of a sample without touching pixels, from source image sizes.

        Equals `len(self(...))` and the number of labels != -100 after the first position, so
        batches can be budgeted before any image is decoded.
        """
        if count_image_markers(messages) != len(image_sizes):
            raise ImageCountError(
                f"conversation has {count_image_markers(messages)} <image> marker(s) but {len(image_sizes)} image size(s)"
            )
        chat = self._tokenize(messages, add_generation_prompt, enable_thinking)
        length = len(chat.input_ids)
        patch = self.image_preprocessor.patch_size
        for height, width in image_sizes:
            h, w = self.image_preprocessor.target_size(height, width)
            length += self.num_atoms((1, h // patch, w // patch)) + 1  # the placeholder becomes atoms + 2
        targets = sum(1 for label in chat.labels[1:] if label != IGNORE_INDEX)
        return length, targets

    def _tokenize(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool, enable_thinking: bool):
        return tokenize_chat(
            messages,
            self.tokenizer,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            think_block=self.think_block,
        )

    def _expand(
        self, ids: list[int], labels: list[int], grids: list[tuple[int, int, int]]
    ) -> tuple[list[int], list[int], int]:
        out_ids: list[int] = []
        out_labels: list[int] = []
        spans = iter(grids)
        total_atoms = 0
        for token, label in zip(ids, labels, strict=True):
            if token != IMAGE_TOKEN_ID:
                out_ids.append(token)
                out_labels.append(label)
                continue
            atoms = self.num_atoms(next(spans))
            total_atoms += atoms
            out_ids.extend([IMAGE_START_ID, *([VISUAL_ATOM_ID] * atoms), IMAGE_END_ID])
            out_labels.extend([IGNORE_INDEX] * (atoms + 2))
        return out_ids, out_labels, total_atoms
