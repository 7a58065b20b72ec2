"""`fetch_images`: turn every image reference into a verified local file, resumably.

References are http(s) URLs, raw bytes, base64 strings (or `data:` URIs) and existing local
paths. Remote and inline images are stored as `<image_dir>/<sha256 of the input>.jpg` — the
hash of the URL string or of the bytes, so a rerun skips what it already has. Each new image is
checked (Pillow verify, re-open, pixel cap), EXIF-rotated, converted to RGB (transparency over
white, 16-bit scaled rather than clipped: `processing.image.to_rgb`) and written as JPEG through
a temporary file and a rename, so a killed run never leaves a half-written image behind. Local files are kept in place after a header check. Work runs on a
bounded thread pool; identical references are fetched once. A sample whose image failed is
dropped with the reason (or, for test data, the whole call fails listing every failure).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from litovis.data.download import BROWSER_USER_AGENT, DownloadError, download
from litovis.data.drops import DropReport
from litovis.data.raw_records import url_scheme
from litovis.data.sample import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class FetchOptions:
    """How images are fetched and stored.

    Attributes:
        workers: concurrent downloads/conversions (threads).
        timeout: seconds per HTTP attempt (connection, each read, and the whole body).
        retries: extra attempts after a transient failure (timeout, connection error, 408/429/5xx).
        backoff: seconds before the first retry; doubles each retry.
        max_bytes: largest accepted download; bigger bodies are abandoned while streaming.
        max_image_pixels: largest accepted width × height (decompression-bomb guard).
        jpeg_quality: quality of the stored JPEG files.
        user_agent: HTTP User-Agent (a browser's: some image hosts refuse unknown clients).
        progress: print one updating progress line to stderr.
    """

    workers: int = 32
    timeout: float = 30.0
    retries: int = 4
    backoff: float = 1.0
    max_bytes: int = 50 * 2**20
    max_image_pixels: int = 100_000_000
    jpeg_quality: int = 95
    user_agent: str = BROWSER_USER_AGENT
    progress: bool = True


class FetchError(Exception):
    """One image reference could not be turned into a local file (`reason` is countable)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ImageFetchError(RuntimeError):
    """Images of samples that may not be dropped (test data) failed; lists every one."""


def image_key(ref: str | bytes) -> str:
    """sha256 hex digest of the reference as given (UTF-8 for strings)."""
    data = ref if isinstance(ref, bytes) else ref.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def save_as_jpeg(data: bytes, dest: Path, max_image_pixels: int, quality: int = 95) -> None:
    """Verify image bytes and store them at `dest` as an RGB JPEG, atomically."""
    from PIL import Image

    from litovis.processing.image import to_rgb  # the one conversion: EXIF, alpha on white, 16-bit scaled

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_image_pixels:
                raise FetchError("too many pixels", f"{width}x{height}")
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            rgb = to_rgb(image)
    except FetchError:
        raise
    except Image.DecompressionBombError as err:
        raise FetchError("too many pixels", str(err)[:120]) from None
    except Exception as err:  # Pillow signals broken data with many exception types
        raise FetchError("corrupt image", f"{type(err).__name__}: {err}"[:160]) from None
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        rgb.save(tmp, "JPEG", quality=quality)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _check_local(path: str, max_image_pixels: int) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise FetchError("too many pixels", str(err)[:120]) from None
    except Exception as err:  # unreadable header: Pillow raises several types
        raise FetchError("corrupt image", f"{path}: {type(err).__name__}: {err}"[:160]) from None
    if width * height > max_image_pixels:
        raise FetchError("too many pixels", f"{path}: {width}x{height}")


def _decode_base64(text: str) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise FetchError("base64 error", str(err)[:120]) from None


def materialise(ref: Any, image_dir: Path, options: FetchOptions) -> str:
    """The local path for one image reference, fetching and converting it if needed."""
    if isinstance(ref, (bytearray, memoryview)):
        ref = bytes(ref)
    if isinstance(ref, bytes):
        dest = image_dir / f"{image_key(ref)}.jpg"
        if not dest.exists():
            save_as_jpeg(ref, dest, options.max_image_pixels, options.jpeg_quality)
        return str(dest)
    if not isinstance(ref, str) or not ref.strip():
        raise FetchError("bad image reference", f"got {type(ref).__name__}")
    scheme = url_scheme(ref)
    if scheme is None and not ref.startswith("data:"):
        if os.path.isfile(ref):
            _check_local(ref, options.max_image_pixels)
            return ref
        if len(ref) < 4096 and ref.strip().lower().endswith(IMAGE_SUFFIXES):
            raise FetchError("missing file", ref)
    if scheme is not None and scheme not in ("http", "https"):
        raise FetchError("bad scheme", f"{scheme}:// in {ref[:120]}")
    dest = image_dir / f"{image_key(ref)}.jpg"
    if dest.exists():
        return str(dest)
    if scheme is None:
        data = _decode_base64(ref.strip())
    else:
        try:
            data = download(
                ref.strip(),
                timeout=options.timeout,
                max_bytes=options.max_bytes,
                retries=options.retries,
                backoff=options.backoff,
                user_agent=options.user_agent,
            )
        except DownloadError as err:
            raise FetchError(err.reason, f"{ref[:120]}: {err.detail}") from None
    save_as_jpeg(data, dest, options.max_image_pixels, options.jpeg_quality)
    return str(dest)


class _Progress:
    """One stderr line rewritten in place on a terminal; a plain line every 10 s in a log file."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.failed = 0
        self._tty = sys.stderr.isatty()
        self._interval = 0.2 if self._tty else 10.0
        self._last = time.monotonic()

    def step(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        now = time.monotonic()
        finished = self.done == self.total
        if self.enabled and (now - self._last > self._interval or finished):
            self._last = now
            line = f"fetch images: {self.done}/{self.total} ({self.failed} failed)"
            end = "\n" if finished or not self._tty else ""
            sys.stderr.write(("\r" if self._tty else "") + line + end)
            sys.stderr.flush()


def _ref_key(ref: Any) -> Any:
    """A hashable key per distinct reference (any unexpected type still gets one)."""
    if isinstance(ref, (bytearray, memoryview)):
        return bytes(ref)
    return ref if isinstance(ref, (str, bytes)) else (type(ref).__name__, repr(ref))


def fetch_images(
    samples: list[Sample],
    image_dir: str | Path,
    options: FetchOptions | None = None,
    *,
    on_failure: str = "drop",
    stage: str = "fetch",
) -> tuple[list[Sample], DropReport]:
    """Samples (order kept) whose `images` are all local paths, and the drop report.

    Args:
        samples: samples whose images are URLs, bytes, base64 strings or local paths.
        image_dir: where fetched/decoded images are stored (created if needed).
        options: fetch options (defaults: `FetchOptions()`).
        on_failure: `drop` drops a sample whose image failed (counted by reason); `raise`
            finishes every fetch, then raises `ImageFetchError` listing each failed sample.
        stage: stage name in the report.
    """
    if on_failure not in ("drop", "raise"):
        raise ValueError(f"on_failure must be 'drop' or 'raise', got {on_failure!r}")
    options = options or FetchOptions()
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    unique: dict[Any, Any] = {}  # key -> the reference itself
    for sample in samples:
        for ref in sample.images:
            unique.setdefault(_ref_key(ref), ref)
    results: dict[Any, str | FetchError] = {}
    progress = _Progress(len(unique), options.progress and bool(unique))
    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        futures = {
            pool.submit(materialise, ref, image_dir, options): key for key, ref in unique.items()
        }
        try:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except FetchError as err:
                    results[futures[future]] = err
                progress.step(isinstance(results[futures[future]], FetchError))
        except BaseException:  # disk full, Ctrl-C...: stop queued work instead of finishing it
            for future in futures:
                future.cancel()
            raise

    report = DropReport(max_examples=None if on_failure == "raise" else 5)
    kept: list[Sample] = []
    for sample in samples:
        outcome = [results[_ref_key(ref)] for ref in sample.images]
        failure = next((o for o in outcome if isinstance(o, FetchError)), None)
        if failure is not None:
            detail = f"sample {sample.id}: {failure.detail}"
            report.drop(stage, failure.reason, sample.source, detail)
            continue
        report.keep(stage)
        kept.append(replace(sample, images=list(outcome)))
    failed = Counter(r.reason for r in results.values() if isinstance(r, FetchError))
    if options.progress and failed:
        sys.stderr.write(f"fetch images: failures by reason: {dict(failed.most_common())}\n")
    if on_failure == "raise" and report.dropped:
        listing = "\n".join(f"  {e.source}: {e.reason} ({e.detail})" for e in report.examples)
        raise ImageFetchError(
            f"{report.dropped} sample(s) whose images could not be fetched may not be dropped:\n"
            f"{listing}"
        )
    return kept, report
