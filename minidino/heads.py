"""The DINO projection head (Caron et al. 2021, arXiv 2104.14294, Sec. 3.1 and App. B).

    features (C) -> MLP (n_layers, hidden 2048, GELU) -> bottleneck (256) -> L2-normalise
                 -> weight-normalised linear layer to K prototypes (no bias)

`use_bn` puts BatchNorm after each hidden layer, as the official head allows (used there for ResNets). On
tiny models and data it keeps per-image differences from vanishing in the head, which otherwise lets centering
flatten the teacher to the uniform distribution before the backbone has learnt anything.

The prototype layer is written as weight normalisation by hand: W = g * V / ||V|| per prototype. With
`norm_last_layer=True` (the paper's default) the gain g is fixed to 1, so the layer is a cosine similarity
between the bottleneck feature and K unit-norm prototypes. Writing it out (instead of torch's weight_norm
parametrisation) keeps the state_dict simple and the layer easy to freeze during the first epoch. DINOv3
drops the normalisation (`weight_norm=False`; dinov3/layers/dino_head.py: a plain linear layer, no gain).

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HeadConfig


class DINOHead(nn.Module):
    """The head of a `HeadConfig` (config.py) on backbone features of width `in_dim`."""

    def __init__(self, in_dim: int, cfg: HeadConfig | None = None):
        super().__init__()
        cfg = cfg or HeadConfig()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.n_layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(cfg.n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < cfg.n_layers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1]), nn.GELU()] if cfg.use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        # the prototypes: V (K, bottleneck) and the per-prototype gain g (K, 1)
        self.last_layer = nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False)
        self.last_layer_g = None
        if cfg.weight_norm:
            self.last_layer_g = nn.Parameter(
                torch.ones(cfg.out_dim, 1), requires_grad=not cfg.norm_last_layer
            )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def prototypes(self) -> Tensor:
        """The effective prototype matrix W = g * V / ||V|| (or V itself without weight norm), (K, bottleneck)."""
        if self.last_layer_g is None:
            return self.last_layer.weight
        return self.last_layer_g * F.normalize(self.last_layer.weight, dim=1)

    def last_layer_params(self) -> list[nn.Parameter]:
        """The prototype layer's parameters (frozen in the first epoch)."""
        return [p for p in (self.last_layer.weight, self.last_layer_g) if p is not None]

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # (B, bottleneck), unit norm
        return F.linear(x, self.prototypes())  # (B, K) logits


def ibot_head_config(cfg: HeadConfig) -> HeadConfig:
    """The separate iBOT head's sizes: its own prototypes and bottleneck where the recipe gives them (DINOv2
    vitl14.yaml: dino 131072 x 384, ibot 131072 x 256), else the DINO head's."""
    return dataclasses.replace(
        cfg,
        out_dim=cfg.ibot_out_dim or cfg.out_dim,
        bottleneck_dim=cfg.ibot_bottleneck_dim or cfg.bottleneck_dim,
    )
