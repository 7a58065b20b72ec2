"""Every rank's RNG state in the checkpoint, so that a resumed run draws the same dropout masks.

Lightning saves no RNG state. The ranks' generators advance differently (their micro-batches differ
in size), so the states of all ranks are gathered into the checkpoint (which rank 0 writes) and each
rank restores its own. A checkpoint written by one process holds one state (older ones: a dict).
"""

from __future__ import annotations

from typing import Any

import torch


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """The CPU (and CUDA) RNG state of every rank, in rank order; collective with several processes."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def rank_rng_state(stored: list[dict[str, Any]] | dict[str, Any] | None, rank: int) -> dict[str, Any] | None:
    """This rank's state from a checkpoint's `rng` entry; None when the checkpoint has none for it
    (written with fewer ranks: such a run cannot resume exactly anyway, it keeps the seed's state)."""
    if stored is None:
        return None
    states = [stored] if isinstance(stored, dict) else stored
    return states[rank] if rank < len(states) else None


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Set the CPU (and CUDA) generators of this process to `state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], device)
