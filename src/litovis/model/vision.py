"""SigLIP2-NaViT vision tower and the Ovis visual tokenizer (ViT features -> visual token probabilities).

Input rows are 16x16 RGB patches in *2x2-block order*: within each image, the patches of one
2x2 block (hidden_stride x hidden_stride) are consecutive, blocks in raster order. Everything
positional follows that order:

- a patch's (row, column) in its image's patch grid comes from `block_order_grid`;
- the learned position table (a `grid x grid` square, 32x32 for the release) is resized per
  image to its (h, w) patch grid with bicubic interpolation (align_corners False, no antialias),
  read at each patch's (row, column) and repeated over frames;
- the 2D rotary embedding uses head_dim/4 frequencies (theta 10000): a patch's angles are its
  row times the frequencies, then its column times them, duplicated to head_dim (rotate-half).

Attention is bidirectional and never leaves an image (or a video frame). The windowed-attention
variant of the official code is off for Ovis2.5 (every block is full attention), so its token
reordering has no effect and is not implemented. The tower returns the last layer's hidden
states *without* `post_layernorm`; that norm exists only so the checkpoint keys match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from litovis.model.attention import AttentionLayout, attend, sequences_layout
from litovis.model.config import ViTConfig

VISION_ROPE_THETA = 10000.0


def block_order_grid(height: int, width: int, stride: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each patch of an `height x width` grid listed in 2x2-block order."""
    if height % stride or width % stride:
        raise ValueError(f"patch grid {height}x{width} is not a multiple of hidden_stride {stride}")
    rows = torch.arange(height, device=device)[:, None].expand(height, width)
    cols = torch.arange(width, device=device)[None, :].expand(height, width)

    def to_block_order(grid: torch.Tensor) -> torch.Tensor:
        grid = grid.reshape(height // stride, stride, width // stride, stride)
        return grid.permute(0, 2, 1, 3).reshape(-1)

    return to_block_order(rows), to_block_order(cols)


def _grid_list(grid_thws: torch.Tensor) -> list[tuple[int, int, int]]:
    if grid_thws.dim() != 2 or grid_thws.shape[1] != 3:
        raise ValueError(f"grid_thws must be [num_images, 3], got shape {tuple(grid_thws.shape)}")
    return [tuple(int(v) for v in row) for row in grid_thws.tolist()]


class VisionEmbeddings(nn.Module):
    """Patch embedding (a 16x16 stride-16 convolution) plus the resized learned position table."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.position_grid ** 2, config.hidden_size)

    def positions(self, grids: list[tuple[int, int, int]], dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings `[sum t*h*w, hidden]` for every patch, in input order."""
        side = self.config.position_grid
        # Channels-first and contiguous: bicubic resizing of the permuted view is ~7x slower on CUDA.
        table = self.position_embedding.weight.float().reshape(side, side, -1).permute(2, 0, 1).contiguous()[None]
        pieces = []
        for t, h, w in grids:
            resized = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)[0]
            rows, cols = block_order_grid(h, w, self.config.hidden_stride, device=table.device)
            pieces.append(resized[:, rows, cols].t().repeat(t, 1))
        return torch.cat(pieces).to(dtype)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        weight = self.patch_embedding.weight
        # A kernel-size == stride convolution over one patch is a matmul over its flattened pixels.
        patches = F.linear(pixel_values.to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)
        return patches + self.positions(grids, patches.dtype)


def vision_rotary(grids: list[tuple[int, int, int]], head_dim: int, stride: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[N, head_dim]` (float32) of the 2D rotary embedding for all patches."""
    axis_dim = head_dim // 2  # half of each head rotates by the row, half by the column
    steps = torch.arange(0, axis_dim, 2, dtype=torch.float, device=device)
    inv_freq = 1.0 / (VISION_ROPE_THETA ** (steps / axis_dim))
    rows, cols = [], []
    for t, h, w in grids:
        r, c = block_order_grid(h, w, stride, device=device)
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
    row_angles = torch.cat(rows).float()[:, None] * inv_freq
    col_angles = torch.cat(cols).float()[:, None] * inv_freq
    half = torch.cat((row_angles, col_angles), dim=-1)
    emb = torch.cat((half, half), dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of x `[N, H, D]` computed in float32, returned in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2D rotary positions."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        size = config.hidden_size
        self.q_proj = nn.Linear(size, size)
        self.k_proj = nn.Linear(size, size)
        self.v_proj = nn.Linear(size, size)
        self.out_proj = nn.Linear(size, size)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, rotated keys and values `[N, heads, head_dim]` of normed inputs `[N, hidden]`."""
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q = _rotate(self.q_proj(x).view(shape), cos, sin)
        k = _rotate(self.k_proj(x).view(shape), cos, sin)
        return q, k, self.v_proj(x).view(shape)


class VisionMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _before_attention(layer: VisionEncoderLayer, x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.self_attn.project(layer.layer_norm1(x), cos, sin)


def _after_attention(layer: VisionEncoderLayer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    x = x + layer.self_attn.out_proj(attended.reshape(x.shape[0], -1))
    return x + layer.mlp(layer.layer_norm2(x))


class VisionEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self._before, self._after = _before_attention, _after_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        q, k, v = self._before(self, x, cos, sin)
        attended = attend(q[None], k[None], v[None], layout)[0]
        return self._after(self, x, attended)

    def compile(self, *args, **kwargs) -> None:
        """`torch.compile` the work before and after the attention, not the attention itself.

        Its layout lists the images (the per-image runs on CUDA): a compiled graph would be
        specialised on it and recompiled for images of new sizes. Every layer shares the two
        graphs (the layer is an argument, not a constant).
        """
        self._before = torch.compile(_before_attention, *args, **kwargs)
        self._after = torch.compile(_after_attention, *args, **kwargs)


class VisionEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """SigLIP2-NaViT over packed patches of several images (`vit.vision_model` in the checkpoint)."""

    def __init__(self, config: ViTConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Unused by Ovis2.5: never trainable, so DDP never waits for its gradient.
        self.post_layernorm.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states `[N, hidden]` (no post_layernorm) for pixel rows `[N, C*p*p]`."""
        grids = _grid_list(grid_thws)
        expected_rows = sum(t * h * w for t, h, w in grids)
        cfg = self.config
        row_width = cfg.num_channels * cfg.patch_size ** 2
        if pixel_values.dim() != 2 or pixel_values.shape != (expected_rows, row_width):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thws "
                             f"{grids} need [{expected_rows}, {row_width}]")
        hidden = self.embeddings(pixel_values, grids)
        frame_lengths = [h * w for t, h, w in grids for _ in range(t)]
        layout = sequences_layout(frame_lengths, backend=self.attention_backend, device=hidden.device,
                                  dtype=hidden.dtype, backward=hidden.requires_grad)
        cos, sin = vision_rotary(grids, cfg.head_dim, cfg.hidden_stride, hidden.device)
        for layer in self.encoder.layers:
            hidden = layer(hidden, cos, sin, layout)
        return hidden


class SiglipNavit(nn.Module):
    """Holder that gives the tower its checkpoint prefix (`vit.vision_model.*`)."""

    def __init__(self, config: ViTConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config, attention_backend)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values, grid_thws)


class VisualTokenizer(nn.Module):
    """ViT + head: patch rows -> probabilistic visual tokens `[atoms, visual_vocab_size]`.

    Each 2x2 block of patch features (consecutive rows) becomes one atom `[4 * hidden]`; the
    head (Linear without bias, then LayerNorm) gives `visual_vocab_size - 4` logits whose
    float32 softmax, cast to the model dtype and padded with 4 zero columns (the indicator
    rows of the VTE), is the atom's token distribution.
    """

    def __init__(self, config: ViTConfig, visual_vocab_size: int, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.visual_vocab_size = visual_vocab_size
        head_size = visual_vocab_size - 4
        self.vit = SiglipNavit(config, attention_backend)
        self.head = nn.Sequential(
            nn.Linear(config.hidden_size * config.hidden_stride ** 2, head_size, bias=False),
            nn.LayerNorm(head_size),
        )

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        features = self.vit(pixel_values, grid_thws)
        atom_rows = self.config.hidden_stride ** 2
        atoms = features.reshape(features.shape[0] // atom_rows, atom_rows * features.shape[1])
        logits = self.head(atoms)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        return F.pad(probs, (0, 4))

    def dummy_inputs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest valid image (one 2x2 block of zero patches) and its grid."""
        cfg = self.config
        rows = cfg.hidden_stride ** 2
        pixels = torch.zeros(rows, cfg.num_channels * cfg.patch_size ** 2, device=device, dtype=dtype)
        grid = torch.tensor([[1, cfg.hidden_stride, cfg.hidden_stride]], device=device)
        return pixels, grid
