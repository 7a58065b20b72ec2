"""Collation: encoded training/validation samples -> one padding-free packed row.

`collate_packed` concatenates micro-batch samples into a single row `[1, N]` with no padding at all,
so every computed position is a real token; attention is kept inside each sample by `cu_seqlens`
(and `position_ids` restarting at 0). Because every sample's first label is -100, the whole row can
be shifted at once without a sample predicting its neighbour's first token. (Generation prompts
are padded by the processor, `OvisProcessor.pad_for_generation`.)

A dataset may return None for a sample that measured fine but failed to load (it reports it); the
collator leaves such items out, counts them in `num_skipped`, and refuses a batch left empty.

`PackedBatch` is a dataclass with `to()` and `pin_memory()`, so both the DataLoader's pin-memory
thread and Lightning's `transfer_batch_to_device` (which calls `.to()` on any object that has one)
move it as a whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from litovis.model.tokens import IGNORE_INDEX, VISUAL_ATOM_ID


@dataclass
class EncodedSample:
    """One processed sample, as a training/evaluation Dataset's `__getitem__` returns it.

    Attributes:
        id: sample id (carried into the batch for logging and prediction writers).
        task: task name, e.g. `captioning` (per-task losses).
        input_ids: `[L]` long, tokenizer ids plus expanded visual spans.
        labels: `[L]` long, unshifted, -100 where no loss is taken.
        pixel_values: `[P, 768]` patches of all images of the sample in span order, or None.
        grid_thws: `[I, 3]` (t, h, w) in patches per image, or None.
    """

    id: str
    task: str
    input_ids: Tensor
    labels: Tensor
    pixel_values: Tensor | None = None
    grid_thws: Tensor | None = None


@dataclass
class PackedBatch:
    """One micro-batch packed into a single row (model input contract, packed mode).

    Attributes:
        input_ids: `[1, N]` long, the samples back to back.
        labels: `[1, N]` long, unshifted; each sample's first label is -100.
        position_ids: `[1, N]` long, restarting at 0 for each sample.
        cu_seqlens: `[S + 1]` int32, cumulative sample boundaries (0, l1, l1 + l2, ..., N).
        max_seqlen: length of the longest sample.
        pixel_values: `[P, 768]` of all images in row order, or None when no sample has images.
        grid_thws: `[I, 3]` long, one row per image in row order, or None.
        sample_ids: the S sample ids, in row order.
        tasks: the S task names, in row order.
        sample_task_index: `[S]` long, index of each sample's task in the collator's task vocabulary.
        num_targets: number of positions that take a loss once the row is shifted (labels[1:] != -100).
        step_num_targets: targets of all micro-batches of this optimizer step on this rank; filled in
            by `ResumableDataLoader` (None until then). Under DDP the trainer all-reduces it.
        num_skipped: samples of the micro-batch that the dataset could not load (None items).
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    pixel_values: Tensor | None
    grid_thws: Tensor | None
    sample_ids: list[str]
    tasks: list[str]
    sample_task_index: Tensor
    num_targets: int
    step_num_targets: int | None = None
    num_skipped: int = 0

    @property
    def num_tokens(self) -> int:
        """Positions in the row (all real tokens)."""
        return self.input_ids.shape[1]

    def _map_tensors(self, fn: Any) -> PackedBatch:
        changes = {
            f.name: fn(value)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> PackedBatch:
        """A copy with every tensor on `device` (asynchronous for CUDA targets by default)."""
        device = torch.device(device)
        if non_blocking is None:
            non_blocking = device.type == "cuda"
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """A copy with every tensor in page-locked memory (called by the DataLoader's pin thread)."""
        return self._map_tensors(lambda t: t.pin_memory())


def _check_visuals(item: EncodedSample) -> int:
    """Validate one sample's visual tensors against its spans; returns its image count."""
    if (item.pixel_values is None) != (item.grid_thws is None):
        raise ValueError(f"sample {item.id!r}: pixel_values and grid_thws must both be set or both None")
    atoms = int((item.input_ids == VISUAL_ATOM_ID).sum())
    if item.grid_thws is None:
        if atoms:
            raise ValueError(f"sample {item.id!r}: {atoms} visual atoms in input_ids but no images")
        return 0
    patches = int(item.grid_thws.prod(dim=1).sum())
    if item.pixel_values.shape[0] != patches:
        raise ValueError(
            f"sample {item.id!r}: pixel_values has {item.pixel_values.shape[0]} rows but grid_thws "
            f"describes {patches} patches"
        )
    if atoms * 4 != patches:
        raise ValueError(
            f"sample {item.id!r}: {atoms} visual atoms in input_ids but grid_thws describes "
            f"{patches} patches (expected patches / 4 atoms)"
        )
    return item.grid_thws.shape[0]


def _check_text(item: EncodedSample) -> None:
    if item.input_ids.dim() != 1 or item.labels.shape != item.input_ids.shape:
        raise ValueError(
            f"sample {item.id!r}: input_ids {tuple(item.input_ids.shape)} and labels "
            f"{tuple(item.labels.shape)} must be 1-D and of equal length"
        )
    if item.input_ids.numel() == 0:
        raise ValueError(f"sample {item.id!r}: empty input_ids")


def _loaded(items: Sequence[EncodedSample | None]) -> list[EncodedSample]:
    """The items the dataset could load; an empty batch is an error."""
    loaded = [item for item in items if item is not None]
    if not loaded:
        raise ValueError(
            f"none of the {len(items)} sample(s) of this batch could be loaded (see the dataset's warnings)"
        )
    return loaded


def _cat_for_handover(tensors: list[Tensor]) -> Tensor:
    """`torch.cat`, straight into shared memory inside a DataLoader worker.

    A worker hands its batch to the main process through shared memory; concatenating there (as
    torch's `default_collate` does) saves copying the batch's pixels a second time.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype).share_memory_()
    return torch.cat(tensors, out=out)


def _concat_visuals(items: Sequence[EncodedSample]) -> tuple[Tensor | None, Tensor | None]:
    with_images = [it for it in items if it.pixel_values is not None]
    if not with_images:
        return None, None
    pixel_values = _cat_for_handover([it.pixel_values for it in with_images])  # type: ignore[misc]
    grid_thws = torch.cat([it.grid_thws for it in with_images]).long()  # type: ignore[misc]
    return pixel_values, grid_thws


def collate_packed(items: Sequence[EncodedSample | None], task_vocab: Sequence[str]) -> PackedBatch:
    """Pack `items` into one padding-free row, in the given order.

    Args:
        items: the micro-batch's samples; None (a sample the dataset failed to load) is left out.
        task_vocab: fixed list of task names; `sample_task_index` indexes into it.

    Raises:
        ValueError: a sample's first label is not -100 (shifting the packed row would then make
            the previous sample predict it), its tensors are inconsistent, or its task is unknown;
            or no sample could be loaded.
    """
    loaded = _loaded(items)
    num_skipped, items = len(items) - len(loaded), loaded
    task_position = {task: i for i, task in enumerate(task_vocab)}
    for item in items:
        _check_text(item)
        if int(item.labels[0]) != IGNORE_INDEX:
            raise ValueError(
                f"sample {item.id!r}: first label is {int(item.labels[0])}, must be {IGNORE_INDEX} "
                "(a packed row is shifted as a whole; every sample must start with a prompt token)"
            )
        if item.task not in task_position:
            raise ValueError(
                f"sample {item.id!r}: task {item.task!r} is not in the task vocabulary {list(task_vocab)}"
            )
        _check_visuals(item)

    lengths = [item.input_ids.numel() for item in items]
    input_ids = torch.cat([item.input_ids for item in items]).long().unsqueeze(0)
    labels = torch.cat([item.labels for item in items]).long().unsqueeze(0)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).unsqueeze(0)
    cu_seqlens = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0)
    pixel_values, grid_thws = _concat_visuals(items)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        pixel_values=pixel_values,
        grid_thws=grid_thws,
        sample_ids=[item.id for item in items],
        tasks=[item.task for item in items],
        sample_task_index=torch.tensor([task_position[item.task] for item in items], dtype=torch.long),
        # The first label of every sample is -100, so the unshifted count equals the shifted one.
        num_targets=int((labels != IGNORE_INDEX).sum()),
        num_skipped=num_skipped,
    )
