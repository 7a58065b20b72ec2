"""PiSSA with several processes: one SVD per matrix, the same factors and residual on every rank.

With one process this is `litovis.training.lora.pissa_initialize` itself. With several, rank 0
computes every factor pair (in the same seeded order as one process would, so the values equal
a single-process run's) and broadcasts it; every rank then builds the residual base weight from
exactly those factors. Without the broadcast, DDP ranks could end up with different residuals
(GPU SVDs need not be bit-reproducible) and a resumed run, which rebuilds every rank's residual
from rank 0's stored factors, would silently differ from the run that was saved.

Under FSDP the base weight is sharded: each matrix is all-gathered in turn (only one is ever whole)
for rank 0's SVD, and each rank writes its own rows of the residual and of A/B. The factors and
the residual come from the same functions as one process's (`pissa_factors`,
`subtract_pissa_product`), so neither the broadcast nor the sharding changes a bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from litovis.training.lora import (
    LoRAConfig,
    check_pissa_state,
    lora_adapter,
    lora_layers,
    pissa_factors,
    pissa_initialize,
    pissa_niter,
    restore_pissa_residual,
    seeded,
    subtract_pissa_product,
)
from litovis.training.sharding import local_rows, local_tensor, write_full


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def _apply_residual_rows(layer: nn.Module, a0: Tensor, b0: Tensor) -> None:
    """This rank's rows of the residual `W - s·B0·A0` (all of them when the weight is not sharded)."""
    _, _, scale = lora_adapter(layer)
    weight = layer.get_base_layer().weight
    start, stop = local_rows(weight)
    subtract_pissa_product(local_tensor(weight), a0, b0, scale, slice(start, stop))


@torch.no_grad()
def pissa_initialize_on_ranks(model: nn.Module, cfg: LoRAConfig) -> dict[str, Tensor]:
    """`pissa_initialize` for every process of the job (collective: every rank must call it).

    Returns the `{"<layer>.A0": ..., "<layer>.B0": ...}` factors (CPU, base dtype), equal on all ranks.
    """
    world, rank = _world()
    sharded = _is_sharded(model)
    if world == 1 and not sharded:
        return pissa_initialize(model, cfg)
    niter = pissa_niter(cfg.init)
    initial: dict[str, Tensor] = {}
    with seeded(cfg.seed):
        for name, layer in lora_layers(model).items():
            lora_a, lora_b, scale = lora_adapter(layer)
            weight = layer.get_base_layer().weight
            device = local_tensor(weight).device
            whole = weight.full_tensor() if sharded else weight  # collective under FSDP
            r = lora_a.weight.shape[0]
            if rank == 0:
                a0, b0 = pissa_factors(whole, r, scale, niter)
            else:
                a0 = torch.empty(r, weight.shape[1], dtype=weight.dtype, device=device)
                b0 = torch.empty(weight.shape[0], r, dtype=weight.dtype, device=device)
            del whole
            if world > 1:
                dist.broadcast(a0, src=0)
                dist.broadcast(b0, src=0)
            _apply_residual_rows(layer, a0, b0)
            write_full(lora_a.weight, a0)
            write_full(lora_b.weight, b0)
            initial[f"{name}.A0"] = a0.cpu()
            initial[f"{name}.B0"] = b0.cpu()
    return initial


@torch.no_grad()
def restore_pissa_residual_on_ranks(model: nn.Module, initial: dict[str, Tensor]) -> None:
    """Rebuild the residual base weights from stored factors, on full or sharded weights (resume)."""
    if not _is_sharded(model):
        restore_pissa_residual(model, initial)
        return
    layers = lora_layers(model)
    check_pissa_state(layers, initial)
    for name, layer in layers.items():
        _apply_residual_rows(layer, initial[f"{name}.A0"], initial[f"{name}.B0"])
