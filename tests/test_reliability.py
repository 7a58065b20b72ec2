"""No lost runs, no lost rows, nothing executed from checkpoints — proven on `litovis fit` (CPU, tiny model).

Subprocess tests run `python -m litovis fit` exactly as a user does and kill it: with SIGKILL at
random moments and halfway through a checkpoint write (resuming with `--ckpt_path last` must end
with the same per-micro-batch losses and the same final trainable weights as a run that never
stopped), and with SIGTERM to the whole process group, DataLoader workers included. In-process
tests cover a damaged `last.ckpt`, checkpoints that would run code, and an image that breaks after
preparation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from litovis.cli import LitovisCLI
from litovis.data.prepare import load_prepared
from litovis.training.checkpoint_io import CorruptCheckpointError
from tests.test_cli import REPO, demo_config

CHANGES = {  # 24 optimizer steps of 2 micro-batches; an epoch is shorter, so the runs cross one
    "trainer.max_steps": 24,
    "trainer.accumulate_grad_batches": 2,
    "trainer.val_check_interval": 10,
    "model.lora.dropout": 0.05,
    "callbacks.LossSchedule.dft_from_step": 12,
}
SAVE_EVERY = 4

pytestmark = pytest.mark.usefixtures("in_repo")  # the sample's paths are relative to the repository


def run_config(directory: Path, prepare: dict, *, name: str = "config.yaml", plugin: dict | None = None,
               **changes: Any) -> Path:
    """The demo config for a subprocess run in `directory`, logging every micro-batch to `batches.jsonl`."""
    config = yaml.safe_load(demo_config(directory, prepare, save_every=SAVE_EVERY, **{**CHANGES, **changes}).read_text())
    path = directory / name
    config["trainer"]["callbacks"].insert(0, {
        "class_path": "tests.reliability_probes.BatchLog",
        "init_args": {"path": str(directory / "batches.jsonl")},
    })
    if plugin is not None:
        config["trainer"]["plugins"] = [plugin]
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, *args: str, log_name: str) -> subprocess.Popen:
    """`python -m litovis fit --config <config> <args>` in its own process group."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    log = (config.parent / log_name).open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "litovis", "fit", "--config", str(config), *args],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def records(directory: Path) -> list[dict]:
    path = directory / "batches.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(process: subprocess.Popen, directory: Path, step: int, timeout: float = 300) -> None:
    """Block until the run has logged a micro-batch of optimizer step `step` (or ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None or any(r["step"] >= step for r in records(directory)):
            return
        time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"run in {directory} did not reach step {step}")


def finish(process: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def trainable_state(checkpoint: Path) -> tuple[int, dict[str, torch.Tensor]]:
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return data["global_step"], data["state_dict"]


def losses_by_micro_batch(all_records: list[dict]) -> dict[tuple[int, int], set[str]]:
    """(epoch, batch) -> every loss any run recorded for it (replays after a resume included)."""
    seen: dict[tuple[int, int], set[str]] = {}
    for record in all_records:
        seen.setdefault((record["epoch"], record["batch"]), set()).add(record["loss"])
    return seen


@pytest.fixture(scope="module")
def reference(sample_prepare: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted subprocess run: its per-micro-batch losses and final trainable weights."""
    directory = tmp_path_factory.mktemp("reference")
    process = launch(run_config(directory, sample_prepare, **{"data.num_workers": 1}), log_name="fit.log")
    assert finish(process) == 0, (directory / "fit.log").read_text()[-3000:]
    step, weights = trainable_state(directory / "checkpoints" / "last.ckpt")
    assert step == CHANGES["trainer.max_steps"]
    losses = losses_by_micro_batch(records(directory))
    assert all(len(v) == 1 for v in losses.values())
    assert {epoch for epoch, _ in losses} == {0, 1}, "the run must cross an epoch"
    return {"losses": {k: next(iter(v)) for k, v in losses.items()}, "weights": weights}


def assert_same_run(directory: Path, reference: dict, context: str) -> None:
    step, weights = trainable_state(directory / "checkpoints" / "last.ckpt")
    assert step == CHANGES["trainer.max_steps"], context
    replays = losses_by_micro_batch(records(directory))
    assert replays.keys() == reference["losses"].keys(), context
    for key, values in replays.items():
        assert values == {reference["losses"][key]}, f"{context}: micro-batch {key} differs: {values}"
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference["weights"][name]), f"{context}: {name} differs"


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_checkpoint_write_resumes_exactly(
    tmp_path: Path, sample_prepare: dict, reference: dict,
) -> None:
    seed = int(os.environ.get("LITOVIS_CRASH_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    context = f"LITOVIS_CRASH_SEED={seed}"
    directory = tmp_path / "crashing"
    dying = run_config(
        directory, sample_prepare, name="dying.yaml",
        plugin={"class_path": "tests.reliability_probes.KillDuringCheckpointWrite", "init_args": {"kill_on_save": 2}},
        **{"data.num_workers": 0},
    )
    plain = run_config(directory, sample_prepare, **{"data.num_workers": 0})

    # 1. A fresh run, SIGKILLed at a random moment between steps 3 and 9.
    first = launch(plain, log_name="run1.log")
    wait_for_step(first, directory, rng.randint(3, 9))
    time.sleep(rng.uniform(0, 0.5))
    os.killpg(first.pid, signal.SIGKILL)
    assert finish(first) == -signal.SIGKILL, context

    # 2. Resumed; its second checkpoint write (a `last.ckpt`, after its step file) dies halfway.
    second = launch(dying, "--ckpt_path", "last", log_name="run2.log")
    assert finish(second) == -signal.SIGKILL, (directory / "run2.log").read_text()[-3000:]
    resumed_from, _ = trainable_state(directory / "checkpoints" / "last.ckpt")  # still whole and loadable
    assert list((directory / "checkpoints").glob(".*.tmp")), "the kill must have hit a checkpoint write"

    # 3. Resumed again, SIGKILLed at a random moment a few steps later.
    third = launch(plain, "--ckpt_path", "last", log_name="run3.log")
    wait_for_step(third, directory, resumed_from + rng.randint(2, 6))
    time.sleep(rng.uniform(0, 0.5))
    os.killpg(third.pid, signal.SIGKILL)
    finish(third)

    # 4. Resumed to the end.
    last = launch(plain, "--ckpt_path", "last", log_name="run4.log")
    assert finish(last) == 0, (directory / "run4.log").read_text()[-3000:]
    assert_same_run(directory, reference, context)


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_exits_143_and_resumes_exactly(
    tmp_path: Path, sample_prepare: dict, reference: dict,
) -> None:
    directory = tmp_path / "terminated"
    config = run_config(directory, sample_prepare, **{"data.num_workers": 1})  # a worker gets the signal too
    process = launch(config, log_name="run1.log")
    wait_for_step(process, directory, 9)
    os.killpg(process.pid, signal.SIGTERM)  # like Ctrl+C in a terminal or SLURM: every process
    output = lambda name: (directory / name).read_text()  # noqa: E731
    assert finish(process) == 128 + signal.SIGTERM, output("run1.log")[-3000:]
    assert "stopped on SIGTERM after optimizer step" in output("run1.log")
    stopped_at, _ = trainable_state(directory / "checkpoints" / "last.ckpt")
    assert stopped_at >= 9 and stopped_at % SAVE_EVERY != 0, "the stop checkpoint is its own, not a rolling one"

    resumed = launch(config, "--ckpt_path", "last", log_name="run2.log")
    assert finish(resumed) == 0, output("run2.log")[-3000:]
    assert_same_run(directory, reference, "SIGTERM")


# --------------------------------------------------------------------------- in-process, fast
def _cli(config: Path, *args: str) -> LitovisCLI:
    return LitovisCLI(args=["fit", "--config", str(config), *args])


@pytest.fixture(scope="module")
def short_run(sample_prepare: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; returns its checkpoint directory."""
    directory = tmp_path_factory.mktemp("short")
    config = demo_config(directory, sample_prepare, save_every=2, **{"trainer.max_steps": 4, "data.num_workers": 0})
    _cli(config)
    return directory / "checkpoints"


def test_a_litovis_checkpoint_is_plain_data(short_run: Path) -> None:
    checkpoint = torch.load(short_run / "step00004.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert {"state_dict", "optimizer_states", "loops", "callbacks", "litovis", "rng", "pissa_initial"} <= checkpoint.keys()


def test_damaged_last_checkpoint_names_the_newest_readable_one(short_run: Path, tmp_path: Path, sample_prepare: dict) -> None:
    directory = tmp_path / "damaged"
    (directory / "checkpoints").mkdir(parents=True)
    for age, name in enumerate(("last.ckpt", "step00004.ckpt", "step00002.ckpt")):
        copy = directory / "checkpoints" / name
        copy.write_bytes((short_run / name).read_bytes())
        os.utime(copy, (time.time() - 60 * age, time.time() - 60 * age))
    last = directory / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-4096])  # a truncated copy, e.g. from a full disk
    config = demo_config(directory, sample_prepare, **{"trainer.max_steps": 6, "data.num_workers": 0})
    with pytest.raises(CorruptCheckpointError) as info:
        _cli(config, "--ckpt_path", "last")
    message = str(info.value)
    assert f"cannot load checkpoint {last}" in message
    assert f"{directory / 'checkpoints' / 'step00004.ckpt'} (global step 4)" in message


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.marker),))


def test_the_cli_never_unpickles_code_even_without_the_plugin(
    short_run: Path, tmp_path: Path, sample_prepare: dict, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = demo_config(tmp_path / "evil", sample_prepare, **{"trainer.max_steps": 6, "data.num_workers": 0})
    with pytest.raises(ValueError, match="--weights_only false is refused"):
        _cli(config, "--weights_only", "false")

    data = yaml.safe_load(config.read_text())
    del data["trainer"]["plugins"]  # Lightning's own TorchCheckpointIO: the CLI alone must protect
    config.write_text(yaml.safe_dump(data))
    checkpoint = torch.load(short_run / "step00004.ckpt", map_location="cpu", weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint["payload"] = _RunsCode(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # turns weights_only=None into a full unpickle
    with pytest.raises(Exception, match="Weights only load failed"):
        _cli(config, "--ckpt_path", str(evil))
    assert not marker.exists()


class SeenSamples(L.Callback):
    """Sample ids of every training micro-batch, per epoch."""

    def __init__(self) -> None:
        self.ids: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_ids)


def test_images_broken_after_preparation_are_skipped_and_training_goes_on(
    short_run: Path, tmp_path: Path, sample_prepare: dict, caplog: pytest.LogCaptureFixture,
) -> None:
    # A private copy of the prepared data (the module's is shared): fetched images copied too.
    import pyarrow as pa
    import pyarrow.parquet as pq

    source_dir = Path(sample_prepare["output_dir"])
    images = tmp_path / "images"
    images.mkdir()
    train = load_prepared(source_dir / "train.parquet")
    for sample in train:
        for i, image in enumerate(sample.images):
            if image.startswith(sample_prepare["image_dir"]):  # fetched copies only: never the bundled files
                copy = images / Path(image).name
                copy.write_bytes(Path(image).read_bytes())
                sample.images[i] = str(copy)
    (tmp_path / "prepared").mkdir()
    pq.write_table(pa.Table.from_pylist([s.to_record() for s in train]), tmp_path / "prepared" / "train.parquet")
    config = demo_config(tmp_path / "run", sample_prepare, **{
        "data.prepare": None, "data.prepared_dir": str(tmp_path / "prepared"), "data.num_workers": 0,
        "trainer.max_steps": -1, "trainer.max_epochs": 1, "trainer.limit_val_batches": 0,
    })
    by_image: dict[str, list[str]] = {}
    for sample in train:
        for image in sample.images:
            if image.startswith(str(images)):
                by_image.setdefault(image, []).append(sample.id)
    body_broken, header_broken = sorted(by_image)[:2]
    data = Path(body_broken).read_bytes()
    Path(body_broken).write_bytes(data[: len(data) // 2])  # header readable, pixels cut off
    Path(header_broken).write_bytes(b"\x00" * 64)  # not an image at all any more

    seen = SeenSamples()
    cli = LitovisCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.append(seen)
    with caplog.at_level(logging.WARNING, logger="litovis.data.dataset"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.current_epoch == 1 and cli.trainer.global_step > 0

    dropped = {e.source for e in cli.datamodule.report.examples if e.stage == "measure_train"}
    header_ids = set(by_image[header_broken])
    assert {s.source for s in train if s.id in header_ids} <= dropped
    skipped = set(by_image[body_broken])
    for sample_id in skipped:
        assert f"skipping sample {sample_id}" in caplog.text
    epoch = seen.ids[0]
    assert len(epoch) == len(set(epoch)), "no sample twice in an epoch"
    assert set(epoch) == {s.id for s in train} - header_ids - skipped


class PoisonHiddenStates(L.Callback):
    """Makes the LLM's final hidden states NaN during optimizer step `step` (loss and gradients follow)."""

    def __init__(self, step: int) -> None:
        self.step, self.handle, self.ids = step, None, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.ids = list(batch.sample_ids)
            norm = pl_module.ovis.llm.model.norm
            self.handle = norm.register_forward_hook(lambda module, args, output: output * float("nan"))

    def on_train_batch_end(self, *args: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class TrainableSnapshots(L.Callback):
    """Trainable weights and optimizer state after every optimizer step ([0] = before the first)."""

    def __init__(self) -> None:
        self.states: list[tuple[dict, dict]] = []

    def _take(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        moments = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in trainer.optimizers[0].state_dict()["state"].items()}
        self.states.append((weights, moments))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._take(trainer, pl_module)


def test_a_nan_batch_in_the_demo_changes_nothing_and_training_goes_on(
    tmp_path: Path, sample_prepare: dict, caplog: pytest.LogCaptureFixture,
) -> None:
    config = demo_config(tmp_path, sample_prepare, save_every=100, **{"trainer.max_steps": 5, "data.num_workers": 0})
    poison, snapshots = PoisonHiddenStates(step=2), TrainableSnapshots()
    cli = LitovisCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks[:0] = [poison, snapshots]
    with caplog.at_level(logging.WARNING, logger="litovis.training.nonfinite_guard"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    states = snapshots.states
    assert len(states) == 6 and poison.ids

    def same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
        tensors = lambda s: [*s[0].values(), *(v for m in s[1].values() for v in m.values() if torch.is_tensor(v))]  # noqa: E731
        return all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b), strict=True))

    assert same(states[3], states[2]), "the NaN step changed weights or AdamW state"
    assert not same(states[4], states[3]) and not same(states[2], states[1])
    assert all(torch.isfinite(w).all() for w in states[-1][0].values())
    assert "optimizer step 2 skipped (non-finite loss" in caplog.text and str(poison.ids[:3])[1:-1] in caplog.text
    assert cli.model._ce_ema is not None and math.isfinite(cli.model._ce_ema)
