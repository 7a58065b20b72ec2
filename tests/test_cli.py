"""The `litovis` command end to end on the tiny model and the bundled sample (CPU).

The resume test is the contract of the trainer: a run that crashes mid-epoch and is resumed with
`--ckpt_path last` takes exactly the same steps, with the same losses, as one that never stopped —
before and after the CE -> DFT switch, with PiSSA and LoRA dropout on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from litovis.cli import LitovisCLI

REPO = Path(__file__).resolve().parents[1]


class SimulatedCrash(RuntimeError):
    """Raised by `StepRecorder` to kill a run the way an unexpected error would."""


class StepRecorder(L.Callback):
    """Records the loss returned by every training step, keyed by the step it belongs to."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.crash_at = crash_at

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])
        if trainer.global_step == self.crash_at:
            raise SimulatedCrash(f"crash after step {self.crash_at}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sample's prepare settings, writing into a temporary directory."""
    root = tmp_path_factory.mktemp("prepared")
    prepare = yaml.safe_load((REPO / "configs/prepare/sample.yaml").read_text())
    prepare["output_dir"] = str(root / "sample")
    prepare["image_dir"] = str(root / "images")
    prepare["fetch"]["progress"] = False
    return prepare


def demo_config(tmp_path: Path, prepare: dict, save_every: int | None = None, **changes: Any) -> Path:
    """`configs/demo.yaml` writing into `tmp_path`, with `changes` applied (dotted keys)."""
    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    config["data"]["prepare"] = prepare
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    config["trainer"]["enable_progress_bar"] = False
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in config["trainer"]["callbacks"]}
    for callback in config["trainer"]["callbacks"]:
        args = callback.get("init_args", {})
        if "dirpath" in args:
            args["dirpath"] = str(tmp_path / "checkpoints")
        if "every_n_train_steps" in args and save_every is not None:
            args["every_n_train_steps"] = save_every
    for key, value in changes.items():
        if key.startswith("callbacks."):  # callbacks.<ClassName>.<init arg>
            _, name, arg = key.split(".")
            callbacks[name]["init_args"][arg] = value
            continue
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, recorder: StepRecorder, ckpt_path: str | None = None) -> LitovisCLI:
    cli = LitovisCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.append(recorder)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except SimulatedCrash:
        pass
    return cli


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the sample's paths are relative to the repository


class ParseOnly(LitovisCLI):
    """Parses and validates a config without building anything (a 9B config on a CPU)."""

    def instantiate_classes(self) -> None:
        pass


def test_every_shipped_config_parses() -> None:
    configs = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.name != "prompts.yaml")
    assert len(configs) >= 2
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# litovis "), f"{path} must start with the command that uses it"
        command = first.split()[2]
        if command in ("fit", "validate", "test", "predict"):
            cli = ParseOnly(args=["--config", str(path)], run=False)
            assert cli.config["model"]["source"] is not None, path
        elif command == "prepare":
            from jsonargparse import ArgumentParser

            from litovis.data.prepare import PrepareConfig

            parser = ArgumentParser()
            parser.add_argument("--prepare", type=PrepareConfig)
            parser.instantiate(parser.parse_args(["--prepare", str(path)]))


def test_demo_trains_switches_to_dft_and_resumes_exactly(tmp_path: Path, prepared: dict) -> None:
    changes = {
        "trainer.max_steps": 28,
        "trainer.val_check_interval": 14,
        "model.lora.dropout": 0.05,
        "data.batching.max_tokens": 2048,
        "data.batching.max_samples": 16,
        "callbacks.LossSchedule.dft_from_step": 20,
    }
    straight = StepRecorder()
    config = demo_config(tmp_path / "straight", prepared, save_every=5, **changes)
    cli = fit(config, straight)
    steps = cli.datamodule.optimizer_steps_per_epoch(1)
    assert 10 < steps < 28, "the crash must fall mid-epoch and the run must cross an epoch"
    assert sorted(straight.losses) == list(range(28))
    assert cli.model.loss_kind == "dft"

    crashed = StepRecorder(crash_at=13)
    resumed_dir = tmp_path / "resumed"
    config = demo_config(resumed_dir, prepared, save_every=5, **changes)
    fit(config, crashed)
    assert max(crashed.losses) == 12
    assert (resumed_dir / "checkpoints" / "last.ckpt").exists()
    resumed = StepRecorder()
    fit(config, resumed, ckpt_path="last")
    first = min(resumed.losses)
    assert 0 < first <= 13
    for step in range(first, 28):
        assert resumed.losses[step] == straight.losses[step], f"step {step} differs after resume"
