"""Gram anchoring (minidino/gram.py): the loss against a hand-written reference on odd shapes, the Gram
teacher's copy rule, its resized targets, and its place in a training run."""

import itertools
import math

import pytest
import torch

from minidino.config import GramConfig, ModelConfig
from minidino.gram import GramAnchor, copy_due, gram_loss
from minidino.vit import VisionTransformer


def reference(student, teacher, img_level=True, remove_neg=False, remove_only_teacher_neg=False):
    """Plain loops: cosine similarity of every pair of patches (per image, or across the batch), the
    teacher's and student's, negatives dropped as asked, then the mean squared difference."""

    def cos(a, b):
        return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))

    groups = (
        [(s, t) for s, t in zip(student, teacher)]
        if img_level
        else [(student.flatten(0, 1), teacher.flatten(0, 1))]
    )
    total, count = 0.0, 0
    for s, t in groups:
        for i, j in itertools.product(range(len(s)), repeat=2):
            gs, gt = cos(s[i], s[j]), cos(t[i], t[j])
            if remove_neg or remove_only_teacher_neg:
                gt = max(gt, 0.0)
            if remove_neg:
                gs = max(gs, 0.0)
            total, count = total + (gs - gt) ** 2, count + 1
    return total / count


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("neg", ["keep", "remove_neg", "remove_only_teacher_neg"])
def test_gram_loss_equals_the_hand_computation_on_odd_shapes(img_level, neg):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 37, 5, dtype=torch.float64), torch.randn(3, 37, 5, dtype=torch.float64)
    options = {"remove_neg": neg == "remove_neg", "remove_only_teacher_neg": neg == "remove_only_teacher_neg"}
    got = gram_loss(student, teacher, img_level, **options).item()
    assert got == pytest.approx(reference(student, teacher, img_level, **options), rel=1e-5)


def test_gram_loss_sees_only_the_structure_of_the_patches():
    """0 for the same features, also rescaled per patch (the similarities are cosines); > 0 otherwise; the
    gradient reaches the student only."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 37, 6)
    assert gram_loss(teacher * torch.rand(2, 37, 1) * 5, teacher).item() < 1e-10
    student = torch.randn(2, 37, 6, requires_grad=True)
    loss = gram_loss(student, teacher)
    loss.backward()
    assert loss.item() > 0.01 and student.grad.abs().sum() > 0


def test_the_gram_teacher_is_copied_at_the_start_then_every_n_epochs_a_few_times():
    cfg = GramConfig(weight=1.0, start_epoch=2, refresh_every=3, max_refreshes=2)
    copies = [s for s in range(200) if copy_due(s, 10, cfg)]
    assert copies == [20, 50, 80]  # the first copy and 2 refreshes (dinov3: it_load_ema_teacher, max_updates)
    assert not any(copy_due(s, 10, GramConfig(weight=0.0)) for s in range(50))
    assert [s for s in range(100) if copy_due(s, 10, GramConfig(weight=1.0, start_epoch=1))] == [10]


def test_gram_targets_from_larger_crops_come_back_on_the_students_grid():
    torch.manual_seed(0)
    vit = VisionTransformer(ModelConfig(arch="vit_nano", patch_size=8, img_size=32, pos_embed="rope"))
    anchor = GramAnchor(vit, GramConfig(weight=1.0, teacher_size=64))
    anchor.step(0, 5)
    assert anchor.active
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    assert anchor.targets(crops).shape == (6, 16, 128)  # 8 x 8 patches at 64 px, resized to 4 x 4
    anchor.train()
    assert not anchor.teacher.training  # never augmented (RoPE jitter) nor dropped
    with torch.no_grad():
        vit.blocks[0].attn.proj.weight.add_(1.0)  # the source moves on; the copy stays until the next copy
    assert not torch.equal(anchor.teacher.blocks[0].attn.proj.weight, vit.blocks[0].attn.proj.weight)
    anchor.step(5, 5)  # no refresh configured: still the first copy
    assert not torch.equal(anchor.teacher.blocks[0].attn.proj.weight, vit.blocks[0].attn.proj.weight)
