"""Student and teacher networks: a ViT backbone followed by the DINO head (arXiv 2104.14294, Sec. 3.1).

`SSLModel.forward` takes the list of crops of one step and returns, per crop, the backbone's CLS and patch
tokens and the head's logits. The backbone runs each resolution once; the head runs once over the CLS
tokens of all crops. The teacher has the student's architecture without stochastic depth and no gradients; it
changes only through `ema.ema_update`.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .config import Config, ConfigError
from .heads import DINOHead, ibot_head_config
from .vit import VisionTransformer
from .weights import load_checkpoint, load_model_state, run_config


class SSLModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.ibot_head = backbone, head, ibot_head

    def forward(
        self,
        crops: list[Tensor],
        masks: list[Tensor | None] | None = None,
        patch_index: Tensor | None = None,
    ) -> dict[str, list[Tensor]]:
        """masks: per crop, patches to replace by the mask token (student side of iBOT). patch_index: (M,)
        positions in the flattened (2B, N) patch tokens of the two global crops (`StepMasks.indices`): those
        patches also go through the head ('patch_logits', iBOT). Inside forward so that DDP sees every
        parameter the loss uses."""
        feats = self.backbone(crops, masks)  # one {'cls', 'patch'} dict per crop
        cls = [f["cls"] for f in feats]  # each (B, C)
        logits = self.head(torch.cat(cls)).split([c.shape[0] for c in cls])  # each (B, K)
        out = {"cls": cls, "patch": [f["patch"] for f in feats], "logits": list(logits)}
        if patch_index is not None:
            out["patch_logits"] = self.patch_logits(torch.cat(out["patch"][:2]), patch_index)
        return out

    def patch_logits(self, patch_tokens: Tensor, index: Tensor) -> Tensor:
        """iBOT: head logits (M, K) of the selected patches; patch_tokens (2B, N, C), index (M,) into its
        first two dimensions flattened."""
        head = self.ibot_head if self.ibot_head is not None else self.head
        return head(patch_tokens.flatten(0, 1).index_select(0, index))  # (M, C) -> (M, K)


def build_model(cfg: Config, teacher: bool = False) -> SSLModel:
    """Backbone + DINO head (+ a separate iBOT head) of a `Config`. teacher: without stochastic depth and
    without RoPE's coordinate augmentation (DINOv3 runs its teacher in eval mode)."""
    model_cfg = cfg.model
    if teacher:
        model_cfg = dataclasses.replace(
            model_cfg, drop_path=0.0, rope_shift=0.0, rope_jitter=0.0, rope_rescale=0.0
        )
    backbone = VisionTransformer(model_cfg)
    head = DINOHead(backbone.embed_dim, cfg.head)
    separate = cfg.loss.ibot_weight > 0 and cfg.head.ibot_separate_head
    return SSLModel(
        backbone, head, DINOHead(backbone.embed_dim, ibot_head_config(cfg.head)) if separate else None
    )


def build_student_teacher(cfg: Config) -> tuple[SSLModel, SSLModel]:
    """Student from the config; teacher = the same network without stochastic depth, starting from the
    student's weights, with no gradients. Like the official code, the teacher stays in train mode, so a head
    with BatchNorm normalises the teacher with the statistics of its own batch."""
    student = build_model(cfg)
    teacher = build_model(cfg, teacher=True)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def distillation_teacher(cfg: Config) -> SSLModel:
    """The frozen teacher of a distillation run (DINOv2 Sec. 5): the EMA teacher of the minidino run (folder or
    checkpoint) in `--run.distill_from`. The student's EMA is then kept apart as the final model."""
    path = cfg.run.distill_from
    state = load_checkpoint(path)
    tcfg = run_config(state, path)
    if tcfg.head.out_dim != cfg.head.out_dim or tcfg.model.patch_size != cfg.model.patch_size:
        raise ConfigError(
            f"--run.distill_from={path}: the student needs the teacher's "
            f"--head.out_dim={tcfg.head.out_dim} and --model.patch_size={tcfg.model.patch_size}"
        )
    teacher = build_model(tcfg, teacher=True)
    load_model_state(teacher, state["teacher"], f"checkpoint {path} (teacher)")
    return teacher.requires_grad_(False)
