"""The ViT's building blocks besides attention: the feed-forward networks, LayerScale and the LayerNorm.

DINOv2 and DINOv3 add SwiGLU and LayerScale to the plain ViT; DINOv3's released models use a LayerNorm
epsilon of 1e-5 (its "layernormbf16") where DINO and DINOv2 use 1e-6, so the epsilon is a model option.

Layer: the method (README, "Read the code"; read with vit.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, arXiv 2002.05202): fc2(silu(x W1) * (x W2)).

    Hidden width 2/3 of the MLP's (rounded up to a multiple of 8): the same parameter count, as in DINOv2.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, initialised small (Touvron et al. 2021, CaiT; DINOv2: 1e-5).
    keep_dtype: the product in the branch's dtype (bf16 under autocast) instead of promoted to fp32 by gamma."""

    def __init__(self, dim: int, init: float, keep_dtype: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))
        self.keep_dtype = keep_dtype

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.gamma.to(x.dtype) if self.keep_dtype else self.gamma)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that returns its input's dtype. Autocast runs layer_norm in fp32 and returns fp32, which
    turns a bf16 residual stream back into fp32; a bf16 input here gives a bf16 output, with the mean and
    variance still accumulated in fp32 inside the kernel and the fp32 weight and bias. For fp32 inputs (and
    whenever the dtypes agree) this is nn.LayerNorm itself; the parameters and their names are the same."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
