"""LoRA on the LLM's linear layers (PEFT), with rsLoRA and a PiSSA init that survives resume.

Notable:
- Only `llm.model.layers.N.{self_attn,mlp}.*_proj` are wrapped; the ViT, visual head and `vte` never
  are (`vte` is an embedding fed float probabilities, which PEFT's embedding LoRA breaks).
- PiSSA is done here, not by PEFT: PEFT does not seed `svd_lowrank` and keeps no record of the
  initial A/B, so a resumed run could not rebuild the residual base `W - s·B0·A0`. We round the
  initial A0/B0 to the base dtype, build the residual from exactly those values, and return them so
  the checkpoint can carry them (`apply_pissa_residual` on resume gives the same bits).
- The SVD runs wherever the weights are: build and wrap the model on the GPU first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


@dataclass
class LoRAConfig:
    """LoRA adapter settings (defaults: the reference run).

    Attributes:
        rank: adapter rank r.
        alpha: scaling numerator; the scale is alpha/sqrt(r) with rsLoRA, alpha/r without.
        dropout: dropout on the adapter input.
        rslora: use rank-stabilised scaling alpha/sqrt(r).
        init: `default` (A random, B zero), `pissa` (full SVD) or `pissa_niter_N` (randomised SVD
            with N subspace iterations; much faster, seeded by `seed`).
        targets: projection names inside each LLM decoder layer to wrap.
        seed: seed of the randomised SVD for `pissa_niter_N` and of the default A init.
    """

    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    rslora: bool = True
    init: str = "pissa"
    targets: list[str] = field(default_factory=lambda: list(LLM_PROJECTIONS))
    seed: int = 42

    def __post_init__(self) -> None:
        unknown = set(self.targets) - set(LLM_PROJECTIONS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {LLM_PROJECTIONS}, got {self.targets}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        pissa_niter(self.init)  # validates the init name

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    @property
    def is_pissa(self) -> bool:
        return self.init.startswith("pissa")


def pissa_niter(init: str) -> int | None:
    """Subspace iterations of a PiSSA init name (None = full SVD); raises on unknown names."""
    if init in ("default", "pissa"):
        return None
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    if not match:
        raise ValueError(f"unknown LoRA init {init!r}: use 'default', 'pissa' or 'pissa_niter_N'")
    return int(match.group(1))


def target_regex(targets: list[str]) -> str:
    """PEFT `target_modules` regex matching the chosen projections of the LLM decoder layers only."""
    attn = [t for t in targets if t in _ATTENTION]
    mlp = [t for t in targets if t not in _ATTENTION]
    parts = []
    if attn:
        parts.append(rf"self_attn\.({'|'.join(attn)})")
    if mlp:
        parts.append(rf"mlp\.({'|'.join(mlp)})")
    return rf"llm\.model\.layers\.\d+\.({'|'.join(parts)})"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap `model` with PEFT LoRA adapters (A random, B zero: the model output is unchanged).

    Every base parameter is frozen; only adapter weights require grad. Returns the `PeftModel`.
    """
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.rslora,
        target_modules=target_regex(cfg.targets),
        init_lora_weights=True,
        bias="none",
    )
    with seeded(cfg.seed):
        return get_peft_model(model, peft_cfg)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Every RNG (CPU and all GPUs) seeded inside; the outer RNG state is restored after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name → PEFT LoRA layer, for every wrapped projection."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_adapter(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, float]:
    """The active adapter of a PEFT LoRA layer: its A and B linears and its scale."""
    (name,) = layer.active_adapters
    return layer.lora_A[name], layer.lora_B[name], layer.scaling[name]


def pissa_factors(weight: torch.Tensor, rank: int, scale: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's A0 `[r, in]` and B0 `[out, r]` of a whole matrix: its top-r singular directions, split
    so that `scale·B0·A0` is their sum, rounded to the weight's dtype (contiguous: ready to broadcast).

    `niter` None is a full SVD; an int is a randomised SVD with that many subspace iterations (it
    draws from the torch RNG: seed it).
    """
    w = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.T
    root = (s / scale).sqrt()
    return (root[:, None] * vh).to(weight.dtype).contiguous(), (u * root[None, :]).to(weight.dtype).contiguous()


@torch.no_grad()
def subtract_pissa_product(
    target: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scale: float, rows: slice = slice(None)
) -> None:
    """`target -= scale·(B0·A0)[rows]`, computed in float32 and rounded to `target`'s dtype.

    `target` is a whole base weight, or one rank's `rows` of it: every row gets the same bits.
    """
    delta = b0.to(target.device, torch.float32) @ a0.to(target.device, torch.float32)
    target.copy_((target.float() - scale * delta[rows]).to(target.dtype))


@torch.no_grad()
def apply_pissa_residual(layer: nn.Module, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """Replace the frozen base weight W by the PiSSA residual W - s·B0·A0 (computed in float32)."""
    _, _, scale = lora_adapter(layer)
    subtract_pissa_product(layer.get_base_layer().weight, a0, b0, scale)


@torch.no_grad()
def pissa_initialize(model: nn.Module, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """PiSSA: put each layer's top-r singular directions into A/B and the rest into the base weight.

    Returns `{"<layer>.A0": ..., "<layer>.B0": ...}` in the base weight's dtype: exactly the values
    the residual was built from, to be stored with the checkpoint.
    """
    niter = pissa_niter(cfg.init)
    initial: dict[str, torch.Tensor] = {}
    with seeded(cfg.seed):
        for name, layer in lora_layers(model).items():
            lora_a, lora_b, scale = lora_adapter(layer)
            a0, b0 = pissa_factors(layer.get_base_layer().weight, lora_a.weight.shape[0], scale, niter)
            apply_pissa_residual(layer, a0, b0)
            lora_a.weight.copy_(a0.to(lora_a.weight.dtype))
            lora_b.weight.copy_(b0.to(lora_b.weight.dtype))
            initial[f"{name}.A0"] = a0.cpu()
            initial[f"{name}.B0"] = b0.cpu()
    return initial


@torch.no_grad()
def restore_pissa_residual(model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """Rebuild the residual base weights of a PiSSA run from its stored A0/B0 (resume, predict)."""
    layers = lora_layers(model)
    check_pissa_state(layers, initial)
    for name, layer in layers.items():
        apply_pissa_residual(layer, initial[f"{name}.A0"], initial[f"{name}.B0"])


def check_pissa_state(layers: dict[str, nn.Module], initial: dict[str, torch.Tensor]) -> None:
    """Raise unless `initial` holds exactly an A0 and a B0 for every LoRA layer."""
    expected = {f"{name}.{part}" for name in layers for part in ("A0", "B0")}
    if set(initial) != expected:
        missing = sorted(expected - set(initial))[:5]
        unexpected = sorted(set(initial) - expected)[:5]
        raise KeyError(f"PiSSA state does not match the model's LoRA layers: missing {missing}, unexpected {unexpected}")
