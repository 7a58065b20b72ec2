"""Image preprocessing for Ovis2.5: load, resize to a patch grid, normalize, patchify.

The pipeline matches the official Ovis2.5 preprocessing: `smart_resize` picks a size whose sides
are multiples of `patch_size * hidden_stride` (32) within a pixel budget, the image is resized
with PIL bilinear, rescaled by 1/255, normalized with mean = std = 0.5, and cut into 16x16
patches in *2x2-block order*: four consecutive rows of `pixel_values` are one 2x2 block of
patches (top-left, top-right, bottom-left, bottom-right), blocks row-major over the grid. Each
row is one patch flattened channel-major (C, then temporal, then patch rows, then patch columns),
so it can be viewed as `[3, 16, 16]` by the ViT's Conv2d patch embedding. `normalize_pixels` and
`patchify` spell these steps out; the preprocessor runs `image_patches`, which gives the same bits
several times faster (it reorders uint8 pixels before converting them).

Notable choices (each differs from the official code, which would silently do otherwise):
- An aspect ratio above 200 raises `ImageAspectRatioError`; the official code squeezes the long
  side to 200x the short side, distorting the image.
- `max_pixels` is a hard budget: when rounding up to reach `min_pixels` would exceed it, the
  smaller (floor) size is used.
- Transparent images are composited on white (official: alpha dropped), 16-bit images are scaled
  to 8 bits (Pillow's `convert` would clip), EXIF orientation is applied.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | PathLike | bytes | bytearray | memoryview | Image.Image

#: Images with more pixels than this are refused before decoding (decompression-bomb guard).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
#: Largest long-side / short-side ratio the official preprocessing accepts undistorted.
MAX_ASPECT_RATIO = 200.0
#: Official resampling filter (Ovis2.5's image processor config: bilinear).
RESAMPLE = Image.Resampling.BILINEAR
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """An image could not be read or converted; the message names the image."""


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than the configured cap (decompression-bomb guard)."""


class ImageAspectRatioError(ValueError):
    """An image is too elongated to be resized without distortion."""


def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = 448 * 448,
    max_pixels: int = 1792 * 1792,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> tuple[int, int]:
    """Target (height, width) for an image: multiples of `factor`, aspect kept, pixels budgeted.

    Steps (official Ovis2.5 rules): a side shorter than `factor` is scaled up to `factor` with
    the other side scaled by the same ratio; both sides are rounded to multiples of `factor`; if
    the area exceeds `max_pixels` both sides shrink by one ratio and round down, if it is below
    `min_pixels` they grow by one ratio and round up (unless that breaks `max_pixels`, which wins).

    Raises:
        ValueError: on non-positive sizes or factor, or `min_pixels > max_pixels`.
        ImageAspectRatioError: when max(h, w) / min(h, w) > `max_aspect_ratio`, or when the budget
            is too small to give the short side even one `factor`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width} (h x w)")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if min_pixels <= 0 or max_pixels <= 0 or min_pixels > max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    aspect = max(height, width) / min(height, width)
    if aspect > max_aspect_ratio:
        raise ImageAspectRatioError(
            f"image {height}x{width} (h x w) has aspect ratio {aspect:.1f} > {max_aspect_ratio:g}; "
            "crop or pad it first (resizing it would distort it)"
        )
    h, w = float(height), float(width)
    if h < factor or w < factor:
        scale = factor / min(h, w)
        h, w = (factor, round(w * scale)) if h < w else (round(h * scale), factor)

    h_bar = round(h / factor) * factor
    w_bar = round(w / factor) * factor
    if h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        h_bar = math.floor(h / beta / factor) * factor
        w_bar = math.floor(w / beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        raise ImageAspectRatioError(
            f"image {height}x{width} (h x w) cannot fit max_pixels={max_pixels} with sides that are "
            f"multiples of {factor}; raise max_pixels or crop the image"
        )
    return h_bar, w_bar


def source_label(source: ImageSource, name: str | None) -> str:
    """How errors name an image: `name`, else its path, else its size in bytes."""
    if name:
        return name
    if isinstance(source, (str, PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return "<PIL image>"


def check_pixel_count(image: Image.Image, label: str, max_image_pixels: int | None) -> None:
    """Raise `ImageTooLargeError` when an opened (not yet decoded) image exceeds the pixel cap."""
    if max_image_pixels is not None and image.width * image.height > max_image_pixels:
        raise ImageTooLargeError(
            f"{label}: {image.width}x{image.height} (w x h) = {image.width * image.height} pixels "
            f"exceeds the cap of {max_image_pixels}"
        )


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255; scale the full range to 8 bits instead.
    values = np.asarray(image, dtype=np.float64)
    eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def to_rgb(image: Image.Image, name: str = "<PIL image>") -> Image.Image:
    """An RGB copy of `image` with EXIF orientation applied and alpha composited on white.

    Handles palette (with or without transparency), grayscale, grayscale+alpha, RGBA, CMYK,
    16-bit and other Pillow modes; an animated image yields its current (first) frame.
    """
    try:
        oriented = ImageOps.exif_transpose(image)
        if oriented is None:
            oriented = image
        if oriented.mode in _SIXTEEN_BIT_MODES:
            return _sixteen_bit_to_rgb(oriented)
        if oriented.mode in _ALPHA_MODES or (
            oriented.mode in ("P", "L", "RGB") and "transparency" in oriented.info
        ):
            rgba = oriented.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if oriented.mode == "RGB":
            return oriented.copy() if oriented is image else oriented
        return oriented.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageLoadError(f"{name}: cannot convert {image.mode} image to RGB: {err}") from err


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open a path, raw bytes or PIL image and return it as a fully loaded RGB image.

    Args:
        source: file path, encoded image bytes, or an already opened PIL image.
        name: how errors refer to the image (e.g. the sample's `file:row`); default: the path.
        max_image_pixels: refuse images with more pixels than this (None = no cap); checked from
            the header, before decoding. Pillow's own hard limit (about 179 MP) applies regardless.

    Raises:
        ImageTooLargeError: the image exceeds `max_image_pixels`.
        ImageLoadError: unreadable, truncated or unconvertible image (message names it).
    """
    label = source_label(source, name)
    if isinstance(source, Image.Image):
        check_pixel_count(source, label, max_image_pixels)
        return to_rgb(source, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
    elif isinstance(source, (str, PathLike)):
        stream = Path(source)
    else:
        raise TypeError(f"{label}: expected a path, bytes or PIL image, got {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own cap replaces Pillow's bomb warning; its hard limit still raises below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as opened:
                check_pixel_count(opened, label, max_image_pixels)
                opened.load()
                return to_rgb(opened, label)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{label}: {err}") from err
    except FileNotFoundError as err:
        raise ImageLoadError(f"{label}: no such file") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageLoadError(f"{label}: cannot read image: {err}") from err


def normalize_pixels(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 array [3, H, W] rescaled by 1/255 and normalized (mean 0.5, std 0.5)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}; use to_rgb first")
    scaled = (np.asarray(image, dtype=np.float64) / 255.0).astype(np.float32)
    normalized = (scaled - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))


def patchify(
    pixels: np.ndarray,
    patch_size: int = 16,
    hidden_stride: int = 2,
    temporal_patch_size: int = 1,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut normalized frames into patch rows in 2x2-block order.

    Args:
        pixels: `[C, H, W]` (one image) or `[T, C, H, W]` (frames); H and W multiples of
            `patch_size * hidden_stride`. Frames are padded by repeating the last one up to a
            multiple of `temporal_patch_size`.

    Returns:
        `pixel_values [t*h*w, C*temporal_patch_size*patch_size**2]` float32 and `(t, h, w)`, the
        grid in temporal patches and spatial patches.
    """
    frames = pixels[None] if pixels.ndim == 3 else pixels
    if frames.ndim != 4:
        raise ValueError(f"expected [C, H, W] or [T, C, H, W] pixels, got shape {pixels.shape}")
    num_frames, channels, height, width = frames.shape
    factor = patch_size * hidden_stride
    if height % factor or width % factor:
        raise ValueError(f"pixel size {height}x{width} (h x w) is not a multiple of {factor}")
    if num_frames % temporal_patch_size:
        pad = temporal_patch_size - num_frames % temporal_patch_size
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = frames.reshape(
        grid_t, temporal_patch_size, channels,
        grid_h // hidden_stride, hidden_stride, patch_size,
        grid_w // hidden_stride, hidden_stride, patch_size,
    )
    # -> (t, block_row, block_col, row_in_block, col_in_block, C, temporal, patch_y, patch_x)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size**2)
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), (grid_t, grid_h, grid_w)


def image_patches(
    image: Image.Image, patch_size: int = 16, hidden_stride: int = 2
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`patchify(normalize_pixels(image), patch_size, hidden_stride)` of one RGB image, bit for bit.

    Several times faster: the patches are reordered while still uint8 (a quarter of the bytes)
    and normalized in place afterwards, in float32 only. Dividing a uint8 level by 255 in float32
    rounds exactly as `normalize_pixels`' float64 division followed by a float32 cast (true for
    all 256 levels, which the tests check), and the remaining operations are the same, so every
    value is identical.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}; use to_rgb first")
    width, height = image.size
    factor = patch_size * hidden_stride
    if height % factor or width % factor:
        raise ValueError(f"pixel size {height}x{width} (h x w) is not a multiple of {factor}")
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = np.asarray(image).reshape(
        grid_h // hidden_stride, hidden_stride, patch_size, grid_w // hidden_stride, hidden_stride, patch_size, 3
    )
    # -> (block_row, block_col, row_in_block, col_in_block, C, patch_y, patch_x), as in `patchify`
    rows = np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 6, 2, 5)).reshape(grid_h * grid_w, -1)
    values = rows.astype(np.float32)
    values /= np.float32(255.0)
    values -= np.float32(IMAGE_MEAN)
    values /= np.float32(IMAGE_STD)
    return torch.from_numpy(values), (1, grid_h, grid_w)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Turns one image into `(pixel_values [t*h*w, 768], (t, h, w))` for the Ovis2.5 ViT.

    Attributes:
        min_pixels: smallest resized area (pixels); official 448*448.
        max_pixels: largest resized area (pixels), a hard budget; official inference 1792*1792.
        patch_size: ViT patch side in pixels (16).
        hidden_stride: patches merged per side into one visual token (2).
        temporal_patch_size: frames per temporal patch; images only support 1.
        max_image_pixels: decompression-bomb cap on the *source* image (None = no cap).
    """

    min_pixels: int = 448 * 448
    max_pixels: int = 1792 * 1792
    patch_size: int = 16
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.patch_size <= 0 or self.hidden_stride <= 0:
            raise ValueError(f"patch_size and hidden_stride must be positive: {self}")
        if self.temporal_patch_size != 1:
            raise ValueError(
                f"temporal_patch_size={self.temporal_patch_size} is not supported: Ovis2.5 "
                "checkpoints use 1 and the model contract has 768-value (3x16x16) patch rows"
            )
        if self.min_pixels <= 0 or self.min_pixels > self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def factor(self) -> int:
        """Side multiple of every resized image (patch_size * hidden_stride)."""
        return self.patch_size * self.hidden_stride

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) for an image of the given size."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def __call__(
        self, source: ImageSource, name: str | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        image = load_image(source, name=name, max_image_pixels=self.max_image_pixels)
        try:
            height, width = self.target_size(image.height, image.width)
        except ImageAspectRatioError as err:
            raise ImageAspectRatioError(f"{source_label(source, name)}: {err}") from err
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=RESAMPLE)
        # temporal_patch_size is 1 (checked above): one image is one temporal patch
        return image_patches(image, self.patch_size, self.hidden_stride)
