"""Tiny random BERT and CLIP models saved as local model directories (no network)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

BERT_WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "red", "bill", "act", "tax", "."]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tiny_bert")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (directory / "vocab.txt").write_text("\n".join(special + BERT_WORDS))
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(BERT_WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    # A byte-level BPE vocabulary of single characters (with and without the word-end mark).
    characters = list(string.ascii_lowercase + string.digits + ".,!?'")
    tokens = characters + [c + "</w>" for c in characters]
    vocab = {token: index for index, token in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=24, eos_token_id=end,
            bos_token_id=vocab["<|startoftext|>"], pad_token_id=end,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image

    directory = tmp_path_factory.mktemp("images")
    paths = []
    for index, colour in enumerate([(220, 20, 20), (20, 200, 40), (30, 30, 230)]):
        image = Image.new("RGB", (40, 30), colour)
        image.paste((255, 255, 255), (5 * index, 5, 5 * index + 10, 15))
        path = directory / f"image_{index}.jpg"
        image.save(path)
        paths.append(path)
    return paths
