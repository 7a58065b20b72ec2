"""Model-based metrics, BERTScore and CLIPScore, from a local model directory only.

Both scorers load with `local_files_only=True` from a directory the user names, so they can
never reach the network; a missing directory is an error, not a download. They are written
here on transformers' stable model classes rather than through torchmetrics, whose loaders
accept hub names (and would download) and change between versions.

- BERTScore F1 (Zhang et al., 2020): contextual token embeddings of prediction and reference
  from one hidden layer (default: the last; `bert_score` uses layer 17 for `roberta-large`),
  special tokens and padding excluded, L2-normalised. Precision is the mean over prediction
  tokens of the best cosine similarity with a reference token, recall the same the other way,
  F1 = 2PR / (P + R); no idf weighting, no baseline rescaling. A row with an empty side scores 0.
  Texts longer than the model's maximum length are truncated.
- CLIPScore (Hessel et al., 2021): max(cos(E_image, E_caption), 0) with CLIP's projected image
  and text embeddings — torchmetrics' CLIPScore divided by 100, so that every litovis metric
  lies in [0, 1]; captions are truncated to the text model's maximum length (77 tokens for the
  OpenAI models).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from litovis.processing.image import load_image


def _model_directory(path: str | Path, what: str) -> Path:
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} model directory {directory} has no config.json: give a local directory "
            "holding the model and its tokenizer (models are never downloaded)"
        )
    return directory


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _max_length(tokenizer_limit: int, model_limit: int | None) -> int:
    return min(tokenizer_limit, model_limit) if model_limit else tokenizer_limit


class BERTScorer:
    """BERTScore F1 with a local encoder (see the module docstring)."""

    def __init__(
        self,
        model_dir: str | Path,
        layer: int | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        """Load the encoder and tokenizer from `model_dir`; `layer` indexes `hidden_states`
        (0 = embeddings, None = last layer)."""
        from transformers import AutoModel, AutoTokenizer

        directory = _model_directory(model_dir, "BERTScore")
        self.device = _pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, local_files_only=True).to(self.device)
        self.model.eval()
        self.layer = layer
        self.batch_size = batch_size
        self.max_length = _max_length(
            self.tokenizer.model_max_length,
            getattr(self.model.config, "max_position_embeddings", None),
        )

    @torch.no_grad()
    def _embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised token embeddings `[B, T, D]` and a mask `[B, T]` of the scored tokens."""
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        special = encoded.pop("special_tokens_mask").bool()
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        output = self.model(**encoded, output_hidden_states=True)
        hidden = output.hidden_states[-1 if self.layer is None else self.layer].float()
        mask = encoded["attention_mask"].bool() & ~special.to(self.device)
        return torch.nn.functional.normalize(hidden, dim=-1), mask

    def row_scores(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """BERTScore F1 of each row."""
        scores: list[float] = []
        for start in range(0, len(predictions), self.batch_size):
            stop = start + self.batch_size
            pred, pred_mask = self._embed(predictions[start:stop])
            ref, ref_mask = self._embed(references[start:stop])
            similarity = torch.einsum("bpd,brd->bpr", pred, ref)
            pair_mask = pred_mask[:, :, None] & ref_mask[:, None, :]
            similarity = similarity.masked_fill(~pair_mask, float("-inf"))
            best_for_pred = similarity.max(dim=2).values.masked_fill(~pred_mask, 0.0)
            best_for_ref = similarity.max(dim=1).values.masked_fill(~ref_mask, 0.0)
            pred_count = pred_mask.sum(dim=1)
            ref_count = ref_mask.sum(dim=1)
            precision = best_for_pred.sum(dim=1) / pred_count.clamp(min=1)
            recall = best_for_ref.sum(dim=1) / ref_count.clamp(min=1)
            f1 = 2 * precision * recall / (precision + recall)
            empty = (pred_count == 0) | (ref_count == 0) | ~torch.isfinite(f1)
            scores.extend(f1.masked_fill(empty, 0.0).tolist())
        return scores

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        """Mean BERTScore F1 over rows."""
        if len(predictions) != len(references) or not predictions:
            raise ValueError(
                f"BERTScore needs equally many predictions and references, at least one: "
                f"got {len(predictions)} and {len(references)}"
            )
        scores = self.row_scores(predictions, references)
        return float(sum(scores) / len(scores))


class CLIPScorer:
    """CLIPScore of captions against their images with a local CLIP (see the module docstring)."""

    def __init__(
        self, model_dir: str | Path, device: str | torch.device | None = None, batch_size: int = 32
    ) -> None:
        """Load a `CLIPModel` and its processor from `model_dir`."""
        from transformers import AutoProcessor, CLIPModel

        directory = _model_directory(model_dir, "CLIPScore")
        self.device = _pick_device(device)
        self.processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
        self.model = CLIPModel.from_pretrained(directory, local_files_only=True).to(self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def row_scores(self, captions: Sequence[str], images: Sequence[str | Path | Image.Image]) -> list[float]:
        """CLIPScore of each (caption, image) row; an image is an RGB PIL image or a file, loaded by
        `litovis.processing.image.load_image` (EXIF rotation, pixel cap; `ImageLoadError` names an
        unreadable file)."""
        scores: list[float] = []
        for start in range(0, len(captions), self.batch_size):
            stop = start + self.batch_size
            pictures = [
                image if isinstance(image, Image.Image) else load_image(image, name=str(image))
                for image in images[start:stop]
            ]
            inputs = self.processor(
                text=list(captions[start:stop]),
                images=pictures,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            output = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            text = torch.nn.functional.normalize(output.text_embeds.float(), dim=-1)
            image = torch.nn.functional.normalize(output.image_embeds.float(), dim=-1)
            scores.extend((text * image).sum(dim=-1).clamp(min=0).tolist())
        return scores

    def __call__(self, captions: Sequence[str], images: Sequence[str | Path | Image.Image]) -> float:
        """Mean CLIPScore over rows."""
        if len(captions) != len(images) or not captions:
            raise ValueError(
                f"CLIPScore needs one image per caption, at least one: "
                f"got {len(captions)} captions and {len(images)} images"
            )
        scores = self.row_scores(captions, images)
        return float(sum(scores) / len(scores))
