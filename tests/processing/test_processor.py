"""Tests for litovis.processing.processor: span expansion, labels, limits, measuring."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from litovis.model.tokens import IGNORE_INDEX, IMAGE_END_ID, IMAGE_START_ID, IMAGE_TOKEN_ID, VISUAL_ATOM_ID
from litovis.processing.chat import ConversationError
from litovis.processing.image import ImageLoadError
from litovis.processing.processor import (
    ImageCountError,
    OvisProcessor,
    SampleTooLongError,
)

TWO_IMAGES = [
    {"role": "user", "content": "<image>\nFirst, then <image> second. Differences?"},
    {"role": "assistant", "content": "The second is wider."},
]


@pytest.fixture
def processor(tiny_tokenizer) -> OvisProcessor:
    return OvisProcessor(tiny_tokenizer, min_pixels=1024, max_pixels=1792 * 1792)


def spans(input_ids: torch.Tensor) -> list[int]:
    """Atoms per visual span, checking each span is -301, -300 * n, -302."""
    ids = input_ids.tolist()
    result = []
    for start, token in enumerate(ids):
        if token == IMAGE_START_ID:
            end = ids.index(IMAGE_END_ID, start)
            assert set(ids[start + 1 : end]) == {VISUAL_ATOM_ID}
            result.append(end - start - 1)
    return result


def test_two_images_of_different_sizes_expand_to_their_atoms(processor, tiny_reference_dir):
    images = [tiny_reference_dir / "image_a.png", tiny_reference_dir / "image_b.png"]  # 96x64, 64x160
    sample = processor(TWO_IMAGES, images)
    assert sample.grid_thws.tolist() == [[1, 6, 4], [1, 4, 10]]
    assert spans(sample.input_ids) == [6 * 4 // 4, 4 * 10 // 4]
    assert sample.num_visual_atoms == 16 == int((sample.input_ids == VISUAL_ATOM_ID).sum())
    assert sample.pixel_values.shape == (24 + 40, 768) and sample.pixel_values.dtype == torch.float32
    assert IMAGE_TOKEN_ID not in sample.input_ids.tolist()
    assert sample.input_ids.dtype == sample.labels.dtype == torch.long
    assert sample.labels.shape == sample.input_ids.shape


def test_span_layout_matches_the_reference_sequence(processor, tiny_reference_dir):
    # The reference's row 0 holds image a then image b; its spans must have our lengths.
    expected = load_file(str(tiny_reference_dir / "expected.safetensors"))["input_ids"][0]
    sample = processor(TWO_IMAGES, [tiny_reference_dir / "image_a.png", tiny_reference_dir / "image_b.png"])
    assert spans(sample.input_ids) == spans(expected)


def test_visual_and_indicator_positions_are_never_trained(processor, tiny_reference_dir, tiny_tokenizer):
    sample = processor(TWO_IMAGES, [tiny_reference_dir / "image_a.png", tiny_reference_dir / "image_b.png"])
    visual = sample.input_ids < 0
    assert int(visual.sum()) == 16 + 4
    assert torch.all(sample.labels[visual] == IGNORE_INDEX)
    kept = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert tiny_tokenizer.decode(kept) == "The second is wider.<|im_end|>"
    trained = sample.labels != IGNORE_INDEX
    assert torch.equal(sample.labels[trained], sample.input_ids[trained])


def test_images_may_be_pil_path_or_bytes(processor, tiny_reference_dir):
    path = tiny_reference_dir / "image_c.png"
    messages = [{"role": "user", "content": "<image>What?"}]
    by_path = processor(messages, [path])
    by_str = processor(messages, [str(path)])
    by_bytes = processor(messages, [path.read_bytes()])
    by_pil = processor(messages, [Image.open(path)])
    for other in (by_str, by_bytes, by_pil):
        assert torch.equal(other.input_ids, by_path.input_ids)
        assert torch.equal(other.pixel_values, by_path.pixel_values)


def test_text_only_sample_has_no_pixels(processor):
    sample = processor([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert sample.pixel_values is None and sample.grid_thws is None
    assert sample.num_visual_atoms == 0 and sample.num_images == 0
    assert bool(torch.all(sample.input_ids >= 0))


@pytest.mark.parametrize("count", [1, 3])
def test_image_count_mismatch_raises(processor, tiny_reference_dir, count):
    with pytest.raises(ImageCountError, match=f"2 <image> marker\\(s\\) but {count} image"):
        processor(TWO_IMAGES, [tiny_reference_dir / "image_a.png"] * count, source="train.jsonl:4")


def test_sample_too_long_raises_with_length_and_limit(tiny_tokenizer, tiny_reference_dir):
    images = [tiny_reference_dir / "image_a.png", tiny_reference_dir / "image_b.png"]
    length = len(OvisProcessor(tiny_tokenizer, min_pixels=1024)(TWO_IMAGES, images))
    exact = OvisProcessor(tiny_tokenizer, min_pixels=1024, max_length=length)
    assert len(exact(TWO_IMAGES, images)) == length
    short = OvisProcessor(tiny_tokenizer, min_pixels=1024, max_length=length - 1)
    with pytest.raises(SampleTooLongError, match="row-7") as caught:
        short(TWO_IMAGES, images, source="row-7")
    assert isinstance(caught.value, ValueError)
    assert (caught.value.length, caught.value.limit) == (length, length - 1)


def test_bad_image_error_names_sample_and_image(processor):
    with pytest.raises(ImageLoadError, match="data.csv:12: image 0"):
        processor([{"role": "user", "content": "<image>?"}], [b"not an image"], source="data.csv:12")


def test_conversation_errors_propagate(processor):
    with pytest.raises(ConversationError):
        processor([{"role": "assistant", "content": "first"}])


def test_generation_prompt_and_think_policy(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    masked = OvisProcessor(tiny_tokenizer)(messages, add_generation_prompt=True)
    rendered = tiny_tokenizer.decode(masked.input_ids.tolist())
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert torch.all(masked.labels == IGNORE_INDEX)
    thinking = OvisProcessor(tiny_tokenizer)(messages, add_generation_prompt=True, enable_thinking=True)
    assert tiny_tokenizer.decode(thinking.input_ids.tolist()).endswith("<|im_start|>assistant\n")
    trained = OvisProcessor(tiny_tokenizer, think_block="trained")(
        [*messages, {"role": "assistant", "content": "Yo"}]
    )
    kept = trained.labels[trained.labels != IGNORE_INDEX].tolist()
    assert tiny_tokenizer.decode(kept) == "<think>\n\n</think>\n\nYo<|im_end|>"


def test_constructor_validates_and_repr_shows_settings(tiny_tokenizer):
    with pytest.raises(ValueError, match="think_block"):
        OvisProcessor(tiny_tokenizer, think_block="never")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        OvisProcessor(tiny_tokenizer, max_length=0)
    text = repr(OvisProcessor(tiny_tokenizer, max_pixels=1344 * 1792, max_length=4096))
    assert "OvisProcessor(" in text and "max_pixels=2408448" in text and "max_length=4096" in text
    assert "think_block='masked'" in text


def test_missing_image_path_is_named(processor, tmp_path):
    missing = tmp_path / "gone.png"
    with pytest.raises(ImageLoadError, match="image 0 .*gone.png"):
        processor([{"role": "user", "content": "<image>?"}], [missing])


def test_measure_equals_the_processed_sample(tiny_tokenizer) -> None:
    """Lengths and target counts from image headers alone match full processing."""

    from litovis.processing.image_size import read_image_size

    processor = OvisProcessor(tiny_tokenizer, min_pixels=32 * 32, max_pixels=256 * 256)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: width and height swap when loaded
    Image.new("RGB", (160, 64), "red").save(rotated, format="JPEG", exif=exif)
    plain = io.BytesIO()
    Image.new("RGB", (300, 100), "blue").save(plain, format="PNG")
    images = [rotated.getvalue(), plain.getvalue()]
    messages = [
        {"role": "user", "content": "<image> and <image> differ how?"},
        {"role": "assistant", "content": "one is red, one is blue"},
    ]
    processed = processor(messages, images)
    sizes = [read_image_size(image) for image in images]
    assert sizes[0] == (160, 64)
    length, targets = processor.measure(messages, sizes)
    assert length == len(processed)
    assert targets == int((processed.labels[1:] != -100).sum())
    prompt = processor(messages[:1], images, add_generation_prompt=True)
    assert processor.measure(messages[:1], sizes, add_generation_prompt=True)[0] == len(prompt)
