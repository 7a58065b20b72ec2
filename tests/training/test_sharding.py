"""FSDP2 sharding of Ovis2.5 on 2 CPU processes (gloo): nothing whole, yet the same weights.

One spawned pair of processes checks, on the tiny reference checkpoint: the sharded model built on
the meta device and filled from the safetensors files holds exactly `load_ovis`'s weights (every
tensor reassembled with `full_tensor`), each rank holding only its rows; a randomly initialised
sharded model equals `build_ovis` from the same seed; and PiSSA on the sharded model gives the
factors, adapters and residual of a single process; `total_norm` of the shards is the norm of the
whole tensors on every rank. `total_norm` of plain tensors is checked in this process.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ASSETS = Path(__file__).resolve().parents[1] / "assets"

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded(source_checkpoint: Path | None, lora):
    """Meta build → LoRA → fully_shard → materialise, as `OvisFineTuner.configure_model` does."""
    from torch.distributed.device_mesh import init_device_mesh

    from litovis.model.checkpoint import build_ovis
    from litovis.model.config import OvisConfig
    from litovis.model.presets import preset
    from litovis.training.lora import apply_lora
    from litovis.training.sharding import fsdp_mesh, materialize_sharded, shard_ovis

    config = OvisConfig.from_file(source_checkpoint / "config.json") if source_checkpoint else preset("tiny")
    ovis = build_ovis(config, dtype=torch.float32, device="meta")
    ovis.requires_grad_(False)
    with torch.device("meta"):
        model = apply_lora(ovis, lora)
    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("data_parallel", "tensor_parallel"))
    shard_ovis(model, ovis, fsdp_mesh(mesh), "32-true")
    materialize_sharded(model, ovis, torch.device("cpu"), str(source_checkpoint) if source_checkpoint else None,
                        torch.float32, init_std=0.125, seed=3, lora_seed=lora.seed)
    return model, ovis


def _check(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _compare_with_one_process(rank)
    finally:
        dist.destroy_process_group()


def _compare_with_one_process(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    from litovis.model.checkpoint import build_ovis, load_ovis
    from litovis.model.presets import preset
    from litovis.training.distributed_pissa import pissa_initialize_on_ranks
    from litovis.training.lora import LoRAConfig, apply_lora, lora_layers, pissa_initialize
    from litovis.training.sharding import checkpoint_key, total_norm

    lora = LoRAConfig(rank=4, alpha=8.0, init="pissa_niter_2", seed=5)
    reference_dir = ASSETS / "ovis_tiny_reference"

    # 1. loaded from the checkpoint: each rank holds its rows only, the whole equals load_ovis
    model, ovis = _sharded(reference_dir, lora)
    loaded, _ = load_ovis(reference_dir, dtype=torch.float32)
    expected = loaded.state_dict()
    split = 0
    for name, param in ovis.named_parameters():
        if ".lora_" in name:
            continue
        assert isinstance(param, DTensor), name
        split += param.to_local().shape[0] < param.shape[0]
        torch.testing.assert_close(param.full_tensor(), expected[checkpoint_key(name)], rtol=0, atol=0, msg=name)
    assert split > 0, "no parameter was actually split between the ranks"
    sharded = [param for name, param in ovis.named_parameters() if ".lora_" not in name]
    whole = torch.cat([param.full_tensor().flatten() for param in sharded])
    # a per-shard norm would be off by a factor near sqrt(2); summation order differs by ~1e-6
    torch.testing.assert_close(total_norm(sharded), torch.linalg.vector_norm(whole), rtol=1e-5, atol=0)

    # 2. random init: the same weights as an unsharded build from the same seed
    model, ovis = _sharded(None, lora)
    torch.manual_seed(3)
    plain = build_ovis(preset("tiny"), dtype=torch.float32, init_std=0.125)
    plain.requires_grad_(False)
    plain_state = plain.state_dict()
    for name, param in ovis.named_parameters():
        if ".lora_" not in name:
            torch.testing.assert_close(param.full_tensor(), plain_state[checkpoint_key(name)], rtol=0, atol=0, msg=name)

    # 3. PiSSA: rank 0's factors everywhere, equal to one process's, and the same residual weights
    initial = pissa_initialize_on_ranks(model, lora)
    reference = apply_lora(plain, lora)
    reference_initial = pissa_initialize(reference, lora)
    assert initial.keys() == reference_initial.keys()
    for key, value in initial.items():
        torch.testing.assert_close(value, reference_initial[key], rtol=0, atol=0, msg=key)
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.full_tensor(), reference_params[name].detach(), rtol=0, atol=0, msg=name)
    assert len(lora_layers(model)) == len(lora_layers(reference)) > 0
    if rank == 0:
        assert all(v.device.type == "cpu" for v in initial.values())


def test_sharded_model_holds_the_weights_of_one_process() -> None:
    # A failing rank raises here, with its traceback, as `ProcessRaisedException`.
    mp.start_processes(_check, args=(2, _free_port()), nprocs=2, start_method="spawn")


def test_total_norm_of_plain_tensors_is_the_norm_of_their_concatenation() -> None:
    from litovis.training.sharding import total_norm

    torch.manual_seed(0)
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    total = total_norm(tensors)
    assert type(total) is torch.Tensor and total.ndim == 0
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors])))
