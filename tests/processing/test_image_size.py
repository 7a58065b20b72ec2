"""read_image_size: the size load_image will give, from the header, decoding a PNG only when needed."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from litovis.processing.image import ImageTooLargeError, load_image
from litovis.processing.image_size import read_image_size


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def test_read_image_size_refuses_a_bomb_before_reading_further():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # 110 MP declared (Pillow only warns below ~179 MP); finding a PNG's EXIF would decode it all.
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 11_000, 10_000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(ImageTooLargeError, match="110000000 pixels exceeds the cap of 100000000"):
        read_image_size(bomb, name="bomb.png", max_image_pixels=100_000_000)


def _move_chunk_after_image_data(png: bytes, kind: bytes) -> bytes:
    """The same PNG with chunk `kind` moved from before the image data to just before IEND."""
    chunks, position = [], 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position:position + 4])
        chunks.append(png[position:position + 12 + length])
        position += 12 + length
    moved = next(c for c in chunks if c[4:8] == kind)
    rest = [c for c in chunks if c is not moved]
    return png[:8] + b"".join(rest[:-1]) + moved + rest[-1]


@pytest.mark.parametrize("where", ["before-data", "after-data"])
@pytest.mark.parametrize("carrier", ["exif", "xmp", "none"])
def test_read_image_size_sees_png_orientation_as_loading_does(where: str, carrier: str, monkeypatch) -> None:
    """EXIF or XMP orientation, stored before or after the image data: the size read from the
    header equals the loaded image's. Only metadata after the data needs the image decoded."""
    image = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))  # 20 high, 40 wide
    params, kind = {}, None
    if carrier == "exif":
        exif = image.getexif()
        exif[0x0112] = 6
        params, kind = {"exif": exif.tobytes()}, b"eXIf"
    elif carrier == "xmp":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>')
        params, kind = {"pnginfo": info}, b"iTXt"
    png = _png_bytes(image, **params)
    if where == "after-data":
        if kind is None:
            info = PngImagePlugin.PngInfo()
            info.add_text("Comment", "after the pixels")
            png, kind = _move_chunk_after_image_data(_png_bytes(image, pnginfo=info), b"tEXt"), b"tEXt"
        else:
            png = _move_chunk_after_image_data(png, kind)
    loaded = load_image(png)
    decoded = []
    real_load = PngImagePlugin.PngImageFile.load

    def counting_load(self):
        decoded.append(True)
        return real_load(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting_load)
    assert read_image_size(png) == (loaded.height, loaded.width)
    assert loaded.size == ((40, 20) if carrier == "none" else (20, 40))
    assert bool(decoded) == (where == "after-data")
