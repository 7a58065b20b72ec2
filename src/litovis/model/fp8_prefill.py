"""FP8 matmuls for long inputs (prefill), bf16 for short ones (decode steps). Opt-in: it changes the numerics.

Generation time on the test set is mostly prefill, and prefill is compute-bound: FP8 tensor
cores (compute capability 8.9+: Ada, Hopper) run its matmuls 1.6-1.9x as fast. Decode steps
multiply a few rows per matmul and are bound by reading the weights; there `torch._scaled_mm` is
no faster (measured), so they keep the bf16 weights. The FP8 copy costs one byte per weight more
(about 7 GB for the 9B). Measured on an H100 (bench/RESULTS.md): with compiled layers, which fuse
the activations' quantisation into the neighbouring ops, prefill takes 17 % less time; eager, the
quantisation's extra passes make it slower than bf16, so use it with `model.memory.compile: true`.
On CPU the same quantised product is computed in float32 (tests).

Scales are per row: each weight's output row and each activation row (token) is scaled to e4m3's
range (±448) on its own, so a token's result does not depend on the other tokens of its chunk.
`enable_fp8_prefill(model)` wraps every projection of the LLM decoder layers and of the ViT
encoder layers (after any LoRA adapter was merged) in `Fp8PrefillLinear`, and
`disable_fp8_prefill` puts them back; the visual head stays in bf16 (its 65,532 outputs are not
a multiple of 16, which FP8 matmuls need). Inference only: the wrappers change the module names
of a state dict, so nothing is saved from a wrapped model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[..., K]` as float8 e4m3 and its float32 scales `[..., 1]` (x ≈ q * scale, per row)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain `nn.Linear` behind a projection: itself, or a merged PEFT LoRA layer's base layer."""
    if hasattr(module, "get_base_layer"):
        if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
            raise ValueError(f"{type(module).__name__} holds an unmerged LoRA adapter: merge it before FP8 prefill "
                             "(litovis predict merges it)")
        module = module.get_base_layer()
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(module).__name__}")
    return module


class Fp8PrefillLinear(nn.Module):
    """A projection whose inputs of at least `min_rows` rows go through an FP8 matmul.

    Fewer rows (decode steps, short chunks) run the wrapped module unchanged. The FP8 weight, its
    scales and the bias are buffers taken once here (the weights are frozen), not saved.
    """

    def __init__(self, projection: nn.Module, min_rows: int) -> None:
        super().__init__()
        linear = base_linear(projection)
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"FP8 matmuls need both sizes to be multiples of 16, got {in_features} -> {out_features}")
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        self.projection = projection
        self.min_rows = min_rows
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < self.min_rows:
            return self.projection(x)
        flat, scale = quantize_rows(x.reshape(rows, x.shape[-1]))
        if x.device.type == "cuda":
            out = torch._scaled_mm(flat, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                                   out_dtype=x.dtype)
        else:  # row-wise scaled FP8 matmuls are CUDA-only in torch 2.11: the same product, dequantised
            out = ((flat.float() * scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def _projections(root: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, projection) of every linear under `root`; a PEFT layer counts as one."""
    for name, child in root.named_children():
        if isinstance(child, nn.Linear) or hasattr(child, "get_base_layer"):
            yield root, name, child
        elif not isinstance(child, Fp8PrefillLinear):
            yield from _projections(child)


def check_fp8_device(device: torch.device) -> None:
    """Raise unless FP8 matmuls run on `device` (CPU, or CUDA of compute capability 8.9+)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"FP8 prefill needs a GPU of compute capability 8.9+ (Ada, Hopper); {name} is "
                           f"{torch.cuda.get_device_capability(device)}")


def enable_fp8_prefill(model: nn.Module, min_rows: int = 1024) -> int:
    """Wrap the projections of an `Ovis2_5`'s LLM decoder and ViT encoder layers in
    `Fp8PrefillLinear`; returns how many. Call after merging adapters, before the first forward."""
    stacks = [model.llm.model.layers, model.visual_tokenizer.vit.vision_model.encoder.layers]
    check_fp8_device(model.llm.model.embed_tokens.weight.device)
    found = [found for stack in stacks for found in _projections(stack)]
    for parent, name, projection in found:
        setattr(parent, name, Fp8PrefillLinear(projection, min_rows))
    return len(found)


def disable_fp8_prefill(model: nn.Module) -> int:
    """Put back the projections `enable_fp8_prefill` wrapped; returns how many."""
    wrapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, Fp8PrefillLinear)]
    for parent, name, child in wrapped:
        setattr(parent, name, child.projection)
    return len(wrapped)
