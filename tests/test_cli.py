"""The `litovis` command end to end on the tiny model and the bundled sample (CPU).

The resume test is the contract of the trainer: a run that crashes mid-epoch and is resumed with
`--ckpt_path last` takes exactly the same steps, with the same losses, as one that never stopped —
before and after the CE -> DFT switch, with PiSSA and LoRA dropout on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from litovis.cli import LitovisCLI

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("in_repo")  # the sample's paths are relative to the repository


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
    """Train with `config` in this process (a `SimulatedCrash` ends the run quietly)."""
    torch.manual_seed(12345)  # whatever ran before: the run must seed torch from its config
    cli = LitovisCLI(args=["--config", str(config)], run=False)
    seed = yaml.safe_load(config.read_text())["seed_everything"]
    assert cli.config["seed_everything"] == seed and torch.initial_seed() == seed, "the config's seed was not applied"
    cli.trainer.callbacks.append(recorder)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except SimulatedCrash:
        pass
    return cli


def test_demo_trains_switches_to_dft_and_resumes_exactly(tmp_path: Path, sample_prepare: dict) -> None:
    changes = {
        "trainer.max_steps": 28,
        "trainer.val_check_interval": 14,
        "model.lora.dropout": 0.05,
        "data.batching.max_tokens": 2048,
        "data.num_workers": 0,  # worker-process resumption is covered by tests/data/test_loader.py
        "data.batching.max_samples": 16,
        "callbacks.LossSchedule.dft_from_step": 20,
    }
    straight = StepRecorder()
    config = demo_config(tmp_path / "straight", sample_prepare, save_every=5, **changes)
    cli = fit(config, straight)
    steps = cli.datamodule.optimizer_steps_per_epoch(1)
    assert 10 < steps < 28, "the crash must fall mid-epoch and the run must cross an epoch"
    assert sorted(straight.losses) == list(range(28))
    assert cli.model.loss_kind == "dft"

    crashed = StepRecorder(crash_at=13)
    resumed_dir = tmp_path / "resumed"
    config = demo_config(resumed_dir, sample_prepare, save_every=5, **changes)
    fit(config, crashed)
    assert max(crashed.losses) == 12
    # the seed decides the run: a second run with it repeats the first, another seed does not
    assert crashed.losses == {step: straight.losses[step] for step in range(13)}
    other_seed = StepRecorder(crash_at=1)
    fit(demo_config(tmp_path / "other_seed", sample_prepare, **{**changes, "seed_everything": 7}), other_seed)
    assert other_seed.losses[0] != straight.losses[0]
    assert (resumed_dir / "checkpoints" / "last.ckpt").exists()
    resumed = StepRecorder()
    fit(config, resumed, ckpt_path="last")
    first = min(resumed.losses)
    assert 0 < first <= 13
    for step in range(first, 28):
        assert resumed.losses[step] == straight.losses[step], f"step {step} differs after resume"


class PredictCrash(L.Callback):
    """Kills a predict run after its first batch was written."""

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        raise SimulatedCrash("crash after the first prediction batch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_prepare: dict) -> tuple[Path, Path]:
    """A briefly trained demo run: its config and its last checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    config = demo_config(root, sample_prepare, **{"trainer.max_steps": 4, "trainer.val_check_interval": 4})
    fit(config, StepRecorder())
    return config, root / "checkpoints" / "last.ckpt"


def predict(config: Path, ckpt: Path, out: Path, split: str = "test", crash: bool = False) -> None:
    predict_yaml = yaml.safe_load((REPO / "configs/demo_predict.yaml").read_text())
    writer = predict_yaml["trainer"]["callbacks"][0]["init_args"]
    writer["output_dir"] = str(out / "parts")
    writer["submission"] = {"jsonl": str(out / "predictions.jsonl")}
    if split == "test":
        writer["submission"]["challenge_csv"] = str(out / "submission.csv")
    predict_yaml["trainer"]["enable_progress_bar"] = False
    predict_yaml["trainer"]["default_root_dir"] = str(out)
    predict_yaml["data"]["predict_split"] = split
    overlay = out / "predict.yaml"
    out.mkdir(parents=True, exist_ok=True)
    overlay.write_text(yaml.safe_dump(predict_yaml))
    cli = LitovisCLI(args=["--config", str(config), "--config", str(overlay)], run=False)
    if crash:
        cli.trainer.callbacks.append(PredictCrash())
    try:
        cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), return_predictions=False)
    except SimulatedCrash:
        pass


def test_predict_writes_each_test_row_once_even_after_a_crash(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    import pandas as pd

    config, ckpt = trained
    predict(config, ckpt, tmp_path, crash=True)
    parts = list((tmp_path / "parts").glob("part-*.jsonl"))
    written = sum(1 for part in parts for _ in part.open())
    assert 0 < written < 20, "the crash must leave a partial run"
    assert not (tmp_path / "submission.csv").exists()
    predict(config, ckpt, tmp_path)
    submission = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    test_rows = len(pd.read_parquet(REPO / "data/sample/challenge/test.parquet"))
    assert list(submission.columns) == ["id", "output"]
    assert submission["id"].tolist() == [str(i) for i in range(test_rows)]
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").open()]
    assert sorted(r["id"] for r in records) == sorted(submission["id"])
    assert all(r["prompt"].startswith("<|im_start|>user") for r in records)


def test_validation_predictions_are_scored_per_task(tmp_path: Path, trained: tuple[Path, Path], sample_prepare: dict) -> None:
    from litovis.evaluation.evaluate import evaluate

    config, ckpt = trained
    predict(config, ckpt, tmp_path, split="val")
    result = evaluate(tmp_path / "predictions.jsonl", Path(sample_prepare["output_dir"]) / "val.parquet", tmp_path / "scores.json")
    assert (tmp_path / "scores.json").exists()
    assert {"captioning", "math_reasoning", "vqa"} <= set(result["tasks"])
    assert result["counts"]["missing_predictions"] == 0


def test_test_command_logs_the_loss_of_a_checkpoint(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    config, ckpt = trained
    metrics = {}
    for command in ("test", "validate"):
        cli = LitovisCLI(args=[command, "--config", str(config), "--ckpt_path", str(ckpt),
                               "--trainer.logger.init_args.save_dir", str(tmp_path / command)])
        metrics.update(cli.trainer.callback_metrics)
    assert 0 < float(metrics["test/loss"]) < 100
    assert {"test/ce_vqa", "test/token_acc"} <= set(metrics)
    # the same data and the same evaluation code: `test` reports what `validate` reports
    for name in ("loss", "token_acc", "ce_vqa"):
        assert float(metrics[f"test/{name}"]) == pytest.approx(float(metrics[f"val/{name}"])), name


def test_prepare_command_takes_a_config_and_field_overrides(tmp_path: Path) -> None:
    from litovis.cli import main

    main(["prepare", "--config", "configs/prepare/sample.yaml", "--output_dir", str(tmp_path / "out"),
          "--image_dir", str(tmp_path / "images"), "--seed", "7"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"train.parquet", "val.parquet", "test.parquet"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert report


def test_export_and_evaluate_commands(tmp_path: Path, trained: tuple[Path, Path], sample_prepare: dict) -> None:
    from litovis.cli import main

    _, ckpt = trained
    main(["export", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "adapter"), "--dtype", "float32"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    references = Path(sample_prepare["output_dir"]) / "val.parquet"
    import pandas as pd

    rows = pd.read_parquet(references)
    with (tmp_path / "perfect.jsonl").open("w") as f:
        for row in rows.itertuples():
            f.write(json.dumps({"id": row.id, "task": row.task, "prompt": "", "raw": row.target, "answer": row.target}) + "\n")
    main(["evaluate", "--predictions", str(tmp_path / "perfect.jsonl"), "--references", str(references),
          "--output", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    for task in ("math_reasoning", "vqa", "text_qa"):
        entry = scores["tasks"][task]
        assert entry["metrics"][entry["primary"]] == 1.0, task


def test_the_command_docs_name_every_command_and_every_tool_argument() -> None:
    import inspect

    import litovis.cli
    from litovis.evaluation.evaluate import evaluate
    from litovis.inference.export import export

    for doc in (litovis.cli.__doc__, litovis.cli.main.__doc__):
        for command in ("fit", "validate", "test", "predict", *litovis.cli.TOOL_COMMANDS):
            assert command in doc, command
        for tool in (export, evaluate):
            for name in inspect.signature(tool).parameters:
                assert f"--{name}" in doc, f"--{name} of {tool.__name__}"
    # the only argument the module doc names for export are export's own
    usage = litovis.cli.__doc__.split("litovis export", 1)[1].split("\n\n", 1)[0]
    assert {word.strip("[").split("=")[0] for word in usage.split() if word.lstrip("[").startswith("--")} == {
        f"--{name}" for name in inspect.signature(export).parameters}
