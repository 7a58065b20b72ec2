"""The `litovis` command: Lightning's four subcommands (LightningCLI) and three tools (jsonargparse).

    litovis fit|validate|test|predict --config X.yaml [--config overlay.yaml ...] [--ckpt_path last|PATH]
        [--seed_everything N] [--trainer.* / --model.* / --data.* overrides] [--print_config]
    litovis prepare --config configs/prepare/X.yaml [--<PrepareConfig field> VALUE ...]
        raw data -> prepared train/val/test parquet + report.json
    litovis evaluate --predictions FILE --references FILE [--output scores.json] [--tasks '[T1, T2]']
        [--bertscore_model DIR] [--clip_model DIR] [--images_dir DIR] [--bertscore_layer N]
    litovis export --checkpoint CKPT --output_dir DIR [--format adapter|merged]
        [--base DIR|REPO_ID] [--dtype bfloat16|float16|float32]

`evaluate` and `export` also read their arguments from `--config X.yaml` and show them with
`--print_config`.

Notable: checkpoints carry no hyper-parameters (`load_from_checkpoint_support=False`), so
`--ckpt_path` restores weights and loop state and never overrides the YAML you pass; the model
source is linked into the data module, so the tokenizer and image geometry can never disagree with
the model. `--ckpt_path` is always loaded with `weights_only=True` (`--weights_only false` is refused).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

TOOL_COMMANDS = ("prepare", "evaluate", "export")


class LitovisCLI(LightningCLI):
    """LightningCLI for `OvisFineTuner` + `OvisDataModule`, the data wired to the model's source."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        from litovis.data.datamodule import OvisDataModule
        from litovis.training.module import OvisFineTuner

        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(OvisFineTuner, OvisDataModule, load_from_checkpoint_support=False, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # tokenizer and image geometry come from the model's source
        parser.link_arguments("model.source", "data.source")

    def before_instantiate_classes(self) -> None:
        # `--ckpt_path` is read with torch.load(weights_only=True): a checkpoint never runs code.
        if self.subcommand is None:
            return
        arguments = self.config[self.subcommand]
        if arguments.get("weights_only") is False:
            raise ValueError("--weights_only false is refused: litovis checkpoints hold tensors and plain data only")
        arguments["weights_only"] = True


def tool_main(command: str, args: list[str]) -> object:
    """Run one of the non-Lightning commands through jsonargparse (`--config` YAML supported)."""
    from jsonargparse import auto_cli

    if command == "prepare":
        return prepare_main(args)
    if command == "evaluate":
        from litovis.evaluation.evaluate import evaluate as function
    else:
        from litovis.inference.export import export as function
    return auto_cli(function, args=args, as_positional=False)


def prepare_main(args: list[str]) -> object:
    """`litovis prepare --config configs/prepare/X.yaml [--seed 7 ...]`: raw data -> prepared parquet."""
    from jsonargparse import ArgumentParser

    from litovis.data.prepare import PrepareConfig, run_prepare

    parser = ArgumentParser(prog="litovis prepare", description="Read, fetch, curate and split raw data.")
    parser.add_argument("--prepare", type=PrepareConfig, required=True, help="a configs/prepare/*.yaml file")
    # `--config X` is the YAML of a PrepareConfig; `--field value` overrides one of its fields.
    renamed = ["--prepare" if a == "--config" else a.replace("--config=", "--prepare=", 1) for a in args]
    nested = [f"--prepare.{a[2:]}" if a.startswith("--") and not a.startswith(("--prepare", "--help")) else a for a in renamed]
    return run_prepare(parser.instantiate(parser.parse_args(nested)).prepare)


def main(argv: list[str] | None = None) -> None:
    """Run `litovis <command> ...` (`argv`: the words after `litovis`; None = the command line).

    Commands:
        fit, validate, test, predict: LightningCLI (`--config` YAML files, later ones overriding
            earlier ones; `--ckpt_path`; `--seed_everything`; `--trainer.*`, `--model.*`, `--data.*`).
        prepare: `--config configs/prepare/X.yaml`, then `--<field> VALUE` overriding its fields.
        evaluate: `--predictions`, `--references`, `--output`, `--tasks`, `--bertscore_model`,
            `--clip_model`, `--images_dir`, `--bertscore_layer`.
        export: `--checkpoint`, `--output_dir`, `--format` (adapter | merged), `--base`, `--dtype`.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOL_COMMANDS:
        tool_main(args[0], args[1:])
    else:
        LitovisCLI(argv)  # None: LightningCLI reads the command line itself (passing it warns)


if __name__ == "__main__":
    main()
