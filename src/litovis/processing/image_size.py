"""`read_image_size`: an image's (height, width) as `load_image` will return it, from its header.

The data pipeline measures every sample's token count up front (at every start), so this must not
decode images. EXIF orientation counts (it swaps width and height); for a PNG, Pillow finds it by
decoding the whole image unless no chunk follows the image data, which a walk over the chunk
headers tells.
"""

from __future__ import annotations

import io
import struct
import warnings
from os import PathLike
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from litovis.processing.image import ImageLoadError, ImageTooLargeError, check_pixel_count, source_label

_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _png_chunks_after_image_data(stream: BinaryIO) -> bool:
    """Whether a PNG holds chunks other than IDAT and IEND after its first IDAT (walks the chunk
    headers from the start; a truncated file counts as having some)."""
    stream.seek(8)  # past the signature
    in_data = False
    while True:
        header = stream.read(8)
        if len(header) < 8:
            return True
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return False
        if kind == b"IDAT":
            in_data = True
        elif in_data:
            return True
        stream.seek(length + 4, io.SEEK_CUR)  # data and CRC


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation `ImageOps.exif_transpose` will apply, without decoding when possible.

    Pillow's PNG `getexif` decodes the whole image to reach chunks stored after the image data.
    When there are none (the usual case), the chunks read at open time hold all the metadata and
    the base `getexif` gives the same answer from them.
    """
    if image.format == "PNG" and "exif" not in image.info and image.fp is not None:
        position = image.fp.tell()
        try:
            after = _png_chunks_after_image_data(image.fp)
        finally:
            image.fp.seek(position)
        if not after:
            return Image.Image.getexif(image).get(0x0112, 1)
    return image.getexif().get(0x0112, 1)


def read_image_size(
    source: str | PathLike | bytes, *, name: str | None = None, max_image_pixels: int | None = None
) -> tuple[int, int]:
    """(height, width) as `load_image` would return it, read from the header alone (no decoding).

    Accounts for EXIF rotation, so token counts computed from it match the processed image.
    `max_image_pixels` refuses decompression bombs (`ImageTooLargeError`) before anything else is
    read: a PNG with metadata after its image data is decoded whole to find its EXIF.
    """
    label = source_label(source, name)
    stream = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as opened:
                width, height = opened.size
                check_pixel_count(opened, label, max_image_pixels)
                orientation = _orientation(opened)
    except ImageTooLargeError:
        raise
    except FileNotFoundError as err:
        raise ImageLoadError(f"{label}: no such file") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{label}: cannot read image header: {err}") from err
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)
