"""The shipped YAML files under `configs/`: each starts with the command that uses it and parses
exactly as that command parses it, every key is commented, and the multi-GPU overlays change only
what they hold when they are put on top of `sft.yaml`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from litovis.cli import LitovisCLI

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SFT_9B = REPO / "configs/ovis2_5-9b/sft.yaml"


class ParseOnly(LitovisCLI):
    """Parses and validates a config without building anything (a 9B config on a CPU)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*files: Path):
    """The namespace `litovis fit --config F1 --config F2 ...` would run with."""
    return ParseOnly(args=[arg for f in files for arg in ("--config", str(f))], run=False).config


def uncommented_keys(text: str) -> list[int]:
    """1-based lines of the mapping keys in `text` with neither a trailing `# ...` comment nor a
    comment line directly above."""
    lines = text.splitlines()
    found: list[int] = []

    def visit(node: yaml.Node) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                visit(item)
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            row = key.start_mark.line
            line = lines[row]
            # what follows the key and the part of its value written on the key's line
            if isinstance(value, yaml.ScalarNode) and value.style in ("|", ">"):
                rest = line[value.start_mark.column:].lstrip("|>+-0123456789")
            elif value.end_mark.line == row and (isinstance(value, yaml.ScalarNode) or value.flow_style):
                rest = line[value.end_mark.column:]
            else:  # a block mapping or list below the key, or a scalar that continues on later lines
                rest = line[key.end_mark.column:].lstrip().removeprefix(":")
            trailing = re.match(r"\s+#", rest) is not None
            above = row > 0 and lines[row - 1].lstrip().startswith("#")
            if not (trailing or above):
                found.append(row + 1)
            visit(value)

    visit(yaml.compose(text))
    return found


def test_the_comment_check_finds_exactly_the_keys_without_comments() -> None:
    text = (
        "a: 1\n"                       # 1: no comment
        "b: 'x # y'\n"                 # 2: a hash inside a string is no comment
        "c: [1, 2]  # ok\n"
        "# d explained\n"
        "d:\n"
        "  - class_path: x.Y  # ok\n"
        "    init_args:\n"             # 7: no comment
        "      e: z  # ok\n"
        "f: |-  # a template\n"
        "  g: not a key\n"
        "h:\n"                         # 11: no comment
        "  i: 2  # ok\n"
    )
    assert uncommented_keys(text) == [1, 2, 7, 11]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_names_its_command_and_comments_every_key(path: Path) -> None:
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("#") and "litovis" in first, f"{path}: the first line must be the command that uses it"
    assert uncommented_keys(text) == [], f"{path}: keys without a comment (trailing or on the line above)"


def test_every_shipped_config_parses_as_its_command_uses_it() -> None:
    """Each config's first line is the command that uses it; parse exactly those --config files."""
    configs = [p for p in CONFIGS if p.name != "prompts.yaml"]  # read by `data.prompts`, not --config
    assert len(configs) >= 8
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# litovis "), f"{path} must start with the command that uses it"
        words = first.split()
        command = words[2]
        files = [REPO / words[i + 1] for i, word in enumerate(words) if word == "--config"]
        assert path in files, f"{path}: its command does not use it"
        if command in ("fit", "validate", "test", "predict"):
            config = parse(*files)
            assert (config["model.source.checkpoint"] is None) != (config["model.source.preset"] is None), path
            assert config["trainer.use_distributed_sampler"] is False, path
        else:
            assert command == "prepare", path
            from jsonargparse import ArgumentParser

            from litovis.data.prepare import PrepareConfig

            parser = ArgumentParser()
            parser.add_argument("--prepare", type=PrepareConfig)
            parser.instantiate(parser.parse_args(["--prepare", str(path)]))


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted paths of the scalar and list values of a nested mapping."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _samples_per_step(config) -> int:
    trainer = config["trainer"]
    return trainer.devices * trainer.num_nodes * trainer.accumulate_grad_batches * config["data.batching.max_samples"]


@pytest.mark.parametrize("overlay", ["sft_ddp.yaml", "sft_fsdp.yaml"])
def test_multi_gpu_overlays_change_only_what_they_hold(overlay: str) -> None:
    path = REPO / "configs/ovis2_5-9b" / overlay
    base, merged = parse(SFT_9B), parse(SFT_9B, path)
    changed = _leaves(yaml.safe_load(path.read_text()))
    for key, value in changed.items():
        assert merged[key] == value, key

    def overridden(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") or c.startswith(key + ".") for c in changed)

    kept = [key for key in base.keys() if key != "config" and not overridden(key)]
    assert len(kept) > 50
    for key in kept:
        assert merged[key] == base[key], f"{overlay} changed {key}"

    strategy = merged["trainer.strategy"]
    if overlay == "sft_ddp.yaml":
        assert strategy == "ddp" and merged["model.memory.compile"] is True
    else:
        assert strategy.class_path == "lightning.pytorch.strategies.ModelParallelStrategy"
        assert strategy.init_args.save_distributed_checkpoint is False
        assert merged["model.memory.compile"] is False  # refused under FSDP
    assert merged["trainer.devices"] == 2 and base["trainer.devices"] == 1
    # the reference recipe's 16 samples per optimizer step, whatever the number of GPUs
    assert _samples_per_step(merged) == _samples_per_step(base) == 16
    assert merged["model.lora.rank"] == 64 and len(merged["trainer.callbacks"]) == len(base["trainer.callbacks"]) == 7
