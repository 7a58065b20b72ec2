"""Packed and padded collation: layout, label alignment, visual order, device transfer."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin_memory

from litovis.data.batching import EncodedSample, PackedBatch, collate_packed
from litovis.model.tokens import IGNORE_INDEX, IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID

TASKS = ["captioning", "vqa", "chat"]


def make_sample(
    sid: str, task: str, prompt: int, answer: int, images: list[tuple[int, int, int]] = (), mark: float = 0.0
) -> EncodedSample:
    """A sample laid out like the processor's: prompt with visual spans, then the answer.

    Pixel rows of image j hold `mark + j`, so their order in a batch is checkable.
    """
    ids: list[int] = [1]
    pixels = []
    for j, (t, h, w) in enumerate(images):
        ids += [IMAGE_START_ID] + [VISUAL_ATOM_ID] * (t * h * w // 4) + [IMAGE_END_ID]
        pixels.append(torch.full((t * h * w, 768), mark + j))
    ids += list(range(10, 10 + prompt)) + list(range(100, 100 + answer))
    labels = [IGNORE_INDEX] * (len(ids) - answer) + ids[len(ids) - answer :]
    return EncodedSample(
        id=sid,
        task=task,
        input_ids=torch.tensor(ids),
        labels=torch.tensor(labels),
        pixel_values=torch.cat(pixels) if pixels else None,
        grid_thws=torch.tensor(images) if images else None,
    )


def three_samples() -> list[EncodedSample]:
    return [
        make_sample("a", "vqa", 3, 2, images=[(1, 2, 2), (1, 4, 2)], mark=10.0),
        make_sample("b", "chat", 5, 4),
        make_sample("c", "captioning", 2, 3, images=[(1, 2, 4)], mark=20.0),
    ]


def test_packed_row_layout_matches_each_sample() -> None:
    items = three_samples()
    batch = collate_packed(items, TASKS)
    lengths = [it.input_ids.numel() for it in items]
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (1, sum(lengths))
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch.max_seqlen == max(lengths)
    for s, item in enumerate(items):
        lo, hi = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        assert torch.equal(batch.input_ids[0, lo:hi], item.input_ids)
        assert torch.equal(batch.labels[0, lo:hi], item.labels)
        assert batch.position_ids[0, lo:hi].tolist() == list(range(hi - lo))
    assert batch.sample_ids == ["a", "b", "c"]
    assert batch.tasks == ["vqa", "chat", "captioning"]
    assert batch.sample_task_index.tolist() == [1, 2, 0]
    assert batch.num_targets == sum(int((it.labels[1:] != IGNORE_INDEX).sum()) for it in items) == 9


def test_packed_visuals_follow_row_order() -> None:
    batch = collate_packed(three_samples(), TASKS)
    assert batch.grid_thws.tolist() == [[1, 2, 2], [1, 4, 2], [1, 2, 4]]
    marks = batch.pixel_values[:, 0].tolist()
    assert marks == [10.0] * 4 + [11.0] * 8 + [20.0] * 8
    assert batch.pixel_values.shape == (20, 768)
    # Visual spans in the row appear in the same order as grid_thws rows.
    starts = (batch.input_ids[0] == IMAGE_START_ID).nonzero().flatten().tolist()
    assert len(starts) == batch.grid_thws.shape[0]


def test_text_only_batch_has_no_visuals() -> None:
    batch = collate_packed([make_sample("x", "chat", 3, 3), make_sample("y", "chat", 1, 1)], TASKS)
    assert batch.pixel_values is None and batch.grid_thws is None


def test_packed_rejects_sample_whose_first_label_is_a_target() -> None:
    bad = make_sample("bad-7", "chat", 2, 2)
    bad.labels[0] = 5
    try:
        collate_packed([make_sample("ok", "chat", 2, 2), bad], TASKS)
    except ValueError as err:
        assert "bad-7" in str(err) and "first label" in str(err)
    else:
        raise AssertionError("a first label != -100 must be refused")


def test_packed_rejects_unknown_task_and_inconsistent_visuals() -> None:
    for item, reason in [
        (make_sample("u", "poetry", 2, 2), "task vocabulary"),
        (make_sample("v", "vqa", 2, 2, images=[(1, 2, 2)]), "patches"),
    ]:
        if reason == "patches":
            item.pixel_values = item.pixel_values[:-1]
        try:
            collate_packed([item], TASKS)
        except ValueError as err:
            assert reason in str(err) and repr(item.id) in str(err)
        else:
            raise AssertionError(f"{reason} must be refused")


def test_unloadable_samples_are_left_out_and_counted() -> None:
    a, b, c = three_samples()
    batch = collate_packed([a, None, c], TASKS)
    assert batch.sample_ids == ["a", "c"] and batch.num_skipped == 1
    assert batch.cu_seqlens.tolist() == [0, a.input_ids.numel(), a.input_ids.numel() + c.input_ids.numel()]
    try:
        collate_packed([None, None], TASKS)
    except ValueError as err:
        assert "could be loaded" in str(err)
    else:
        raise AssertionError("a batch with nothing loadable must be refused")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 5)), min_size=1, max_size=8))
def test_shifted_packed_row_never_crosses_samples(shapes: list[tuple[int, int]]) -> None:
    items = [make_sample(str(i), "chat", p, a) for i, (p, a) in enumerate(shapes)]
    batch = collate_packed(items, TASKS)
    shifted = batch.labels[0, 1:]
    # Position t predicts labels[t + 1]; the last token of a sample must predict nothing.
    for boundary in batch.cu_seqlens[1:-1].tolist():
        assert int(shifted[boundary - 1]) == IGNORE_INDEX
    assert batch.num_targets == int((shifted != IGNORE_INDEX).sum())
    assert (batch.position_ids[0] == 0).sum() == len(items)


def test_packed_batch_moves_as_a_whole() -> None:
    batch = collate_packed(three_samples(), TASKS)
    moved = move_data_to_device(batch, torch.device("meta"))  # what Lightning's transfer hook does
    assert isinstance(moved, PackedBatch)
    fields = dataclasses.fields(PackedBatch)
    tensors = [f.name for f in fields if isinstance(getattr(batch, f.name), torch.Tensor)]
    assert len(tensors) == 7
    assert all(getattr(moved, name).device.type == "meta" for name in tensors)
    assert moved.cu_seqlens.dtype == torch.int32
    assert moved.sample_ids == batch.sample_ids and moved.max_seqlen == batch.max_seqlen
    assert batch.input_ids.device.type == "cpu"  # the original is untouched


def test_dataloader_pin_memory_uses_packed_batch_method(monkeypatch) -> None:
    pinned: list[int] = []

    def fake_pin(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # no accelerator on CI
        pinned.append(id(tensor))
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = collate_packed(three_samples(), TASKS)
    out = dataloader_pin_memory(batch)
    assert isinstance(out, PackedBatch) and out.sample_ids == batch.sample_ids
    assert len(pinned) == 7  # every tensor field, the optional visual ones included
    assert torch.equal(out.input_ids, batch.input_ids)


class PackedInWorker(torch.utils.data.Dataset):
    """One item: the three samples packed by `collate_packed`, wherever `__getitem__` runs."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[bool, torch.Tensor]:
        pixels = collate_packed(three_samples(), ["vqa", "chat", "captioning"]).pixel_values
        return pixels.is_shared(), pixels


def test_pixels_are_packed_into_shared_memory_inside_workers() -> None:
    """In a worker the packed pixels land in shared memory at once (no second copy at hand-over)."""
    in_main = collate_packed(three_samples(), ["vqa", "chat", "captioning"]).pixel_values
    assert in_main is not None and not in_main.is_shared()
    shared, from_worker = next(iter(torch.utils.data.DataLoader(PackedInWorker(), batch_size=None, num_workers=1)))
    assert shared
    assert torch.equal(from_worker, in_main)
