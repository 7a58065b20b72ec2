"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for Ovis2.5 under Lightning's `ModelParallelStrategy`.

`shard_ovis` wraps each LLM decoder layer and each ViT encoder layer in its own FSDP unit and the
whole model in the root unit (embeddings, lm_head, visual head, VTE, final norm, ViT stem);
`materialize_sharded` then gives each rank its own rows of every parameter.

Notable:
- Nothing is ever whole on one device: the model is built on the meta device, wrapped with LoRA,
  sharded, and only then each rank allocates its shard and fills it, one tensor at a time, either
  from its rows of the safetensors files (`get_slice`, nothing else is read) or from a full-size
  random init drawn in the same order as `build_ovis` (so the sharded model has the same weights as
  an unsharded one built from the same seed).
- Lightning's mesh is 2-D (`data_parallel`, `tensor_parallel`). litovis has no tensor parallelism
  and reads it as (replicate, shard): parameters are sharded over the inner dimension and
  replicated over the outer one (HSDP). Lightning's defaults (outer = nodes, inner = the GPUs of a
  node) therefore keep the all-gathers inside a node; `data_parallel_size: 1` shards over all ranks.
- The root unit holds the output weight that the chunked loss reads, which is whole only during
  the root's forward: the loss is computed inside `Ovis2_5.forward` (its `head_loss` argument).
- Every rank must run the same FSDP units in the same order, so a text-only batch runs the vision
  tower on a dummy image with zero contribution (`Ovis2_5.touch_vision_without_images = "always"`).
- Parameters are sharded on dim 0 with `torch.chunk` semantics (FSDP2's rule); the shard of every
  parameter is checked against the rows computed here before anything is written.
- `consolidate_checkpoint` turns a sharded checkpoint folder into the one-file format of
  single-GPU/DDP runs (for export and predict).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from litovis.model.checkpoint import _checkpoint_shapes, _tensor_files, check_keys, resolve_checkpoint_dir
from litovis.model.ovis import Ovis2_5
from litovis.model.qwen3 import RMSNorm
from litovis.training.lora import seeded

MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def fsdp_mesh(mesh):
    """The mesh to shard over: Lightning's 2-D mesh as (replicate, shard), or its shard dimension
    alone when nothing is replicated."""
    if mesh.ndim != 2:
        raise ValueError(f"expected Lightning's 2-D (data_parallel, tensor_parallel) mesh, got {mesh.ndim}-D")
    return mesh if mesh.size(0) > 1 else mesh[mesh.mesh_dim_names[1]]


def mixed_precision_policy(precision: str):
    """FSDP2 mixed precision for a Lightning precision flag: `bf16-mixed` all-gathers parameters in
    bf16 and reduces gradients in float32 (the float32 masters stay sharded); `*-true` casts nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = MIXED_PRECISION.get(str(precision))
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_ovis(model: nn.Module, ovis: Ovis2_5, mesh, precision: str) -> None:
    """`fully_shard` every LLM decoder layer, every ViT encoder layer, then `model` (the root).

    `model` is what the training step calls (the PEFT wrapper, or `ovis` itself).
    """
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(precision)
    layers = [*ovis.llm.model.layers, *ovis.visual_tokenizer.vit.vision_model.encoder.layers]
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """`(start, stop)` of the dim-0 rows that this rank holds of a sharded parameter (all rows of a
    plain tensor)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = param.shape[0] if param.dim() else 1
    if not isinstance(param, DTensor):
        return 0, rows
    start, stop = 0, rows
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"only dim-0 sharding is supported, got {param.placements}")
            parts = param.device_mesh.size(mesh_dim)
            coordinate = param.device_mesh.get_local_rank(mesh_dim)
            chunk = math.ceil(rows / parts)
            start, stop = min(coordinate * chunk, rows), min((coordinate + 1) * chunk, rows)
    return start, stop


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `param` (a view: writing it writes the parameter); `param` itself if plain."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of `tensors` taken together, as a plain tensor even when they are FSDP shards
    (then a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    total = torch.nn.utils.get_total_norm(tensors)
    return total.full_tensor() if isinstance(total, DTensor) else total


@torch.no_grad()
def write_rows(param: torch.Tensor, rows: torch.Tensor, name: str = "") -> None:
    """Copy `rows` (this rank's rows of the full tensor, see `local_rows`) into `param`'s shard."""
    local = local_tensor(param)
    if tuple(rows.shape) != tuple(local.shape):
        raise RuntimeError(
            f"{name or 'parameter'}: this rank holds a shard of shape {tuple(local.shape)} but rows "
            f"{local_rows(param)} of the full tensor have shape {tuple(rows.shape)}"
        )
    local.copy_(rows.to(local.device, local.dtype))


@torch.no_grad()
def write_full(param: torch.Tensor, full: torch.Tensor, name: str = "") -> None:
    """Copy this rank's rows of `full` (the whole tensor, identical on every rank) into `param`."""
    start, stop = local_rows(param)
    write_rows(param, full[start:stop] if full.dim() else full, name)


def adapter_parameters(ovis: nn.Module) -> set[int]:
    """ids of the parameters that belong to PEFT adapters (everything of a LoRA layer but its base)."""
    from peft.tuners.lora import LoraLayer

    found: set[int] = set()
    for module in ovis.modules():
        if isinstance(module, LoraLayer):
            for child_name, child in module.named_children():
                if child_name != "base_layer":
                    found.update(id(p) for p in child.parameters())
    return found


@torch.no_grad()
def init_lora_sharded(ovis: nn.Module, seed: int) -> None:
    """Default LoRA init on a sharded model: A kaiming-uniform (drawn whole, seeded), B zero.

    The model output is unchanged (B = 0); the A values differ from PEFT's own init (which also
    draws the discarded constructor init), so compare sharded and unsharded runs with PiSSA.
    """
    from peft.tuners.lora import LoraLayer

    with seeded(seed):
        for module in ovis.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.active_adapters:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                full = torch.empty(a.shape, dtype=torch.float32, device=local_tensor(a).device)
                nn.init.kaiming_uniform_(full, a=math.sqrt(5))
                write_full(a, full)
                local_tensor(b).zero_()


@torch.no_grad()
def init_random_sharded(ovis: nn.Module, std: float, dtype: torch.dtype) -> None:
    """`init_weights` on a sharded model: each tensor drawn whole (in `dtype`, on this rank's device,
    in the same order) and only this rank's rows kept, so the values equal an unsharded init."""
    adapters = adapter_parameters(ovis)
    done: set[int] = set()

    def draw(param: torch.Tensor, fill: Callable[[torch.Tensor], object]) -> None:
        if id(param) in adapters:
            return
        full = torch.empty(param.shape, dtype=dtype, device=local_tensor(param).device)
        fill(full)
        write_full(param, full)
        done.add(id(param))

    for module in ovis.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            draw(module.weight, lambda t: t.normal_(0.0, std))
            if getattr(module, "bias", None) is not None:
                draw(module.bias, torch.Tensor.zero_)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            draw(module.weight, lambda t: t.fill_(1.0))
            if getattr(module, "bias", None) is not None:
                draw(module.bias, torch.Tensor.zero_)
    left = [name for name, p in ovis.named_parameters() if id(p) not in done and id(p) not in adapters]
    if left:
        raise RuntimeError(f"random init left parameters uninitialised: {left[:5]}")


def checkpoint_key(name: str) -> str:
    """Official checkpoint key of a base parameter of the LoRA-wrapped model."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def load_sharded_checkpoint(ovis: nn.Module, source: str | Path, dtype: torch.dtype) -> None:
    """Fill the base parameters of a sharded model from an official checkpoint: each rank reads only
    its own rows of each tensor, cast to `dtype` (then to the parameter's dtype, as `load_ovis`
    followed by the float32 cast of trainable weights would).

    Raises:
        CheckpointMismatchError: names or shapes differ from the model built from its config.json.
    """
    directory = resolve_checkpoint_dir(source)
    stored = _checkpoint_shapes(_tensor_files(directory))
    with torch.device("meta"):
        reference = Ovis2_5(ovis.config)
    check_keys(reference, stored, directory)
    adapters = adapter_parameters(ovis)
    by_file: dict[Path, list[tuple[str, str, torch.Tensor]]] = {}
    for name, param in ovis.named_parameters():
        if id(param) in adapters:
            continue
        key = checkpoint_key(name)
        by_file.setdefault(stored[key][0], []).append((name, key, param))
    from safetensors import safe_open

    for file, entries in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name, key, param in entries:
                start, stop = local_rows(param)
                piece = handle.get_slice(key)
                rows = piece[start:stop] if param.dim() else handle.get_tensor(key)
                write_rows(param, rows.to(dtype), name)


def materialize_sharded(model: nn.Module, ovis: nn.Module, device: torch.device, checkpoint: str | None,
                        dtype: torch.dtype, init_std: float | None, seed: int, lora_seed: int) -> None:
    """Allocate each rank's shards on `device` and fill them (checkpoint rows, or the seeded random
    init of `build_ovis`); LoRA adapters get their default init (PiSSA comes later, on all ranks).

    `model` is the root FSDP module (it must be the one moved); `ovis` the `Ovis2_5` inside it.
    """
    model.to_empty(device=device)
    if any(True for _ in model.buffers()):
        raise RuntimeError("the model has buffers, which sharded materialisation does not fill")
    if checkpoint is not None:
        load_sharded_checkpoint(ovis, checkpoint, dtype)
    else:
        std = init_std if init_std is not None else ovis.config.llm.extra.get("initializer_range", 0.02)
        with seeded(seed):  # the run's own RNG stream (dropout) stays `seed_everything`'s
            init_random_sharded(ovis, std, dtype)
    init_lora_sharded(ovis, lora_seed)


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """Turn a sharded checkpoint folder (`save_distributed_checkpoint: true`) into one file that
    `litovis export`, `predict` and `OvisFineTuner.for_inference` read: the trainable weights,
    whole, plus everything else the run saved (no optimizer state: not for resuming).

    Runs in one process, without GPUs; reads only the weights, not the optimizer shards.
    """
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder, output = Path(folder), Path(output)
    meta = folder / "meta.pt"
    if not meta.is_file():
        raise FileNotFoundError(f"{folder}: not a sharded Lightning checkpoint (no meta.pt)")
    prefix = "state_dict."
    weights = {
        key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in FileSystemReader(folder).read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not weights:
        raise ValueError(f"{folder}: the checkpoint holds no model weights")
    state = {"state_dict": weights}
    load(state, checkpoint_id=folder, no_dist=True)
    checkpoint = torch.load(meta, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = state["state_dict"]
    torch.save(checkpoint, output)
    return output
