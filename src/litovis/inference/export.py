"""`litovis export`: a trained litovis checkpoint → a PEFT LoRA adapter or a merged checkpoint.

Notable:
- The trained model is rebuilt and restored by the training module itself
  (`OvisFineTuner.for_inference`: the `on_load_checkpoint` + `load_state_dict` path of a resumed
  run), so an export cannot disagree with training. The checkpoint is read by
  `litovis.training.checkpoint_io.load_checkpoint_file` (`weights_only=True`; a damaged file's
  error names the newest readable checkpoint beside it).
- `adapter`: a standard PEFT directory for the pristine official model. A PiSSA adapter is only
  valid on its residual base `W - s·B0·A0`, so it becomes a plain LoRA on the original base:
  ΔW = s·(B·A - B0·A0) = s·B'·A' with A' = [A; A0], B' = [B, -B0], rank 2r. The tensors are
  written as trained and the config keeps the scale s: alpha·√2 with rsLoRA (s = alpha/√r),
  2·alpha without (s = alpha/r). An adapter cannot hold trained vision or full LLM weights: such
  runs must use `merged` (asking for `adapter` raises, nothing is dropped).
- `merged`: W' = W_base + s·B·A per layer in float32 (for PiSSA W_base is the residual, so
  W' = W + s·(B·A - B0·A0)), then everything is cast to `dtype` and saved in the official layout
  with the base's tokenizer, processor and remote-code files.
- Everything is written to `<output_dir>.partial` and renamed when complete; a non-empty
  `output_dir` is refused, so an export never overwrites or half-writes a directory.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from litovis.training.checkpoint_io import load_checkpoint_file
from litovis.training.finetune_model import DTYPES
from litovis.training.lora import lora_layers, target_regex
from litovis.training.module import OvisFineTuner

ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_INFO = "litovis_export.json"
# Top-level files of a model directory that hold the tokenizer, processor, generation defaults,
# chat template and the official remote code. Weights, their index and config.json are written by
# the export itself.
SIDE_FILE_SUFFIXES = (".json", ".txt", ".jinja", ".py", ".model", ".tiktoken")
NOT_SIDE_FILES = ("config.json", "adapter_config.json", EXPORT_INFO)

ExportFormat = Literal["adapter", "merged"]


def export(
    checkpoint: str,
    output_dir: str,
    format: ExportFormat = "adapter",
    base: str | None = None,
    dtype: str = "bfloat16",
) -> Path:
    """Export a litovis training checkpoint for use outside litovis.

    Args:
        checkpoint: a `.ckpt` written by `litovis fit` (trainable weights and a `litovis` block).
        output_dir: new (or empty) directory to write.
        format: `adapter` = PEFT LoRA directory for the pristine base model (`PeftModel.from_pretrained`);
            `merged` = full checkpoint in the official layout (`litovis.model.checkpoint.load_ovis`).
        base: base model directory or Hub repo id to export against, replacing the one recorded in
            the checkpoint (e.g. trained on another machine); it must hold the same weights.
        dtype: dtype of the written weights (`bfloat16`, `float16`, `float32`); merging runs in
            float32 first.

    Returns:
        The output directory.
    """
    if format not in ("adapter", "merged"):
        raise ValueError(f"format must be 'adapter' or 'merged', got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path, output = Path(checkpoint), Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not empty: choose a new output_dir")
    state = load_checkpoint_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a checkpoint written by litovis fit")
    meta = state.get("litovis")
    if isinstance(meta, dict):  # without one, `for_inference` below says so
        check_litovis_block(meta, path)
        if format == "adapter":  # before the (slow) model build
            check_adapter_can_hold(meta, path)
    try:
        module = OvisFineTuner.for_inference(state, base=base)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"{path}: cannot restore the trained model: {reason}") from err

    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted export of this very output_dir
    partial.mkdir(parents=True)
    if format == "adapter":
        conversion = write_adapter(module, state.get("pissa_initial"), partial, DTYPES[dtype])
    else:
        conversion = write_merged(module, partial, DTYPES[dtype])
    source = module.source
    info = {
        "format": format,
        "checkpoint": str(path.resolve()),
        "global_step": meta.get("global_step"),
        "base": source.checkpoint or f"preset {source.preset!r}, random init with seed {source.seed}",
        "finetune": meta["finetune"],
        "lora": meta.get("lora"),
        "trainable": meta["trainable"],
        "source": asdict(source),
        "trained_with_source": meta["source"],
        "dtype": dtype,
        "conversion": conversion,
        "files": sorted(p.name for p in partial.iterdir()) + [EXPORT_INFO, "README.md"],
    }
    (partial / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (partial / "README.md").write_text(readme(info, output), encoding="utf-8")
    if output.exists():
        output.rmdir()  # empty, checked above
    partial.rename(output)
    return output


def check_litovis_block(meta: dict[str, Any], path: Path) -> None:
    """Raise unless the checkpoint's `litovis` block holds what an export rebuilds the model from."""
    missing = sorted({"source", "finetune", "lora", "trainable"} - set(meta))
    if missing:
        raise ValueError(f"{path}: the `litovis` block lacks {missing}: not written by this version of litovis")


def check_adapter_can_hold(meta: dict[str, Any], path: Path) -> None:
    """Raise unless the run trained LoRA adapters only (a PEFT adapter holds nothing else)."""
    vision = sorted(name for name, on in meta["trainable"].items() if on)
    if meta["finetune"] == "lora" and not vision:
        return
    what = "the full LLM" if meta["finetune"] != "lora" else f"vision parts ({', '.join(vision)})"
    raise ValueError(
        f"{path}: this run trained {what}, which a LoRA adapter cannot hold; "
        "export it with --format merged instead"
    )


def _adapter_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    (name,) = layer.active_adapters
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


@torch.no_grad()
def write_adapter(
    module: OvisFineTuner, initial: dict[str, torch.Tensor] | None, directory: Path, dtype: torch.dtype
) -> str:
    """Write `adapter_config.json` and `adapter_model.safetensors`; returns what was done, in words.

    Keys are PEFT's saved names (`base_model.model.<official module>.lora_A.weight`).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = module.lora
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(module.model).items():
        a, b, _ = _adapter_weights(layer)
        if cfg.is_pissa:  # s·(B·A - B0·A0) as one LoRA of rank 2r on the original base
            a = torch.cat([a.float(), initial[f"{name}.A0"].float()], dim=0)
            b = torch.cat([b.float(), -initial[f"{name}.B0"].float()], dim=1)
        tensors[f"{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.to(dtype).contiguous()
    rank, alpha = cfg.rank, cfg.alpha
    if cfg.is_pissa:
        rank, alpha = 2 * rank, alpha * (math.sqrt(2) if cfg.rslora else 2)
    LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.rslora,
        target_modules=target_regex(cfg.targets),
        init_lora_weights=True,  # never re-run PiSSA on load: the weights are loaded as written
        bias="none",
        base_model_name_or_path=module.source.checkpoint,
    ).save_pretrained(str(directory))
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    kind = "rsLoRA" if cfg.rslora else "LoRA"
    if not cfg.is_pissa:
        return f"plain {kind} as trained: rank {rank}, alpha {alpha:g}, scale {cfg.scale:g}"
    return (
        f"{cfg.init} adapter converted to a plain {kind} on the original base: A' = [A; A0], "
        f"B' = [B, -B0] (rank {cfg.rank} -> {rank}); alpha {cfg.alpha:g} -> {alpha:g} keeps the scale {cfg.scale:g}"
    )


@torch.no_grad()
def merged_model(module: OvisFineTuner, dtype: torch.dtype) -> nn.Module:
    """The trained `Ovis2_5` with adapters folded into the base weights (in float32), cast to `dtype`."""
    if module.finetune != "lora":
        return module.ovis.to(dtype)
    for layer in lora_layers(module.model).values():
        a, b, scale = _adapter_weights(layer)
        weight = layer.get_base_layer().weight
        weight.data = (weight.float() + scale * (b.float() @ a.float())).to(dtype)
    return module.model.unload().to(dtype)


def write_merged(module: OvisFineTuner, directory: Path, dtype: torch.dtype) -> str:
    """Write the merged model in the official layout plus the base's side files; returns what was done."""
    from litovis.model.checkpoint import save_ovis

    save_ovis(merged_model(module, dtype), directory)
    copy_side_files(module.source, directory)
    if module.finetune != "lora":
        done = "fully fine-tuned LLM weights"
    elif module.lora.is_pissa:
        done = f"{module.lora.init} adapters folded into their residual base: W - s·B0·A0 + s·B·A"
    else:
        done = "LoRA adapters folded into the base: W + s·B·A"
    vision = [name for name, on in asdict(module.trainable).items() if on]
    trained_vision = f", trained {', '.join(vision)} weights" if vision else ""
    return f"{done}{trained_vision}; merged in float32, cast to {str(dtype).removeprefix('torch.')}"


def copy_side_files(source: Any, directory: Path) -> list[str]:
    """Copy tokenizer/processor/generation/remote-code files of the base (and of a separate
    tokenizer source) into `directory`; the built-in `tiny` tokenizer is saved there. Returns names."""
    from litovis.model.checkpoint import resolve_checkpoint_dir

    sources = [s for s in (source.checkpoint, source.tokenizer) if s not in (None, "tiny")]
    written: set[str] = set()
    for folder in map(resolve_checkpoint_dir, sources):
        for file in sorted(folder.iterdir()):
            side = file.suffix in SIDE_FILE_SUFFIXES and file.name not in NOT_SIDE_FILES
            if file.is_file() and side and not file.name.endswith(".index.json"):
                shutil.copyfile(file, directory / file.name)  # follows Hub-cache symlinks
                written.add(file.name)
    if source.tokenizer == "tiny":
        from litovis.processing.tiny_tokenizer import build_tiny_tokenizer

        written.update(Path(f).name for f in build_tiny_tokenizer().save_pretrained(str(directory)))
    return sorted(written)


def readme(info: dict[str, Any], output: Path) -> str:
    """A short human-readable description of the export: what, how it was made, how to load it."""
    step = info["global_step"]
    lora = info["lora"]
    trained = "full fine-tune of the LLM" if info["finetune"] != "lora" else (
        f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g}, {'rsLoRA, ' if lora['rslora'] else ''}"
        f"init {lora['init']}, on {', '.join(lora['targets'])}"
    )
    vision = [name for name, on in info["trainable"].items() if on]
    if vision:
        trained += f"; also trained: {', '.join(vision)}"
    if info["format"] == "adapter":
        what = "A PEFT LoRA adapter for the pristine Ovis2.5 base model below."
        load = (
            "from peft import PeftModel\n"
            "from litovis.model.checkpoint import load_ovis\n\n"
            f"base, _ = load_ovis({str(info['source']['checkpoint'] or '<base model dir>')!r})\n"
            f"model = PeftModel.from_pretrained(base, {str(output)!r})\n"
        )
    else:
        what = "A full Ovis2.5 checkpoint in the official layout, with the fine-tuning merged in."
        load = f"from litovis.model.checkpoint import load_ovis\n\nmodel, config = load_ovis({str(output)!r})\n"
    lines = [
        f"# litovis export ({info['format']})",
        "",
        what,
        "",
        f"- base model: `{info['base']}`",
        f"- checkpoint: `{info['checkpoint']}`" + (f" (step {step})" if step is not None else ""),
        f"- training: {trained}",
        f"- export: {info['conversion']}",
        f"- weights dtype: {info['dtype']}",
        f"- files: {', '.join(info['files'])}",
        "",
        "## Load",
        "",
        "```python",
        load.rstrip("\n"),
        "```",
        "",
        f"All export settings are in `{EXPORT_INFO}`.",
        "",
    ]
    return "\n".join(lines)
