"""`ActivationOffload`: large activations saved for backward wait in pinned host memory instead of
on the GPU.

Used as saved-tensor hooks around chosen decoder layers (`memory.offload_layers`): during the
forward every saved tensor of at least `min_bytes` that is not a parameter is copied to pinned
host memory on a side stream, and its GPU memory is given back as soon as that copy has run
(`record_stream`); in backward each tensor comes back on another side stream, the next
`prefetch` ones (in reverse order of saving, the order backward needs them) already on their way,
so copies overlap compute in both directions. Values are copied bit for bit: gradients equal those
of a run without offloading. Works with compiled layers (their saved tensors pass through the hooks).

Notable:
- Only CUDA tensors move; on other devices the hooks keep tensors where they are (so CPU tests
  run the same code path up to the copies).
- Pinned buffers come from PyTorch's caching host allocator, so after the first step no new
  pinned memory is registered.
- One instance serves one forward/backward at a time (training micro-batches are sequential).
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Offloaded:
    """A saved tensor parked on the host, and its way back."""

    index: int
    host: Tensor
    device: torch.device
    copied: torch.cuda.Event | None
    back: Tensor | None = None
    arrived: torch.cuda.Event | None = None


class ActivationOffload:
    """Saved-tensor hooks moving large saved activations to pinned host memory (see module doc).

    Args:
        min_bytes: smaller saved tensors stay on the GPU (copy latency would outweigh the saving).
        prefetch: saved tensors brought back ahead of the one backward asks for.
    """

    def __init__(self, min_bytes: int = 1 << 20, prefetch: int = 4) -> None:
        if min_bytes < 0 or prefetch < 0:
            raise ValueError(f"min_bytes and prefetch must be >= 0, got {min_bytes}, {prefetch}")
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self._parameters: set[int] = set()
        # Weak: autograd owns the parked items; a graph freed without backward takes its items along.
        self._items: weakref.WeakValueDictionary[int, _Offloaded] = weakref.WeakValueDictionary()
        self._next_index = 0
        self._streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None
        self.offloaded_bytes = 0
        """Bytes moved to the host so far."""

    def ignore_parameters(self, module: torch.nn.Module) -> None:
        """Never move `module`'s parameters (they are saved for backward by reference, not copied)."""
        self._parameters = {p.data_ptr() for p in module.parameters()}

    def hooks(self) -> AbstractContextManager:
        """The context manager to run offloaded forward code in."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if self._streams is None:
            self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams

    def _pack(self, tensor: Tensor) -> Tensor | _Offloaded:
        size = tensor.numel() * tensor.element_size()
        if size < self.min_bytes or tensor.data_ptr() in self._parameters or tensor.layout != torch.strided:
            return tensor
        index = self._next_index
        self._next_index += 1
        if tensor.device.type != "cuda":
            item = _Offloaded(index, tensor, tensor.device, None)
        else:
            to_host, _ = self._side_streams(tensor.device)
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            to_host.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(to_host):
                host.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(to_host)
            tensor.record_stream(to_host)  # its memory is reused only after the copy has run
            item = _Offloaded(index, host, tensor.device, copied)
            self.offloaded_bytes += size
        self._items[index] = item
        return item

    def _bring_back(self, item: _Offloaded) -> None:
        if item.back is not None or item.copied is None:
            return
        _, to_device = self._side_streams(item.device)
        with torch.cuda.stream(to_device):
            to_device.wait_event(item.copied)
            item.back = item.host.to(item.device, non_blocking=True)
            item.arrived = torch.cuda.Event()
            item.arrived.record(to_device)

    def _unpack(self, packed: Tensor | _Offloaded) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        item = self._items.pop(packed.index, packed)
        if item.copied is None:  # not a CUDA tensor: it never left
            return item.host
        self._bring_back(item)
        for index in range(item.index - 1, max(item.index - 1 - self.prefetch, -1), -1):
            ahead = self._items.get(index)
            if ahead is not None:
                self._bring_back(ahead)
        current = torch.cuda.current_stream(item.device)
        current.wait_event(item.arrived)
        tensor = item.back
        tensor.record_stream(current)  # made on the side stream, used (and freed) on this one
        item.back = None
        return tensor
