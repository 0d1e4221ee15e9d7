"""Student and teacher networks: a ViT backbone followed by the DINO head (arXiv 2104.14294, Sec. 3.1).

`SSLModel.forward` takes the list of crops of one step and returns, per crop, the backbone's CLS and patch
tokens and the head's logits. The backbone runs each resolution once; the head runs once over the CLS
tokens of all crops. The teacher is a copy of the student with no gradients, in eval mode (so stochastic
depth is off), updated only by `ema.ema_update`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .heads import DINOHead
from .vit import build_vit


class SSLModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[Tensor], masks: list[Tensor | None] | None = None) -> dict[str, list[Tensor]]:
        feats = self.backbone(crops, masks)  # one {'cls', 'patch'} dict per crop
        cls = [f["cls"] for f in feats]  # each (B, C)
        logits = self.head(torch.cat(cls)).split([c.shape[0] for c in cls])  # each (B, K)
        return {"cls": cls, "patch": [f["patch"] for f in feats], "logits": list(logits)}


def build_student_teacher(cfg) -> tuple[SSLModel, SSLModel]:
    """Student from the config; teacher = a frozen copy (same initial weights, as in DINO)."""
    backbone = build_vit(cfg.model)
    head = DINOHead(backbone.embed_dim, cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim,
                    cfg.head.n_layers, cfg.head.norm_last_layer)
    student = SSLModel(backbone, head)
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)
    return student, teacher
