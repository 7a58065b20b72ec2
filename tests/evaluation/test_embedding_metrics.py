"""BERTScore and CLIPScore with tiny local models, against independent per-pair computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from litovis.evaluation.embedding_metrics import BERTScorer, CLIPScorer


def reference_bertscore(model_dir: Path, prediction: str, reference: str, layer: int) -> float:
    """BERTScore F1 of one pair with explicit loops over tokens, one text per forward pass."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    def embed(text: str) -> torch.Tensor:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded, output_hidden_states=True).hidden_states[layer][0]
        return hidden[1:-1]  # drop [CLS] and [SEP]

    pred, ref = embed(prediction), embed(reference)

    def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(x @ y / (x.norm() * y.norm()))

    precision = sum(max(cosine(p, r) for r in ref) for p in pred) / len(pred)
    recall = sum(max(cosine(r, p) for p in pred) for r in ref) / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_bertscore_identical_text_is_one(tiny_bert_dir: Path) -> None:
    scorer = BERTScorer(tiny_bert_dir, device="cpu")
    # Every token's best match is itself (cosine 1), so P = R = F1 = 1.
    texts = ["the cat sat on the mat", "red"]
    assert scorer(texts, texts) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("layer", [None, 1])
def test_bertscore_matches_independent_computation(tiny_bert_dir: Path, layer: int | None) -> None:
    pairs = [
        ("the cat sat on the mat", "a dog sat on a red mat"),
        ("tax act", "the bill . the tax act"),
    ]
    scorer = BERTScorer(tiny_bert_dir, layer=layer, device="cpu", batch_size=2)
    # One batch holds texts of different lengths, so padding must be masked out correctly.
    scores = scorer.row_scores([p for p, _ in pairs], [r for _, r in pairs])
    index = -1 if layer is None else layer
    expected = [reference_bertscore(tiny_bert_dir, p, r, index) for p, r in pairs]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert 0 < scores[0] < 1


def test_bertscore_empty_side_scores_zero(tiny_bert_dir: Path) -> None:
    scorer = BERTScorer(tiny_bert_dir, device="cpu")
    scores = scorer.row_scores(["", "the cat", "the cat"], ["the cat", "", "the cat"])
    assert scores == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)


def test_model_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        BERTScorer(tmp_path / "roberta-large")
    with pytest.raises(FileNotFoundError, match="CLIPScore model directory"):
        CLIPScorer("openai/clip-vit-large-patch14")


def test_clipscore_matches_independent_computation(
    tiny_clip_dir: Path, tiny_images: list[Path]
) -> None:
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    # The last caption is longer than the tiny text model's 24 positions: it is truncated.
    captions = ["a red square", "green!", "a long blue caption, longer than the text model allows"]
    scorer = CLIPScorer(tiny_clip_dir, device="cpu", batch_size=2)
    scores = scorer.row_scores(captions, tiny_images)

    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    expected = []
    for caption, path in zip(captions, tiny_images, strict=True):
        text = processor.tokenizer(caption, return_tensors="pt", truncation=True, max_length=24)
        image = Image.open(path).convert("RGB")
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            text_embedding = model.text_projection(model.text_model(**text).pooler_output)[0]
            pooled = model.vision_model(pixel_values=pixels).pooler_output
            image_embedding = model.visual_projection(pooled)[0]
        norms = text_embedding.norm() * image_embedding.norm()
        cosine = float(text_embedding @ image_embedding / norms)
        expected.append(max(cosine, 0.0))
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scorer(captions, tiny_images) == pytest.approx(sum(expected) / 3, abs=1e-5)
    with pytest.raises(ValueError, match="one image per caption"):
        scorer(captions, tiny_images[:2])


def test_clipscore_reads_images_like_the_model_inputs(tiny_clip_dir: Path, tiny_images: list[Path], tmp_path: Path) -> None:
    """EXIF orientation is applied (as for training images) and a broken file is named, not a bare PIL error."""
    from PIL import Image

    from litovis.processing.image import ImageLoadError

    upright = Image.open(tiny_images[0]).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # EXIF orientation 6 turns it back upright
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_file = tmp_path / "rotated.jpg"
    stored.save(rotated_file, exif=exif, quality=100)
    scorer = CLIPScorer(tiny_clip_dir, device="cpu")
    from_file = scorer.row_scores(["a red square"], [rotated_file])[0]
    from_upright = scorer.row_scores(["a red square"], [Image.open(rotated_file).transpose(Image.Transpose.ROTATE_270)])[0]
    as_stored = scorer.row_scores(["a red square"], [Image.open(rotated_file).convert("RGB")])[0]
    assert from_file == pytest.approx(from_upright, abs=1e-6)
    assert from_file != pytest.approx(as_stored, abs=1e-6)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        scorer.row_scores(["a red square"], [broken])
