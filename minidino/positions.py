"""Position embeddings of the ViT: the learnt table's starting point and how it is resized to other grids.

A ViT learns one position vector per patch of its n x n training grid. Crops of other sizes (DINO's 96 px
local crops, the 518 px high-resolution phase, any evaluation size) need the table resized; each codebase
does it its own way, and weights give their source's features only when resized its way (minidino/weights.py
records the rule per source). `sincos_2d` is the fixed sine-cosine code used as the table's starting point on
small data.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def resize_pos_embed(
    pos_embed: Tensor, h: int, w: int, offset: float = 0.1, antialias: bool = False
) -> Tensor:
    """(1, 1 + n*n, C) -> (1, 1 + h*w, C): the class position kept, the n x n grid resized bicubically in
    fp32. offset > 0: by the scale factors (h + offset) / n and (w + offset) / n, as DINO and DINOv2 do (the
    0.1 keeps floor() of the output size from falling one short); offset 0: to the size (h, w), as DINOv2's
    register models and timm do. antialias: PyTorch's antialiased bicubic (a blur before shrinking; the
    same as plain bicubic when enlarging)."""
    pos_cls, pos_patch = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, C), (1, n*n, C)
    n = math.isqrt(pos_patch.shape[1])
    grid = rearrange(pos_patch, "1 (h w) c -> 1 c h w", h=n).float()
    size = {"scale_factor": ((h + offset) / n, (w + offset) / n)} if offset else {"size": (h, w)}
    grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=antialias, **size)
    grid = rearrange(grid.to(pos_patch.dtype), "1 c h w -> 1 (h w) c")
    return torch.cat([pos_cls, grid], dim=1)  # (1, 1 + h*w, C)


def sincos_2d(n: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position codes for an n x n grid, (n * n, dim): a quarter of the channels for
    sin(row), cos(row), sin(col), cos(col) at geometric frequencies (as in MAE and MoCo v3, arXiv 2104.02057).

    Used as the *initial* value of the learnt position embeddings on small data: from step 0 every patch knows
    where it is, which saves the hundreds of steps a ViT otherwise spends discovering space.
    """
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)  # (q,)
    rows, cols = torch.meshgrid(
        torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij"
    )
    codes = [f(c.flatten()[:, None] * omega[None]) for c in (rows, cols) for f in (torch.sin, torch.cos)]
    out = torch.cat(codes, dim=1)  # (n * n, 4q)
    return F.pad(out, (0, dim - out.shape[1]))
