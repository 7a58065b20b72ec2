"""`measure_samples` and `SampleDataset` against hostile images and text: report and skip, never crash."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import pytest

from litovis.data.batching import collate_packed
from litovis.data.dataset import SampleDataset, measure_samples
from litovis.data.drops import DropReport
from litovis.data.prompts import load_templates
from litovis.data.sample import Sample
from litovis.processing.processor import OvisProcessor
from tests.data.tiny_inputs import PROMPTS_YAML, image_bytes


@pytest.fixture(scope="module")
def processor(tiny_tokenizer) -> OvisProcessor:
    return OvisProcessor(tiny_tokenizer, min_pixels=32 * 32, max_pixels=128 * 128, max_length=4096)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _sample(sample_id: str, image: Path | None, answer: str = "A red square.", question: str = "What is it?") -> Sample:
    marker = "<image>" if image is not None else ""
    return Sample(
        id=sample_id,
        task="chat",
        messages=[{"role": "user", "content": f"{marker}{question}"}, {"role": "assistant", "content": answer}],
        images=[str(image)] if image is not None else [],
        source=f"test.jsonl:{sample_id}",
    )


def _image(path: Path, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> Path:
    path.write_bytes(image_bytes(fmt, size))
    return path


def test_images_that_break_after_measuring_are_skipped_with_a_warning(
    tmp_path: Path, processor: OvisProcessor, caplog: pytest.LogCaptureFixture,
) -> None:
    names = ("good", "truncated", "elongated", "bomb", "deleted", "also-good")
    samples = [_sample(n, _image(tmp_path / f"{n}.jpg")) for n in names]
    templates = load_templates(PROMPTS_YAML)
    measured = measure_samples(samples, processor, templates, DropReport())
    assert [s.id for s in measured.samples] == list(names)

    data = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _image(tmp_path / "elongated.jpg", size=(600, 2))  # aspect ratio 300: cannot be resized undistorted
    (tmp_path / "bomb.jpg").write_bytes(_png_header_only(20_000, 20_000))
    (tmp_path / "deleted.jpg").unlink()

    dataset = SampleDataset(measured.samples, processor, templates)
    with caplog.at_level(logging.WARNING, logger="litovis.data.dataset"):
        items = [dataset[i] for i in range(len(dataset))]
    assert [item is not None for item in items] == [True, False, False, False, False, True]
    for name in ("truncated", "elongated", "bomb", "deleted"):
        assert f"skipping sample {name}:" in caplog.text
    batch = collate_packed(items, task_vocab=["chat"])
    assert batch.sample_ids == ["good", "also-good"] and batch.num_skipped == 4

    with pytest.raises(Exception, match="truncated"):  # prediction never skips a row
        SampleDataset(measured.samples, processor, templates, generation=True)[1]


def test_measuring_drops_bombs_broken_headers_and_absurd_text_with_reasons(tmp_path: Path, processor: OvisProcessor) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header_only(11_000, 10_000))  # over the 100 MP cap, under Pillow's
    (tmp_path / "garbage.jpg").write_bytes(b"\x00" * 100)
    samples = [
        _sample("ok", _image(tmp_path / "ok.png", fmt="PNG")),
        _sample("bomb", tmp_path / "bomb.png"),
        _sample("garbage", tmp_path / "garbage.jpg"),
        _sample("huge-text", None, answer="word " * 50_000),
        _sample("no-image-file", tmp_path / "absent.jpg"),
    ]
    report = DropReport(max_examples=None)
    measured = measure_samples(samples, processor, load_templates(PROMPTS_YAML), report)
    assert [s.id for s in measured.samples] == ["ok"]
    reasons = {e.source.rsplit(":", 1)[1]: e.reason for e in report.examples}
    assert reasons == {"bomb": "ImageTooLargeError", "garbage": "ImageLoadError", "huge-text": "too_long",
                       "no-image-file": "ImageLoadError"}
    report.check()
    assert report.seen == len(samples) == len(measured.samples) + report.dropped


def test_ranks_measuring_their_shares_end_with_one_process_result(tmp_path: Path, processor: OvisProcessor) -> None:
    """Three 'ranks' (threads, an all_gather at a barrier) measure every third sample each; all
    end with what one process measures alone: the same kept samples, lengths and drop report."""
    import threading

    (tmp_path / "garbage.jpg").write_bytes(b"\x00" * 100)
    samples = [_sample(f"ok{i}", _image(tmp_path / f"ok{i}.jpg", size=(32 + 32 * i, 48))) for i in range(5)]
    samples[1:1] = [_sample("garbage", tmp_path / "garbage.jpg")]
    samples.append(_sample("huge-text", None, answer="word " * 50_000))
    templates = load_templates(PROMPTS_YAML)
    alone_report = DropReport(max_examples=None)
    alone = measure_samples(samples, processor, templates, alone_report)

    world, shares = 3, [None] * 3
    barrier, results = threading.Barrier(world), [None] * world

    def rank(r: int) -> None:
        def all_gather(mine: list) -> list[list]:
            shares[r] = mine
            barrier.wait()
            return list(shares)

        report = DropReport(max_examples=None)
        results[r] = (measure_samples(samples, processor, templates, report, rank=r, world_size=world,
                                      all_gather=all_gather), report)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [len(share) for share in shares] == [3, 2, 2]  # each rank measured only its share
    for measured, report in results:
        assert measured == alone
        assert report.examples == alone_report.examples and report.seen == alone_report.seen == len(samples)
    assert [s.id for s in alone.samples] == [f"ok{i}" for i in range(5)]


def test_an_unexpected_failure_on_one_rank_raises_on_every_rank(tmp_path: Path, processor: OvisProcessor,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while measuring one rank's sample must not leave the other ranks waiting in all_gather."""
    samples = [_sample(f"ok{i}", _image(tmp_path / f"ok{i}.jpg")) for i in range(2)]
    templates = load_templates(PROMPTS_YAML)

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(processor, "measure", broken)
    shards: list = []

    def all_gather(mine: list) -> list[list]:
        shards.append(mine)
        return [mine, [(7, 1)]]  # the other rank's share (sample 1)

    with pytest.raises(RuntimeError, match=r"measuring .*ok0 failed: KeyError: 'bug'"):
        measure_samples(samples, processor, templates, DropReport(), rank=0, world_size=2, all_gather=all_gather)
    assert shards, "the failure went through the gather, so the other ranks get it too"
    with pytest.raises(KeyError, match="bug"):  # one process: the original error, traceback and all
        measure_samples(samples, processor, templates, DropReport())
