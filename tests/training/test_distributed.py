"""DDP and FSDP through Lightning's own strategies: `litovis fit|validate` with 2 CPU processes (gloo).

Each run is a real `python -m litovis ...` process; Lightning's launcher starts the second rank
exactly as it would on GPUs (configs use `ddp`, not `ddp_spawn`). A `StepProbe` callback in every
rank writes what the tests compare. The contracts:

- one optimizer step over 2 ranks x accumulate 2 equals one process accumulating the same 4
  micro-batches (loss normalised per target token over the whole step, DDP/FSDP averaging undone),
  with a trainable ViT and text-only micro-batches, and validation reduced across ranks;
- a run resumed from a mid-epoch checkpoint repeats the uninterrupted run bit for bit on every
  rank (PiSSA, LoRA dropout and data order included);
- an FSDP checkpoint written by 2 processes, sharded or as one file, reloads in 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
FSDP = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}  # sharded checkpoints (DCP)
FSDP_FULL = {**FSDP, "init_args": {"save_distributed_checkpoint": False}}  # one checkpoint file
STRATEGIES = {"ddp": "ddp", "fsdp": FSDP, "fsdp_full": FSDP_FULL}

# Each test launches 2-3 runs of 2 processes (20-60 s each on a 2-core machine).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
]


@pytest.fixture(scope="module")
def prepare(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sample's prepare settings, writing into a temporary directory (prepared by the first run)."""
    root = tmp_path_factory.mktemp("prepared")
    prepare = yaml.safe_load((REPO / "configs/prepare/sample.yaml").read_text())
    prepare["output_dir"] = str(root / "sample")
    prepare["image_dir"] = str(root / "images")
    prepare["fetch"]["progress"] = False
    return prepare  # its relative paths are the repository's: every run starts there


def run_config(directory: Path, prepare: dict, *, devices: int, strategy: Any, accumulate: int, max_steps: int,
               val_every: int, dropout: float, save_every: int | None = None, finetune: str = "lora") -> Path:
    """`configs/demo.yaml` for a short distributed run writing into `directory`, with a `StepProbe`."""
    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(
        devices=devices, strategy=strategy, accumulate_grad_batches=accumulate, max_steps=max_steps,
        val_check_interval=val_every, num_sanity_val_steps=0, enable_progress_bar=False,
    )
    trainer["logger"]["init_args"]["save_dir"] = str(directory / "logs")
    for callback in trainer["callbacks"]:
        args = callback.get("init_args", {})
        if "dirpath" in args:
            args["dirpath"] = str(directory / "checkpoints")
        if "every_n_train_steps" in args:
            args["every_n_train_steps"] = save_every or max_steps
            args["save_top_k"] = -1  # keep every rolling checkpoint: the tests resume from one
    trainer["callbacks"].append({
        "class_path": "tests.training.distributed_probe.StepProbe",
        "init_args": {"directory": str(directory / "probe"), "save_grads": True},
    })
    config["data"]["prepare"] = prepare
    config["data"]["num_workers"] = 0
    config["data"]["batching"]["max_samples"] = 3
    config["model"]["trainable"] = {"vit": True}  # text-only micro-batches must still work
    config["model"]["lora"]["dropout"] = dropout
    config["model"]["finetune"] = finetune
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def litovis(command: str, config: Path, *extra: str) -> None:
    """Run `python -m litovis <command> --config <config> ...` as a user would; fail with its log."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), OMP_NUM_THREADS="1")
    for leftover in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(leftover, None)
    result = subprocess.run(
        [sys.executable, "-m", "litovis", command, "--config", str(config), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"litovis {command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def probes(directory: Path) -> list[dict]:
    """Every rank's probe record, in rank order."""
    files = sorted((directory / "probe").glob("rank*.json"))
    records = [json.loads(f.read_text()) for f in files]
    assert records and len(records) == records[0]["world_size"]
    return records


def step_losses(records: list[dict]) -> dict[int, float]:
    """Per-token loss of each optimizer step: each rank returns loss_sum·W/T per micro-batch (after
    Lightning's 1/accumulate), so the step's loss is the sum over ranks and micro-batches over W."""
    world = len(records)
    steps = sorted({int(s) for r in records for s in r["losses"]})
    return {s: sum(sum(r["losses"][str(s)]) for r in records) / world for s in steps}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, prepare: dict):
    """`one_process(finetune)`: the run directory of 3 optimizer steps of 4 micro-batches in one
    process, then a validation (run once per fine-tuning mode)."""
    runs: dict[str, Path] = {}

    def run(finetune: str) -> Path:
        if finetune not in runs:
            directory = tmp_path_factory.mktemp(f"one_process_{finetune}")
            config = run_config(directory, prepare, devices=1, strategy="auto", accumulate=4, max_steps=3,
                                val_every=12, dropout=0.0, finetune=finetune)
            litovis("fit", config)
            runs[finetune] = directory
        return runs[finetune]

    return run


@pytest.mark.parametrize(("strategy", "finetune"), [("ddp", "lora"), ("fsdp", "lora"), ("fsdp", "full")])
def test_two_ranks_take_the_step_of_one_process_over_their_union(
    strategy: str, finetune: str, one_process, prepare: dict, tmp_path: Path
) -> None:
    config = run_config(tmp_path, prepare, devices=2, strategy=STRATEGIES[strategy], accumulate=2, max_steps=3,
                        val_every=6, dropout=0.0, finetune=finetune)
    litovis("fit", config)
    baseline = one_process(finetune)
    single, ranks = probes(baseline), probes(tmp_path)
    assert len(ranks) == 2 and sum(r["batches"] for r in ranks) == single[0]["batches"] == 12
    # Text-only micro-batches met a trainable ViT on some rank: the zero-contribution touch kept
    # DDP from failing on unused parameters and FSDP's ranks in step.
    assert sum(r["text_only"] for r in ranks) > 0

    want, got = step_losses(single), step_losses(ranks)
    assert sorted(got) == sorted(want) == [0, 1, 2]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step} loss"
        for rank in ranks:  # DDP/FSDP gradients are the averaged ones on every rank
            assert rank["grad_norms"][str(step)] == pytest.approx(single[0]["grad_norms"][str(step)], rel=1e-5)
    assert ranks[0]["val_loss"]["3"] == pytest.approx(single[0]["val_loss"]["3"], rel=1e-5)
    assert ranks[1]["val_loss"] == ranks[0]["val_loss"]  # every rank logs the reduced value

    # Every parameter's gradient, at every step (the same gradients make the same AdamW updates).
    grads_one = torch.load(baseline / "probe" / "grads.pt")
    grads_two = torch.load(tmp_path / "probe" / "grads.pt")
    assert sorted(grads_two) == sorted(grads_one) == [0, 1, 2]
    for step, want_grads in grads_one.items():
        assert grads_two[step].keys() == want_grads.keys()
        assert any("vision_model" in name for name in want_grads)
        llm = [name for name in want_grads if ".llm." in name]
        assert llm and all((".lora_" in name) == (finetune == "lora") for name in llm)
        # Summation order differs (and AdamW magnifies rounding in near-zero gradients a little
        # over steps): every entry must agree to 1e-5 of the step's largest gradient entry.
        largest = max(g.abs().max() for g in want_grads.values())
        for name, want_grad in want_grads.items():
            torch.testing.assert_close(grads_two[step][name], want_grad, rtol=0, atol=1e-5 * largest, msg=f"{step} {name}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp_full"])
def test_resumed_run_repeats_every_rank_exactly(strategy: str, prepare: dict, tmp_path: Path) -> None:
    options = dict(devices=2, strategy=STRATEGIES[strategy], accumulate=1, max_steps=8, val_every=4, dropout=0.05,
                   save_every=4)
    straight = run_config(tmp_path / "straight", prepare, **options)
    litovis("fit", straight)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step00004.ckpt"
    assert checkpoint.exists()
    resumed = run_config(tmp_path / "resumed", prepare, **options)
    litovis("fit", resumed, "--ckpt_path", str(checkpoint))

    before, after = probes(tmp_path / "straight"), probes(tmp_path / "resumed")
    for rank, (full, tail) in enumerate(zip(before, after, strict=True)):
        assert sorted(tail["losses"], key=int) == [str(s) for s in range(4, 8)]
        for step, losses in tail["losses"].items():
            assert losses == full["losses"][step], f"rank {rank} step {step} differs after resume"
        for step, norm in tail["grad_norms"].items():
            assert norm == full["grad_norms"][step]

    if strategy.startswith("fsdp"):
        # The checkpoint of 2 processes, validated by 1: the same weights, the same loss. A sharded
        # folder reloads (resharded) into FSDP on 1 process; a one-file checkpoint needs no FSDP.
        assert checkpoint.is_dir() == (strategy == "fsdp")
        one = run_config(tmp_path / "one", prepare, devices=1, strategy=FSDP if strategy == "fsdp" else "auto",
                         accumulate=1, max_steps=8, val_every=4, dropout=0.05)
        litovis("validate", one, "--ckpt_path", str(checkpoint))
        (record,) = probes(tmp_path / "one")
        (value,) = record["val_loss"].values()
        assert value == pytest.approx(before[0]["val_loss"]["4"], rel=1e-5)

    if strategy == "fsdp":
        # Consolidated for export/predict: the weights torch's own converter reads from the shards.
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        from litovis.training.module import OvisFineTuner
        from litovis.training.sharding import consolidate_checkpoint

        single_file = consolidate_checkpoint(checkpoint, tmp_path / "consolidated.ckpt")
        consolidated = torch.load(single_file, weights_only=True)
        dcp_to_torch_save(checkpoint, tmp_path / "reference.pt")
        reference = torch.load(tmp_path / "reference.pt", weights_only=False)["state_dict"]
        assert consolidated["state_dict"].keys() == reference.keys()
        assert sorted(reference) == consolidated["litovis"]["trainable_names"]
        for name, value in reference.items():
            assert torch.equal(consolidated["state_dict"][name], value), name
        module = OvisFineTuner.for_inference(consolidated)
        assert not module.training and module.ovis is not None


def test_distributed_predict_writes_every_test_row_once(one_process, prepare: dict, tmp_path: Path) -> None:
    """2 ranks each answer their own length-sorted batches; rank 0 merges the parts in id order."""
    import pandas as pd

    trained = one_process("lora")
    config = run_config(tmp_path, prepare, devices=2, strategy="ddp", accumulate=1, max_steps=1, val_every=1, dropout=0.0)
    overlay = yaml.safe_load((REPO / "configs/demo_predict.yaml").read_text())
    writer = overlay["trainer"]["callbacks"][0]["init_args"]
    writer["output_dir"] = str(tmp_path / "parts")
    writer["submission"] = {"challenge_csv": str(tmp_path / "submission.csv")}
    overlay["data"]["batching"]["predict_batch_size"] = 4
    overlay["trainer"]["default_root_dir"] = str(tmp_path)
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(overlay))
    litovis("predict", config, "--config", str(tmp_path / "predict.yaml"),
            "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"))
    parts = [[json.loads(line)["id"] for line in path.open()] for path in sorted((tmp_path / "parts").glob("part-*.jsonl"))]
    assert len(parts) == 2 and all(parts), "both ranks must have answered some rows"
    assert not set(parts[0]) & set(parts[1])
    rows = len(pd.read_parquet(REPO / "data/sample/challenge/test.parquet"))
    submission = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    assert submission["id"].tolist() == [str(i) for i in range(rows)]
