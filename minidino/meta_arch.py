"""Student and teacher networks: a ViT backbone followed by the DINO head (arXiv 2104.14294, Sec. 3.1).

`SSLModel.forward` takes the list of crops of one step and returns, per crop, the backbone's CLS and patch
tokens and the head's logits. The backbone runs each resolution once; the head runs once over the CLS
tokens of all crops. The teacher has the student's architecture without stochastic depth and no gradients; it
changes only through `ema.ema_update`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .heads import DINOHead
from .vit import build_vit


class SSLModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.ibot_head = backbone, head, ibot_head

    def forward(
        self,
        crops: list[Tensor],
        masks: list[Tensor | None] | None = None,
        patch_masks: Tensor | None = None,
    ) -> dict[str, list[Tensor]]:
        """masks: per crop, patches to replace by the mask token (student side of iBOT). patch_masks: (nB, N)
        bool over the first n crops: their selected patches also go through the head ('patch_logits', iBOT).
        Inside forward so that DDP sees every parameter the loss uses."""
        feats = self.backbone(crops, masks)  # one {'cls', 'patch'} dict per crop
        cls = [f["cls"] for f in feats]  # each (B, C)
        logits = self.head(torch.cat(cls)).split([c.shape[0] for c in cls])  # each (B, K)
        out = {"cls": cls, "patch": [f["patch"] for f in feats], "logits": list(logits)}
        if patch_masks is not None:
            n = patch_masks.shape[0] // cls[0].shape[0]
            out["patch_logits"] = self.patch_logits(torch.cat(out["patch"][:n]), patch_masks)
        return out

    def patch_logits(self, patch_tokens: Tensor, masks: Tensor) -> Tensor:
        """iBOT: head logits (M, K) of the masked patches; patch_tokens (n, N, C), masks (n, N) bool."""
        head = self.ibot_head if self.ibot_head is not None else self.head
        return head(patch_tokens[masks])  # (M, C) in masks.nonzero() order -> (M, K)


def build_model(cfg, drop_path: float | None = None) -> SSLModel:
    model_cfg = cfg.model if drop_path is None else dataclasses.replace(cfg.model, drop_path=drop_path)
    backbone = build_vit(model_cfg)
    h = cfg.head

    def head() -> DINOHead:
        return DINOHead(
            backbone.embed_dim,
            h.out_dim,
            h.hidden_dim,
            h.bottleneck_dim,
            h.n_layers,
            h.norm_last_layer,
            h.use_bn,
        )

    separate = cfg.loss.ibot_weight > 0 and h.ibot_separate_head
    return SSLModel(backbone, head(), head() if separate else None)


def build_student_teacher(cfg) -> tuple[SSLModel, SSLModel]:
    """Student from the config; teacher = the same network without stochastic depth, starting from the
    student's weights, with no gradients. Like the official code, the teacher stays in train mode, so a head
    with BatchNorm normalises the teacher with the statistics of its own batch."""
    student = build_model(cfg)
    teacher = build_model(cfg, drop_path=0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher
