"""`litovis export`: adapters and merged checkpoints reproduce the trained model on a real base directory.

Each trained checkpoint comes from a real (one-step) Lightning fit of the tiny preset, with its
trainable weights then perturbed so the fine-tuning is far from trivial, saved by
`trainer.save_checkpoint` (so the module's own checkpoint filtering runs).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from litovis.cli import main as cli_main
from litovis.inference.export import export
from litovis.model.checkpoint import build_ovis, load_ovis, save_ovis
from litovis.model.ovis import Ovis2_5
from litovis.model.presets import preset
from litovis.processing.tiny_tokenizer import build_tiny_tokenizer
from litovis.training.checkpoint_io import CorruptCheckpointError
from litovis.training.config import MemoryConfig, ModelSource, Trainable
from litovis.training.lora import LLM_PROJECTIONS, LoRAConfig
from litovis.training.module import OvisFineTuner

SEED = 0  # ModelSource's default: the preset base the module builds is the one saved below


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's random base written as a real model directory, with processor side files."""
    torch.manual_seed(SEED)
    directory = save_ovis(build_ovis(preset("tiny"), dtype=torch.float32), tmp_path_factory.mktemp("base") / "tiny")
    (directory / "generation_config.json").write_text('{"eos_token_id": 509}\n')
    (directory / "chat_template.jinja").write_text("{{ messages }}\n")
    return directory


def packed_batch() -> SimpleNamespace:
    """Two samples packed in one row: one with a 4x4-patch image (4 visual atoms), one text-only."""
    first = [5, 6, 7, -301, -300, -300, -300, -300, -302, 8, 9, 10, 11]
    second = [12, 13, 14, 15, 16, 17]
    ids = torch.tensor([first + second])
    labels = ids.clone()
    labels[ids < 0] = -100
    labels[0, [0, 1, 2, len(first), len(first) + 1]] = -100
    generator = torch.Generator().manual_seed(1)
    return SimpleNamespace(
        input_ids=ids,
        labels=labels,
        position_ids=torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None],
        cu_seqlens=torch.tensor([0, len(first), len(first) + len(second)], dtype=torch.int32),
        max_seqlen=len(first),
        pixel_values=torch.randn(16, 768, generator=generator),
        grid_thws=torch.tensor([[1, 4, 4]]),
        sample_task_index=torch.tensor([0, 0]),
        step_num_targets=int((labels != -100).sum()),
    )


@torch.no_grad()
def logits(model: torch.nn.Module, batch: SimpleNamespace) -> torch.Tensor:
    model.eval()
    return model(
        input_ids=batch.input_ids, pixel_values=batch.pixel_values, grid_thws=batch.grid_thws,
        position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
    ).logits


def pristine(base_dir: Path) -> Ovis2_5:
    return load_ovis(base_dir, dtype=torch.float32)[0]


_RUNS: dict[str, tuple[Path, torch.Tensor]] = {}

RUNS = {
    "lora": dict(lora=LoRAConfig(rank=4, alpha=2.0, init="default")),
    "pissa_niter_2": dict(lora=LoRAConfig(rank=4, alpha=2.0, init="pissa_niter_2")),
    "pissa_plain_scale": dict(lora=LoRAConfig(rank=4, alpha=8.0, rslora=False, init="pissa")),
    "pissa_vit": dict(lora=LoRAConfig(rank=4, alpha=2.0, init="pissa"), trainable=Trainable(vit=True, vte=True)),
    "full": dict(finetune="full"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, base_dir: Path):
    """`trained(name)` -> (checkpoint path, the trained module's logits on `packed_batch()`)."""

    def run(name: str) -> tuple[Path, torch.Tensor]:
        if name not in _RUNS:
            # "full" trains from the base directory itself; the others from the preset (export gets `base`).
            source = (ModelSource(checkpoint=str(base_dir), tokenizer="tiny", dtype="float32") if name == "full"
                      else ModelSource(preset="tiny", tokenizer="tiny", dtype="float32", seed=SEED))
            module = OvisFineTuner(source, memory=MemoryConfig(gradient_checkpointing=False), **RUNS[name])
            trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(module, DataLoader([packed_batch()], batch_size=None, collate_fn=lambda b: b))
            generator = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for param in module.parameters():
                    if param.requires_grad:
                        param.add_(0.02 * torch.randn(param.shape, generator=generator))
            path = tmp_path_factory.mktemp(name) / "last.ckpt"
            trainer.save_checkpoint(path)
            _RUNS[name] = (path, logits(module.model, packed_batch()))
        return _RUNS[name]

    return run


@pytest.mark.parametrize("name", ["lora", "pissa_niter_2", "pissa_plain_scale"])
def test_adapter_on_the_pristine_base_reproduces_the_trained_model(name, trained, base_dir, tmp_path) -> None:
    from peft import PeftModel

    checkpoint, expected = trained(name)
    out = export(str(checkpoint), str(tmp_path / "adapter"), base=str(base_dir), dtype="float32")
    assert not (tmp_path / "adapter.partial").exists()
    model = PeftModel.from_pretrained(pristine(base_dir), str(out))
    got = logits(model, packed_batch())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The fine-tuning is far from trivial: the base alone is off by much more than the tolerance.
    assert (logits(pristine(base_dir), packed_batch()) - expected).abs().max() > 1e-2

    config = json.loads((out / "adapter_config.json").read_text())
    lora = RUNS[name]["lora"]
    pissa = lora.is_pissa
    assert config["r"] == (2 * lora.rank if pissa else lora.rank)
    rank_scale = config["r"] ** 0.5 if config["use_rslora"] else config["r"]
    assert config["lora_alpha"] / rank_scale == pytest.approx(lora.scale, rel=1e-12)
    info = json.loads((out / "litovis_export.json").read_text())
    assert info["format"] == "adapter" and info["global_step"] == 1
    assert ("converted" in info["conversion"]) == pissa
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_adapter_keys_use_the_official_module_names(trained, base_dir, tmp_path) -> None:
    out = export(str(trained("pissa_niter_2")[0]), str(tmp_path / "adapter"), base=str(base_dir))
    tensors = load_file(out / "adapter_model.safetensors")
    official = {name: module for name, module in pristine(base_dir).named_modules()
                if name.startswith("llm.model.layers.") and name.rsplit(".", 1)[-1] in LLM_PROJECTIONS}
    assert len(official) == 2 * len(LLM_PROJECTIONS)
    expected = {f"base_model.model.{name}.lora_{part}.weight" for name in official for part in ("A", "B")}
    assert set(tensors) == expected
    assert not any(".default." in key for key in tensors)
    for name, linear in official.items():
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (8, linear.in_features) and b.shape == (linear.out_features, 8)  # rank 2 x 4
        assert a.dtype == b.dtype == torch.bfloat16  # the default export dtype


@pytest.mark.parametrize("name", ["lora", "pissa_niter_2", "pissa_vit", "full"])
def test_merged_checkpoint_reproduces_the_trained_model(name, trained, base_dir, tmp_path) -> None:
    checkpoint, expected = trained(name)
    base = None if name == "full" else str(base_dir)
    out = export(str(checkpoint), str(tmp_path / "merged"), format="merged", base=base, dtype="float32")
    model, config = load_ovis(out, dtype=torch.float32)
    assert config.torch_dtype == "float32"
    torch.testing.assert_close(logits(model, packed_batch()), expected, atol=1e-5, rtol=0)

    for side in ("generation_config.json", "chat_template.jinja"):
        assert (out / side).read_bytes() == (base_dir / side).read_bytes()
    from transformers import PreTrainedTokenizerFast

    text = "Describe the harbour at sunrise."
    assert PreTrainedTokenizerFast.from_pretrained(str(out)).encode(text) == build_tiny_tokenizer().encode(text)
    assert "load_ovis" in (out / "README.md").read_text()


def test_merged_bfloat16_is_the_float32_merge_rounded(trained, base_dir, tmp_path) -> None:
    checkpoint, _ = trained("pissa_niter_2")
    full = export(str(checkpoint), str(tmp_path / "fp32"), format="merged", base=str(base_dir), dtype="float32")
    half = export(str(checkpoint), str(tmp_path / "bf16"), format="merged", base=str(base_dir))
    fp32 = load_file(full / "model.safetensors")
    bf16 = load_file(half / "model.safetensors")
    assert set(fp32) == set(bf16)
    for key, tensor in fp32.items():
        assert bf16[key].dtype == torch.bfloat16
        assert torch.equal(bf16[key], tensor.to(torch.bfloat16)), key


@pytest.mark.parametrize("name", ["pissa_vit", "full"])
def test_adapter_refuses_weights_it_cannot_hold(name, trained, base_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="--format merged"):
        export(str(trained(name)[0]), str(tmp_path / "out"), base=str(base_dir))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_checkpoint_whose_weights_do_not_match_is_refused(trained, base_dir, tmp_path) -> None:
    state = torch.load(trained("lora")[0], weights_only=True)
    dropped = sorted(state["state_dict"])[0]
    del state["state_dict"][dropped]
    torch.save(state, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing\.ckpt: cannot restore.*1 missing"):
        export(str(tmp_path / "missing.ckpt"), str(tmp_path / "a"), base=str(base_dir))

    state = torch.load(trained("lora")[0], weights_only=True)
    state["litovis"]["lora"]["rank"] = 8  # the stored tensors are rank 4
    torch.save(state, tmp_path / "rank.ckpt")
    with pytest.raises(ValueError, match=r"(?s)rank\.ckpt: cannot restore.*size mismatch"):
        export(str(tmp_path / "rank.ckpt"), str(tmp_path / "b"), base=str(base_dir))


def test_checkpoint_without_litovis_block_is_refused(trained, tmp_path) -> None:
    state = torch.load(trained("lora")[0], weights_only=True)
    del state["litovis"]
    torch.save(state, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"plain\.ckpt: cannot restore the trained model: no `litovis` block"):
        export(str(tmp_path / "plain.ckpt"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        export(str(tmp_path / "nowhere.ckpt"), str(tmp_path / "out"))
    state = torch.load(trained("lora")[0], weights_only=True)
    del state["litovis"]["trainable"]
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"old\.ckpt: the `litovis` block lacks \['trainable'\]"):
        export(str(tmp_path / "old.ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_names_the_newest_readable_one(trained, tmp_path) -> None:
    good = tmp_path / "step1.ckpt"
    good.write_bytes(trained("lora")[0].read_bytes())
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=rf"(?s)last\.ckpt: it is truncated.*newest readable checkpoint.*{good}"):
        export(str(damaged), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused(trained, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(str(trained("lora")[0]), str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_command_line(trained, base_dir, tmp_path) -> None:
    checkpoint, expected = trained("lora")
    cli_main(["export", "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "cli"),
              "--format", "merged", "--base", str(base_dir), "--dtype", "float32"])
    model, _ = load_ovis(tmp_path / "cli", dtype=torch.float32)
    torch.testing.assert_close(logits(model, packed_batch()), expected, atol=1e-5, rtol=0)
    info = json.loads((tmp_path / "cli" / "litovis_export.json").read_text())
    assert info["source"] == asdict(ModelSource(checkpoint=str(base_dir), tokenizer="tiny", dtype="float32"))
    assert info["trained_with_source"] == asdict(ModelSource(preset="tiny", tokenizer="tiny", dtype="float32"))
