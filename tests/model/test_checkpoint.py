"""Loading, building and saving checkpoints in the official layout, key-exact and bit-exact."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from litovis.model.checkpoint import (
    CheckpointMismatchError,
    build_ovis,
    load_ovis,
    resolve_checkpoint_dir,
    save_ovis,
)
from litovis.model.config import OvisConfig
from litovis.model.presets import preset


def _tied_tiny() -> OvisConfig:
    config = preset("tiny")
    config.llm = dataclasses.replace(config.llm, tie_word_embeddings=True)
    return config


def _assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype, name
        assert torch.equal(state_a[name], state_b[name]), name


def test_loaded_reference_is_complete_and_in_eval_mode(tiny_reference_dir: Path) -> None:
    model, config = load_ovis(tiny_reference_dir, dtype=torch.float32)
    assert config == OvisConfig.from_file(tiny_reference_dir / "config.json")
    assert not model.training
    stored = load_file(tiny_reference_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert not tensor.is_meta
        assert torch.equal(tensor, stored[name]), name


def test_load_casts_to_the_requested_dtype(tiny_reference_dir: Path) -> None:
    model, _ = load_ovis(tiny_reference_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("config_factory", [lambda: preset("tiny"), _tied_tiny], ids=["untied", "tied"])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 200_000], ids=["single", "sharded"])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, config_factory, max_shard_bytes: int) -> None:
    torch.manual_seed(0)
    model = build_ovis(config_factory(), dtype=torch.bfloat16)
    save_ovis(model, tmp_path, max_shard_bytes=max_shard_bytes)
    loaded, config = load_ovis(tmp_path, dtype=torch.bfloat16)
    _assert_same_tensors(model, loaded)
    assert config.torch_dtype == "bfloat16"
    assert config.llm == model.config.llm
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes == 10**9:
        assert files == ["model.safetensors"]
        stored = set(load_file(tmp_path / "model.safetensors"))
    else:
        assert len(files) > 1 and all(name.startswith("model-0000") for name in files)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        stored = set(index["weight_map"])
        assert set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in model.state_dict().values())
    assert stored == set(model.state_dict())
    assert ("llm.lm_head.weight" in stored) == (not model.config.llm.tie_word_embeddings)


def test_tied_model_uses_the_embedding_as_output_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_ovis(_tied_tiny())
    hidden = torch.randn(1, 3, 64)
    torch.testing.assert_close(model.llm.logits(hidden), hidden @ model.llm.model.embed_tokens.weight.T)


def test_resaving_with_other_sharding_leaves_no_stale_files(tmp_path: Path) -> None:
    model = build_ovis(preset("tiny"))
    save_ovis(model, tmp_path, max_shard_bytes=200_000)
    save_ovis(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def _copy_reference(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_renamed_and_missing_keys_are_listed(tiny_reference_dir: Path, tmp_path: Path) -> None:
    directory = _copy_reference(tiny_reference_dir, tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors["llm.model.layers.0.self_attn.query.weight"] = tensors.pop("llm.model.layers.0.self_attn.q_proj.weight")
    del tensors["vte.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        load_ovis(directory, dtype=torch.float32)
    message = str(info.value)
    assert str(directory) in message
    assert "missing (2): llm.model.layers.0.self_attn.q_proj.weight, vte.weight" in message
    assert "unexpected (1): llm.model.layers.0.self_attn.query.weight (in model.safetensors)" in message


def test_shape_mismatch_names_file_and_shapes(tiny_reference_dir: Path, tmp_path: Path) -> None:
    directory = _copy_reference(tiny_reference_dir, tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors["vte.weight"] = tensors["vte.weight"][:-1].contiguous()
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"vte.weight: checkpoint \[259, 64\] in model.safetensors, model \[260, 64\]"):
        load_ovis(directory, dtype=torch.float32)


def test_untied_checkpoint_for_a_tied_config_is_refused(tiny_reference_dir: Path, tmp_path: Path) -> None:
    directory = _copy_reference(tiny_reference_dir, tmp_path / "ckpt")
    raw = json.loads((directory / "config.json").read_text())
    raw["llm_config"]["tie_word_embeddings"] = True
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\): llm.lm_head.weight"):
        load_ovis(directory, dtype=torch.float32)


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    save_ovis(build_ovis(preset("tiny")), tmp_path, max_shard_bytes=200_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load_ovis(tmp_path, dtype=torch.float32)


def test_hub_repo_id_resolves_from_the_local_cache_only(tiny_reference_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-ovis"
    shutil.copytree(tiny_reference_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    assert resolve_checkpoint_dir("someone/tiny-ovis") == repo / "snapshots" / revision
    model, _ = load_ovis("someone/tiny-ovis", dtype=torch.float32)
    assert model.num_parameters()["total"] == 339_648
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        resolve_checkpoint_dir("someone/absent-model")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_checkpoint_dir(str(tmp_path / "nowhere" / "deeper" / "still"))


def test_build_is_deterministic_and_initialised_sensibly() -> None:
    torch.manual_seed(3)
    first = build_ovis(preset("tiny"))
    torch.manual_seed(3)
    second = build_ovis(preset("tiny"))
    _assert_same_tensors(first, second)
    vit = first.visual_tokenizer.vit.vision_model
    assert torch.equal(first.llm.model.norm.weight, torch.ones(64))
    assert torch.equal(vit.encoder.layers[0].layer_norm1.bias, torch.zeros(64))
    assert torch.equal(vit.encoder.layers[0].self_attn.q_proj.bias, torch.zeros(64))
    assert abs(first.vte.weight.std().item() - 0.02) < 0.002
    assert abs(first.llm.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002


def test_saving_a_model_with_foreign_tensors_is_refused(tmp_path: Path) -> None:
    model = build_ovis(preset("tiny"))
    model.llm.model.layers[0].self_attn.register_buffer("lora_scale", torch.ones(1))
    with pytest.raises(CheckpointMismatchError, match="lora_scale.*merge or remove adapters"):
        save_ovis(model, tmp_path)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("spoil", ["foreign tensor", "mixed dtypes"])
def test_a_refused_save_leaves_the_earlier_checkpoint_unchanged(tmp_path: Path, spoil: str) -> None:
    torch.manual_seed(0)
    saved = build_ovis(preset("tiny"))
    directory = save_ovis(saved, tmp_path / "ckpt", max_shard_bytes=200_000)
    before = _file_bytes(directory)
    bad = build_ovis(preset("tiny"))
    if spoil == "foreign tensor":
        bad.llm.model.layers[0].self_attn.register_buffer("lora_scale", torch.ones(1))
    else:
        bad.vte.to(torch.float16)
    with pytest.raises((CheckpointMismatchError, ValueError)):
        save_ovis(bad, directory)
    assert _file_bytes(directory) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind
    _assert_same_tensors(saved, load_ovis(directory, dtype=torch.float32)[0])


def test_a_save_failing_while_writing_leaves_the_earlier_checkpoint_unchanged(tmp_path: Path, monkeypatch) -> None:
    import litovis.model.checkpoint as checkpoint

    directory = save_ovis(build_ovis(preset("tiny")), tmp_path / "ckpt")
    before = _file_bytes(directory)
    written: list[str] = []

    def fail_on_second_shard(tensors, filename, metadata=None):
        written.append(str(filename))
        if len(written) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_ovis(build_ovis(preset("tiny")), directory, max_shard_bytes=200_000)
    assert len(written) == 2 and all(Path(name).parent != directory for name in written)
    assert _file_bytes(directory) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_resaving_keeps_other_files_of_the_directory(tmp_path: Path) -> None:
    directory = save_ovis(build_ovis(preset("tiny")), tmp_path / "ckpt")
    (directory / "tokenizer.json").write_text("{}")
    (directory / "extra").mkdir()
    (directory / "extra" / "notes.txt").write_text("mine")
    torch.manual_seed(5)
    second = build_ovis(preset("tiny"))
    save_ovis(second, directory)
    assert (directory / "tokenizer.json").read_text() == "{}"
    assert (directory / "extra" / "notes.txt").read_text() == "mine"
    _assert_same_tensors(second, load_ovis(directory, dtype=torch.float32)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
