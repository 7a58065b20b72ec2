"""Tests for litovis.processing.image: smart_resize, loading/conversion, patch order, reference parity."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from litovis.processing.image import (
    ImageAspectRatioError,
    ImageLoadError,
    ImagePreprocessor,
    ImageTooLargeError,
    image_patches,
    load_image,
    normalize_pixels,
    patchify,
    smart_resize,
    to_rgb,
)

MIN, MAX = 448 * 448, 1792 * 1792


# ---------------------------------------------------------------- reference parity


def test_reference_pixel_values_and_grids_are_reproduced(tiny_reference_dir):
    expected = load_file(str(tiny_reference_dir / "expected.safetensors"))
    # Rows of the reference are ordered image_a, image_b, image_c: its grid_thws say
    # (1, 6, 4) = 96x64, (1, 4, 10) = 64x160, (1, 6, 6) = 96x96, matching the files' sizes.
    preprocess = ImagePreprocessor(min_pixels=1024, max_pixels=1792 * 1792)
    rows, grids = [], []
    for name in ("image_a.png", "image_b.png", "image_c.png"):
        pixel_values, grid = preprocess(tiny_reference_dir / name)
        rows.append(pixel_values)
        grids.append(grid)
    assert torch.equal(torch.tensor(grids), expected["grid_thws"])
    pixel_values = torch.cat(rows)
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == expected["pixel_values"].shape == (100, 768)
    assert (pixel_values - expected["pixel_values"]).abs().max().item() < 1e-6


# ---------------------------------------------------------------- patch order


def _expected_patch_position(row: int, grid_w: int) -> tuple[int, int]:
    """(patch_row, patch_col) that row `row` must hold under 2x2-block order."""
    block, within = divmod(row, 4)
    block_row, block_col = divmod(block, grid_w // 2)
    return 2 * block_row + within // 2, 2 * block_col + within % 2


def test_patchify_uses_2x2_block_order_and_channel_major_rows():
    height, width = 64, 96  # 4 x 6 patches
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.stack([ys, xs, np.full_like(ys, 7)]).astype(np.float32)  # channel 0 = y, 1 = x
    rows, grid = patchify(pixels)
    assert grid == (1, 4, 6)
    assert rows.shape == (24, 768)
    local = torch.arange(16, dtype=torch.float32)
    for r in range(24):
        patch_row, patch_col = _expected_patch_position(r, 6)
        patch = rows[r].view(3, 16, 16)
        assert torch.equal(patch[0], (patch_row * 16 + local)[:, None].expand(16, 16))
        assert torch.equal(patch[1], (patch_col * 16 + local)[None, :].expand(16, 16))
        assert torch.all(patch[2] == 7)


def test_block_order_survives_the_whole_pipeline():
    height, width = 64, 96
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([2 * ys, 2 * xs, np.full_like(ys, 9)], axis=-1).astype(np.uint8)
    rows, grid = ImagePreprocessor(min_pixels=1024)(Image.fromarray(rgb))
    assert grid == (1, 4, 6)
    decoded = torch.round((rows + 1) / 2 * 255)  # undo normalization
    local = torch.arange(16, dtype=torch.float32)
    for r in range(24):
        patch_row, patch_col = _expected_patch_position(r, 6)
        patch = decoded[r].view(3, 16, 16)
        assert torch.equal(patch[0], (2 * (patch_row * 16 + local))[:, None].expand(16, 16))
        assert torch.equal(patch[1], (2 * (patch_col * 16 + local))[None, :].expand(16, 16))
        assert torch.all(patch[2] == 9)


def reference_patches(image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
    return patchify(normalize_pixels(image))


def test_image_patches_equal_the_reference_for_every_level_in_every_channel():
    y, x = np.mgrid[0:64, 0:256]
    levels = np.stack([(x + 7 * y + 85 * c) % 256 for c in range(3)], axis=-1).astype(np.uint8)
    image = Image.fromarray(levels, mode="RGB")
    assert all(len(np.unique(levels[..., c])) == 256 for c in range(3))
    got, grid = image_patches(image)
    expected, expected_grid = reference_patches(image)
    assert grid == expected_grid == (1, 4, 16)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("size", [(32, 32), (96, 64), (320, 448)])
def test_image_patches_equal_the_reference_on_random_and_decoded_images(size):
    width, height = size
    rng = np.random.default_rng(width * height)
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
    encoded = io.BytesIO()
    noise.save(encoded, format="JPEG", quality=80)
    decoded = load_image(encoded.getvalue())
    for image in (noise, decoded):
        got, grid = image_patches(image)
        expected, expected_grid = reference_patches(image)
        assert grid == expected_grid
        assert torch.equal(got, expected)


def test_image_patches_honour_patch_size_and_stride():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8), mode="RGB")
    got, grid = image_patches(image, patch_size=8, hidden_stride=3)
    expected, expected_grid = patchify(normalize_pixels(image), patch_size=8, hidden_stride=3)
    assert grid == expected_grid == (1, 6, 9)
    assert torch.equal(got, expected)


def test_image_patches_reject_non_rgb_and_off_grid_images():
    with pytest.raises(ValueError, match="RGB"):
        image_patches(Image.new("L", (32, 32)))
    with pytest.raises(ValueError, match="multiple of 32"):
        image_patches(Image.new("RGB", (48, 32)))


def test_patchify_rejects_sizes_that_are_not_block_multiples():
    with pytest.raises(ValueError, match="multiple of 32"):
        patchify(np.zeros((3, 48, 64), dtype=np.float32))


def test_normalize_maps_0_and_255_to_minus_one_and_one():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    values = normalize_pixels(image)
    assert values.shape == (3, 1, 1) and values.dtype == np.float32
    assert values[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1])


def test_resize_uses_bilinear():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8))
    rows, grid = ImagePreprocessor(min_pixels=1024)(image)
    assert grid == (1, 4, 6)
    height, width = 64, 96
    bilinear, _ = patchify(normalize_pixels(image.resize((width, height), Image.Resampling.BILINEAR)))
    bicubic, _ = patchify(normalize_pixels(image.resize((width, height), Image.Resampling.BICUBIC)))
    assert torch.equal(rows, bilinear)
    assert not torch.equal(rows, bicubic)


# ---------------------------------------------------------------- smart_resize


def test_tiny_images_scale_up_to_min_pixels():
    assert smart_resize(1, 1) == (448, 448)
    assert smart_resize(1, 1, min_pixels=1024) == (32, 32)
    h, w = smart_resize(10, 500)
    assert h % 32 == 0 and w % 32 == 0
    assert MIN <= h * w <= MAX
    assert w / h == pytest.approx(50, rel=0.05)


def test_huge_image_shrinks_below_max_pixels():
    h, w = smart_resize(10000, 10000)
    assert h == w and h % 32 == 0
    assert h * w <= MAX
    assert h >= 1792 - 32  # shrinks by one ratio, loses at most one factor to flooring


@pytest.mark.parametrize("size", [(448, 448), (640, 960), (1792, 1792), (512, 1024), (1024, 448)])
def test_exact_multiples_within_budget_are_unchanged(size):
    assert smart_resize(*size) == size


def test_aspect_ratio_above_200_raises():
    with pytest.raises(ImageAspectRatioError, match="aspect ratio 250"):
        smart_resize(10, 2500)
    with pytest.raises(ImageAspectRatioError):
        smart_resize(30000, 100)
    with pytest.raises(ImageAspectRatioError):
        smart_resize(1, 300)  # small side too: never silently distort
    h, w = smart_resize(32, 6400)  # exactly 200 is allowed
    assert (h, w) == (32, 6400)


def test_budget_too_small_for_the_aspect_raises():
    with pytest.raises(ImageAspectRatioError, match="cannot fit"):
        smart_resize(32, 6400, min_pixels=1024, max_pixels=32 * 32 * 4)


def test_max_pixels_wins_over_min_pixels():
    h, w = smart_resize(100, 170, min_pixels=50000, max_pixels=50000)
    assert h * w <= 50000 and h % 32 == 0 and w % 32 == 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(factor=0), dict(min_pixels=10, max_pixels=5), dict(min_pixels=0), dict(height=0), dict(width=-3)],
)
def test_invalid_arguments_raise(kwargs):
    args = dict(height=100, width=100) | kwargs
    with pytest.raises(ValueError):
        smart_resize(**args)


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 30000),
    log_aspect=st.floats(-math.log(200), math.log(200)),
    factor=st.sampled_from([28, 32]),
)
def test_results_are_multiples_within_budget(height, log_aspect, factor):
    width = max(1, round(height * math.exp(log_aspect)))
    if max(height, width) / min(height, width) > 200:
        return
    h, w = smart_resize(height, width, factor=factor)
    assert h % factor == 0 and w % factor == 0 and h > 0 and w > 0
    assert MIN <= h * w <= MAX


# ---------------------------------------------------------------- loading and conversion


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 20 high, 40 wide
    stored[0, :] = (255, 0, 0)  # top row red
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: display rotated 90 degrees clockwise
    loaded = load_image(_png_bytes(image, exif=exif.tobytes()))
    assert loaded.size == (20, 40)  # (w, h): now 40 high, 20 wide
    pixels = np.asarray(loaded)
    assert (pixels[:, -1] == (255, 0, 0)).all()  # the top row became the right column
    assert (pixels[:, 0] == 0).all()


def test_grayscale_becomes_equal_rgb_channels():
    gray = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L")
    rgb = np.asarray(load_image(_png_bytes(gray)))
    assert rgb.shape == (2, 2, 3)
    assert (rgb[..., 0] == [[0, 100], [200, 255]]).all()
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_rgba_and_la_composite_on_white():
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    rgb = np.asarray(load_image(_png_bytes(Image.fromarray(rgba, mode="RGBA")))).astype(int)
    assert rgb[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert rgb[0, 1].tolist() == [0, 0, 255]  # opaque kept
    assert all(abs(v - 127) <= 1 for v in rgb[0, 2])  # half-transparent black over white
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(la))[0].tolist() == [[255, 255, 255], [50, 50, 50]]


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    cmyk.save(buffer, format="TIFF")
    rgb = load_image(buffer.getvalue())
    assert rgb.mode == "RGB" and rgb.size == (3, 2)
    assert (np.asarray(rgb) == (255, 0, 0)).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    loaded = np.asarray(load_image(_png_bytes(Image.fromarray(values))))
    assert loaded[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert np.asarray(load_image(_png_bytes(palette)))[0].tolist() == [[255, 0, 0], [0, 255, 0]]
    transparent = np.asarray(load_image(_png_bytes(palette, transparency=0)))
    assert transparent[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_animated_image_yields_first_frame():
    frames = [Image.new("RGB", (8, 6), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    loaded = load_image(buffer.getvalue())
    assert loaded.size == (8, 6)
    assert (np.asarray(loaded) == (255, 0, 0)).all()


def test_corrupt_bytes_raise_an_error_naming_the_image():
    with pytest.raises(ImageLoadError, match="shard-3.parquet:17"):
        load_image(b"definitely not an image", name="shard-3.parquet:17")


def test_truncated_file_and_missing_file_name_the_path(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _png_bytes(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="broken.png"):
        load_image(broken)
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_pixel_cap_refuses_large_images(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 80)).save(path)
    with pytest.raises(ImageTooLargeError, match="big.png.*8000 pixels"):
        load_image(path, max_image_pixels=5000)
    assert load_image(path, max_image_pixels=8000).size == (100, 80)
    with pytest.raises(ImageTooLargeError):
        ImagePreprocessor(max_image_pixels=5000)(Image.new("RGB", (100, 80)))


def test_preprocessor_names_the_image_on_aspect_errors():
    with pytest.raises(ImageAspectRatioError, match="sample-9"):
        ImagePreprocessor()(Image.new("RGB", (3000, 10)), name="sample-9")


def test_preprocessor_rejects_unsupported_geometry():
    with pytest.raises(ValueError, match="temporal_patch_size"):
        ImagePreprocessor(temporal_patch_size=2)
    with pytest.raises(ValueError, match="min_pixels"):
        ImagePreprocessor(min_pixels=10, max_pixels=5)
