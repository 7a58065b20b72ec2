"""Load, build and save Ovis2.5 weights in the official checkpoint layout (safetensors, key-exact).

`load_ovis` resolves a local directory or a Hugging Face cache snapshot (never the network),
builds the model on the meta device, checks every tensor name and shape against the model
before reading any data (the error lists missing keys, unexpected keys and shape mismatches,
naming the file), then materialises the weights shard by shard with `assign=True`, cast to the
requested dtype. `build_ovis` makes a randomly initialised model; `save_ovis` writes
`config.json` plus `model.safetensors` or numbered shards with `model.safetensors.index.json`,
all checks first, then into a temporary sibling directory that is swapped in by renames.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from litovis.atomic_files import fsync_path
from litovis.model.config import OvisConfig
from litovis.model.ovis import Ovis2_5
from litovis.model.qwen3 import RMSNorm

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


def resolve_checkpoint_dir(path_or_repo_id: str | Path) -> Path:
    """A local checkpoint directory: the path itself, or the cached snapshot of a Hub repo id.

    Only the local Hugging Face cache is consulted (`local_files_only=True`); nothing is
    downloaded.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; give the checkpoint directory")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1:
        raise FileNotFoundError(f"{repo_id}: no such directory, and not a Hub repo id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # the hub raises several types for "not in the cache"
        raise FileNotFoundError(
            f"{repo_id}: not a local directory and not in the Hugging Face cache "
            f"(download it first, e.g. `huggingface-cli download {repo_id}`): {err}"
        ) from err


def _tensor_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointMismatchError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return [directory / name for name in files]
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor name -> (file, shape), read from the safetensors headers only."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key in found:
                    raise CheckpointMismatchError(f"tensor {key!r} is stored twice: {found[key][0].name} and {file.name}")
                found[key] = (file, tuple(handle.get_slice(key).get_shape()))
    return found


def check_keys(model: nn.Module, stored: dict[str, tuple[Path, tuple[int, ...]]], where: Path) -> None:
    """Raise `CheckpointMismatchError` unless names and shapes match the model exactly."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [
        f"{name}: checkpoint {list(stored[name][1])} in {stored[name][0].name}, model {list(expected[name])}"
        for name in sorted(set(expected) & set(stored))
        if stored[name][1] != expected[name]
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{where}: checkpoint does not match the model built from its config.json"]
    if missing:
        lines.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(f"{k} (in {stored[k][0].name})" for k in unexpected))
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    raise CheckpointMismatchError("\n".join(lines))


def load_ovis(
    path_or_repo_id: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attention_backend: str = "auto",
) -> tuple[Ovis2_5, OvisConfig]:
    """Load an official-layout Ovis2.5 checkpoint; returns `(model in eval mode, config)`."""
    directory = resolve_checkpoint_dir(path_or_repo_id)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    config = OvisConfig.from_file(config_file)
    with torch.device("meta"):
        model = Ovis2_5(config, attention_backend)
    stored = _checkpoint_shapes(_tensor_files(directory))
    check_keys(model, stored, directory)
    device = torch.device(device)
    by_file: dict[Path, list[str]] = {}
    for key, (file, _) in stored.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as handle:
            shard = {key: handle.get_tensor(key).to(dtype) for key in keys}
        model.load_state_dict(shard, strict=False, assign=True)
    _assert_materialised(model, directory)
    return model.eval(), config


def _assert_materialised(model: nn.Module, where: Path) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointMismatchError(f"{where}: tensors left uninitialised after loading: {left}")


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random init: normal(0, std) for linear/conv/embedding weights, zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def build_ovis(
    config: OvisConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention_backend: str = "auto",
    init_std: float | None = None,
) -> Ovis2_5:
    """A randomly initialised model (deterministic under `torch.manual_seed` on a given device).

    `init_std` is the std of the normal init (None: the LLM config's `initializer_range`, 0.02 by
    default). On `device="meta"` the model is only built (shapes, names, counts), never initialised.
    """
    with torch.device("meta"):
        model = Ovis2_5(config, attention_backend)
    device = torch.device(device)
    if device.type == "meta":
        return model.to(dtype)
    model.to_empty(device=device)
    model.to(dtype)
    std = init_std if init_std is not None else config.llm.extra.get("initializer_range", 0.02)
    init_weights(model, std)
    return model


def save_ovis(model: Ovis2_5, directory: str | Path, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `config.json` and the weights in the official layout; returns the directory.

    Tensors go to one `model.safetensors` when they fit in `max_shard_bytes`, otherwise to
    `model-0000i-of-0000n.safetensors` shards in state-dict order plus the index file. Every check
    runs before anything is written; the files are written and fsynced in a hidden sibling
    directory, which replaces `directory` by renames only once complete, so a refused, failed or
    killed save leaves an earlier checkpoint there untouched (a kill between the two renames of
    the swap leaves `directory` absent and both complete versions as hidden siblings). Other files
    in `directory` (tokenizer, processor, ...) are kept; weights of an earlier save are not.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; save_ovis writes a checkpoint directory")
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    with torch.device("meta"):
        reference = Ovis2_5(model.config)
    expected, got = set(reference.state_dict()), set(state)
    if expected != got:
        extra = sorted(got - expected)[:5]
        raise CheckpointMismatchError(
            f"save_ovis writes the official layout only; the model's tensors differ from it "
            f"(missing {sorted(expected - got)[:5]}, extra {extra}): merge or remove adapters first"
        )
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SAVE_DTYPES:
        raise ValueError(f"save_ovis expects all tensors in one of {[_dtype_name(d) for d in SAVE_DTYPES]}, "
                         f"got {dtypes}")
    config = OvisConfig.from_dict(model.config.to_dict())
    config.torch_dtype = _dtype_name(next(iter(dtypes)))

    target = directory.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".saving", dir=target.parent))
    try:
        _write_weights(staging, config, state, max_shard_bytes)
        if target.exists():
            _link_other_files(target, staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_weights(directory: Path, config: OvisConfig, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """`config.json`, the safetensors file(s) and the index (when sharded) into `directory`, fsynced."""
    config.save(directory / "config.json")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata=metadata)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata=metadata)
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for file in directory.iterdir():
        fsync_path(file)
    fsync_path(directory)


def _is_weights_file(name: str) -> bool:
    return name == "config.json" or name == INDEX_FILE or fnmatch.fnmatch(name, "model*.safetensors")


def _link_other_files(old: Path, new: Path) -> None:
    """Hard-link (or copy, across filesystems) what `old` holds besides weights and config into `new`."""

    def link_or_copy(source: str, destination: str) -> None:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)

    for entry in old.iterdir():
        if _is_weights_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            link_or_copy(str(entry), str(new / entry.name))


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete `staging` directory at `target`, replacing what was there, by renames."""
    if target.exists():
        retired = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old")
        os.rename(target, retired)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(retired, target)
            raise
        fsync_path(target.parent)
        shutil.rmtree(retired)
    else:
        os.rename(staging, target)
        fsync_path(target.parent)
