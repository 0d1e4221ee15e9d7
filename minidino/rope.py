"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) in 2-D, as DINOv3 uses them (Simeoni
et al. 2025, arXiv 2508.10104, Sec. 3.2; dinov3/layers/rope_position_encoding.py).

A learnt position table is tied to the grid it was trained on and must be resized for every other crop size
(positions.py). RoPE has no table: each patch's query and key are rotated by angles that grow with the
patch's coordinates, so the score q_i . k_j depends on the offset between patches i and j, at any grid size.

Axial 2-D form: a head of D channels is cut into two halves that are rotated as pairs (x_c, x_{c + D/2});
the first D/4 pairs turn with the row coordinate, the other D/4 with the column coordinate:

    coordinates  patch centres (i + 0.5) / H and (j + 0.5) / W ("separate"; or both over min/max(H, W)),
                 mapped to [-1, 1]
    periods      base^(2k / (D/2)), k < D/4 (base 100), or geometric from min_period to max_period
    angle        2 pi * coordinate / period;   x -> x cos(angle) + rotate_half(x) sin(angle)

While training, DINOv3 can move the coordinates (shift: add a uniform offset per axis; jitter: scale each
axis by a log-uniform factor; rescale: scale both by one log-uniform factor, 2 in its released models), so
the model does not tie features to absolute positions; drawn anew for every block and crop size, off in eval.
The CLS and register tokens are not rotated: their rows get angle 0 (cos 1, sin 0), which leaves them as
they are.

Layer: the method (README, "Read the code"; read with vit.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig

NORMALIZE = ("separate", "min", "max")


class RopePositions(nn.Module):
    """sin and cos of the rotation angles of an H x W patch grid, (H W, D_head) each. `periods` is a buffer
    saved with the weights (key `rope_embed.periods` in the ViT, as in DINOv3's files)."""

    def __init__(self, head_dim: int, cfg: ModelConfig):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
        self.cfg = cfg
        n = head_dim // 4
        if cfg.rope_min_period and cfg.rope_max_period:  # geometric from min to max period
            periods = cfg.rope_min_period * (cfg.rope_max_period / cfg.rope_min_period) ** torch.linspace(
                0, 1, n
            )
        else:
            periods = cfg.rope_base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))
        self.register_buffer("periods", periods.float())

    @property
    def augments(self) -> bool:
        """Whether the coordinates are moved at random (training mode with shift, jitter or rescale on)."""
        cfg = self.cfg
        return self.training and bool(cfg.rope_shift or cfg.rope_jitter or cfg.rope_rescale)

    def coordinates(self, h: int, w: int) -> Tensor:
        """Patch centres in [-1, 1], (h w, 2) as (row, column); moved at random in training mode."""
        cfg = self.cfg
        side = {"separate": (h, w), "min": (min(h, w),) * 2, "max": (max(h, w),) * 2}[cfg.rope_normalize]
        dev = self.periods.device
        rows = torch.arange(0.5, h, device=dev) / side[0]
        cols = torch.arange(0.5, w, device=dev) / side[1]
        coords = 2 * torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1) - 1
        if self.training and cfg.rope_shift:  # the same offset for every patch, one per axis
            coords = coords + torch.empty(2, device=dev).uniform_(-cfg.rope_shift, cfg.rope_shift)
        if self.training and cfg.rope_jitter:  # a log-uniform factor per axis
            span = math.log(cfg.rope_jitter)
            coords = coords * torch.empty(2, device=dev).uniform_(-span, span).exp()
        if self.training and cfg.rope_rescale:  # one log-uniform factor for both axes
            span = math.log(cfg.rope_rescale)
            coords = coords * torch.empty(1, device=dev).uniform_(-span, span).exp()
        return coords

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        angles = 2 * math.pi * self.coordinates(h, w)[:, :, None] / self.periods  # (h w, 2, D/4)
        angles = angles.flatten(1).repeat(1, 2)  # (h w, D): [rows, columns] for both halves of the head
        return torch.sin(angles), torch.cos(angles)

    def tokens(self, h: int, w: int, n_prefix: int) -> tuple[Tensor, Tensor]:
        """(sin, cos) for a whole token sequence, (n_prefix + h w, 1, D): the prefix rows leave CLS and
        registers unrotated; the 1 broadcasts over the heads."""
        sin, cos = self(h, w)
        sin = torch.cat([sin.new_zeros(n_prefix, sin.shape[1]), sin])
        cos = torch.cat([cos.new_ones(n_prefix, cos.shape[1]), cos])
        return sin[:, None], cos[:, None]


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension: the 90 degree turn of each pair (x_c, x_{c + D/2})."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """x rotated by the angles whose sin and cos are given (broadcast against x), in fp32 at least (as
    DINOv3's fp32 RoPE), back in x's dtype."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    return (y * cos + rotate_half(y) * sin).to(x.dtype)


def rotate_qk(qkv: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """The fused (..., N, 3, H, D) output of a qkv projection with q and k rotated (v as it is), so that
    every attention implementation, the Triton kernel and the packed one included, runs on it unchanged."""
    sin, cos = rope
    q, k, v = qkv.unbind(-3)
    return torch.stack([rotate(q, sin, cos), rotate(k, sin, cos), v], dim=-3)


def packed_rope(tables: list[tuple[Tensor, Tensor]], batch_sizes: list[int]) -> tuple[Tensor, Tensor]:
    """The per-token (sin, cos) of packed crops, (T, 1, D): each crop size's table repeated for its crops."""
    return tuple(torch.cat([t[i].repeat(b, 1, 1) for t, b in zip(tables, batch_sizes)]) for i in range(2))
