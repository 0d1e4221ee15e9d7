"""Gram anchoring (DINOv3, Simeoni et al. 2025, arXiv 2508.10104, Sec. 4; dinov3/loss/gram_loss.py).

In long runs of large models DINOv3 saw the global numbers (k-NN, linear) keep improving while the patch
features got noisier: dense tasks peaked early and then degraded. Gram anchoring keeps the *structure* of
the patch features, not the features themselves: the student's patch-to-patch cosine similarities (the Gram
matrix of its L2-normalised patch features) are pulled towards those of an earlier, better teacher,

    loss = mean over the entries of (X_s X_s^T - X_g X_g^T)^2,   X: (patches, D), rows of unit norm,

per image (img_level) or over all patches of the batch. The "Gram teacher" is a frozen copy of the EMA
teacher taken at `gram.start_epoch` and taken again every `gram.refresh_every` epochs, at most
`gram.max_refreshes` times; it may see the crops at a higher resolution, its patch features then resized to
the student's grid (DINOv3: twice the side, bicubic; dinov3 cuts those crops from the image without colour
distortions, here the student's global crops are upsampled). The student's features are those of its (masked)
global crops, as in dinov3/train/ssl_meta_arch.py.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GramConfig


def gram_loss(
    student: Tensor,
    teacher: Tensor,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
) -> Tensor:
    """MSE between the Gram matrices of the L2-normalised patch features, (B, N, D) each (or (M, D)).

    img_level: one N x N matrix per image; else one (B N) x (B N) matrix over the batch. remove_neg: negative
    similarities set to 0 in both; remove_only_teacher_neg: in the teacher's only (dinov3's code also tries
    the student's where the teacher's were negative, after zeroing those: that mask is empty)."""
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    if not img_level:
        s, t = s.flatten(0, -2), t.flatten(0, -2)
    gram_s, gram_t = s @ s.transpose(-1, -2), t @ t.transpose(-1, -2)
    if remove_neg or remove_only_teacher_neg:
        gram_t = gram_t.clamp_min(0)
    if remove_neg:
        gram_s = gram_s.clamp_min(0)
    return F.mse_loss(gram_s, gram_t)


def copy_due(step: int, steps_per_epoch: int, cfg: GramConfig) -> bool:
    """Whether the Gram teacher is (re)taken from the EMA teacher before `step`: at the start epoch, then
    every `refresh_every` epochs, `max_refreshes` times (dinov3 train.py: it_load_ema_teacher, then
    update_frequency from it_first_update, max_updates)."""
    start = cfg.start_epoch * steps_per_epoch
    if not cfg.weight or step < start:
        return False
    every = cfg.refresh_every * steps_per_epoch
    return step == start or (
        every > 0 and (step - start) % every == 0 and (step - start) // every <= cfg.max_refreshes
    )


class GramAnchor(nn.Module):
    """The Gram teacher (a frozen backbone, saved with the loss centres so that a resumed run is exact) and
    the loss. `source` is the EMA teacher's backbone it copies; it is not a submodule of this one."""

    def __init__(self, source: nn.Module, cfg: GramConfig):
        super().__init__()
        self.cfg, self.source, self.active = cfg, [source], False
        self.teacher = copy.deepcopy(source).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> GramAnchor:
        super().train(mode)
        self.teacher.eval()  # never augmented, never dropped: dinov3 keeps the Gram teacher in eval mode
        return self

    @torch.no_grad()
    def step(self, step: int, steps_per_epoch: int) -> None:
        """Before each training step: copy the EMA teacher when due; the loss applies from the first copy."""
        if copy_due(step, steps_per_epoch, self.cfg):
            self.teacher.load_state_dict(self.source[0].state_dict())
        self.active = bool(self.cfg.weight) and step >= self.cfg.start_epoch * steps_per_epoch

    @torch.no_grad()
    def targets(self, global_crops: list[Tensor]) -> Tensor:
        """The Gram teacher's patch features of the global crops, (2B, N, D), on the student's grid."""
        x = torch.cat(global_crops)
        h, w = x.shape[-2] // self.teacher.patch_size, x.shape[-1] // self.teacher.patch_size
        if self.cfg.teacher_size:  # DINOv3 gives this teacher larger crops (gram_teacher_crops_size)
            x = F.interpolate(x, size=(self.cfg.teacher_size,) * 2, mode="bicubic", align_corners=False)
        patches = self.teacher.forward_features(x)["patch"]
        side = self.cfg.teacher_size // self.teacher.patch_size
        if self.cfg.teacher_size and (side, side) != (h, w):  # back to the student's grid
            grid = patches.transpose(1, 2).unflatten(-1, (side, side)).float()
            grid = F.interpolate(
                grid, size=(h, w), mode="bicubic", align_corners=False, antialias=self.cfg.resize_antialias
            )
            patches = grid.flatten(-2).transpose(1, 2).to(patches.dtype)
        return patches

    def forward(self, student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
        c = self.cfg
        return gram_loss(
            student_patches, teacher_patches, c.img_level, c.remove_neg, c.remove_only_teacher_neg
        )
