"""`fetch_images`: every kind of reference, conversion, caching, dedup, failures by reason."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from PIL import Image

from litovis.data.fetch import FetchError, FetchOptions, ImageFetchError, fetch_images, image_key, save_as_jpeg
from litovis.data.sample import Sample
from tests.data.tiny_inputs import image_bytes

FAST = FetchOptions(workers=4, timeout=2.0, retries=1, backoff=0.01, max_bytes=100_000, progress=False)


def _s(i, *images) -> Sample:
    return Sample(id=str(i), task="vqa", images=list(images), target="t", source=f"f:{i}")


def test_every_reference_kind_becomes_a_verified_jpeg(tmp_path, http_server):
    raw = image_bytes("PNG", (12, 9))
    b64 = base64.b64encode(image_bytes("JPEG", (7, 5))).decode()
    local = tmp_path / "local.png"
    local.write_bytes(image_bytes("PNG", (4, 4)))
    url = http_server + "/ok.png"
    samples = [_s(0, raw), _s(1, b64), _s(2, "data:image/jpeg;base64," + b64), _s(3, url), _s(4, str(local)),
               _s(5), _s(6, raw, url)]
    out, report = fetch_images(samples, tmp_path / "imgs", FAST)
    assert [s.id for s in out] == ["0", "1", "2", "3", "4", "5", "6"]
    assert out[0].images == [str(tmp_path / "imgs" / f"{hashlib.sha256(raw).hexdigest()}.jpg")]
    assert out[1].images == [str(tmp_path / "imgs" / f"{hashlib.sha256(b64.encode()).hexdigest()}.jpg")]
    assert out[3].images == [str(tmp_path / "imgs" / f"{image_key(url)}.jpg")]
    assert out[4].images == [str(local)] and out[5].images == []
    assert out[6].images == out[0].images + out[3].images
    for sample in out[:4]:
        with Image.open(sample.images[0]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
    with Image.open(out[3].images[0]) as image:
        assert image.size == (10, 7)
    assert samples[0].images == [raw]  # inputs are not modified
    assert (report.seen, report.kept, report.dropped) == (7, 7, 0)
    assert not list((tmp_path / "imgs").glob(".*"))  # no temporary files left behind


def test_failures_are_dropped_and_counted_by_reason(tmp_path, http_server):
    samples = [
        _s(0, http_server + "/missing"), _s(1, http_server + "/corrupt"), _s(2, http_server + "/huge"),
        _s(3, http_server + "/to-file"), _s(4, "not base64 !!"), _s(5, "gone/away.jpg"),
        _s(6, "ftp://h/a.jpg"), _s(7, b"\x89PNG but broken"), _s(8, http_server + "/slow"),
        _s(9, http_server + "/ok.png"), _s(10, http_server + "/ok.png", http_server + "/missing"),
        _s(11, ["not", "a", "reference"]),
    ]
    options = FetchOptions(workers=8, timeout=0.2, retries=0, max_bytes=100_000, progress=False)
    out, report = fetch_images(samples, tmp_path / "imgs", options)
    assert [s.id for s in out] == ["9"]
    assert {e.source: e.reason for e in report.examples} == {
        "f:0": "http 404", "f:1": "corrupt image", "f:2": "too large", "f:3": "bad scheme",
        "f:4": "base64 error", "f:5": "missing file", "f:6": "bad scheme", "f:7": "corrupt image",
        "f:8": "timeout", "f:10": "http 404", "f:11": "bad image reference"}
    assert report.seen == len(samples) == len(out) + report.dropped
    assert http_server.hits["/missing"] == 1  # fetched once for the two samples that use it


def test_retry_then_success(tmp_path, http_server):
    out, report = fetch_images([_s(0, http_server + "/flaky")], tmp_path, FAST)
    assert len(out) == 1 and report.dropped == 0 and http_server.hits["/flaky"] == 2


def test_rerun_skips_existing_files(tmp_path, http_server):
    url = http_server + "/ok.png"
    first, _ = fetch_images([_s(0, url)], tmp_path, FAST)
    second, _ = fetch_images([_s(1, url)], tmp_path, FAST)
    assert first[0].images == second[0].images and http_server.hits["/ok.png"] == 1


def test_raise_mode_lists_every_failed_sample(tmp_path, http_server):
    samples = [_s("TEST_0", http_server + "/missing"), _s("TEST_1", b"junk"), _s("TEST_2", image_bytes())]
    with pytest.raises(ImageFetchError) as err:
        fetch_images(samples, tmp_path, FAST, on_failure="raise")
    message = str(err.value)
    assert "2 sample(s)" in message and "sample TEST_0" in message and "sample TEST_1" in message
    with pytest.raises(ValueError, match="on_failure"):
        fetch_images(samples, tmp_path, FAST, on_failure="skip")


def test_conversion_transparency_exif_and_pixel_cap(tmp_path):
    rgba = image_bytes("PNG", (6, 6), (0, 0, 0, 0), mode="RGBA")
    save_as_jpeg(rgba, tmp_path / "a.jpg", 10**6)
    with Image.open(tmp_path / "a.jpg") as image:
        assert image.getpixel((3, 3)) == pytest.approx((255, 255, 255), abs=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (10, 200, 10)).save(buffer, "JPEG", exif=exif)
    save_as_jpeg(buffer.getvalue(), tmp_path / "b.jpg", 10**6)
    with Image.open(tmp_path / "b.jpg") as image:
        assert image.size == (10, 20)
    with pytest.raises(FetchError) as err:
        save_as_jpeg(image_bytes("PNG", (40, 40)), tmp_path / "c.jpg", 1000)
    assert err.value.reason == "too many pixels" and not (tmp_path / "c.jpg").exists()


def test_local_files_are_header_checked(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes("PNG", (50, 50)))
    options = FetchOptions(max_image_pixels=1000, progress=False)
    out, report = fetch_images([_s(0, str(tmp_path / "bad.jpg")), _s(1, str(big))], tmp_path / "imgs", options)
    assert out == [] and sorted(report.counts) == [("fetch", "corrupt image"), ("fetch", "too many pixels")]


def test_progress_line_on_stderr(tmp_path, capsys):
    fetch_images([_s(0, image_bytes()), _s(1, b"bad")], tmp_path, FetchOptions(workers=1))
    err = capsys.readouterr().err
    assert "fetch images: 2/2 (1 failed)" in err and "corrupt image" in err


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(buffer, "PNG")  # mid-gray in 16 bits
    save_as_jpeg(buffer.getvalue(), tmp_path / "gray.jpg", 10**6)
    with Image.open(tmp_path / "gray.jpg") as image:
        assert image.getpixel((8, 8)) == pytest.approx((128, 128, 128), abs=2)
