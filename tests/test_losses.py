import math

import pytest
import torch
import torch.nn.functional as F

from minidino.config import LossConfig
from minidino.losses import DINOLoss, dino_loss, entropy_stats


def test_dino_loss_hand_computed_and_same_view_excluded():
    # student temperature 1 and logits = log-probabilities, so log_softmax returns them unchanged
    s = [torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.1, 0.6, 0.3]]), torch.tensor([[0.2, 0.2, 0.6]])]
    t = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])]
    loss = dino_loss([x.log() for x in s], t, student_temp=1.0)
    # pairs (t1, s2), (t1, s3), (t2, s1), (t2, s3); (t1, s1) and (t2, s2) are the same views and excluded
    expected = (math.log(10) + math.log(5) + math.log(10 / 3) + math.log(5)) / 4
    assert abs(loss.item() - expected) < 1e-6


def test_dino_loss_matches_loop_reference_on_odd_shapes():
    torch.manual_seed(0)
    B, K, tau = 5, 37, 0.1
    student = [torch.randn(B, K) for _ in range(6)]
    teacher = [F.softmax(torch.randn(B, K) / 0.04, -1) for _ in range(2)]
    ref, n = 0.0, 0
    for i in range(2):
        for j in range(6):
            if i != j:
                for b in range(B):
                    p = torch.exp(student[j][b] / tau) / torch.exp(student[j][b] / tau).sum()
                    ref += -(teacher[i][b] * torch.log(p)).sum().item() / B
                n += 1
    assert abs(dino_loss(student, teacher, tau).item() - ref / n) < 1e-4


def test_teacher_probs_center_and_sharpen():
    loss = DINOLoss(4, LossConfig(center_momentum=0.9))
    loss.center.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    g = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    p = loss.teacher_probs([g], teacher_temp=0.5)[0]
    torch.testing.assert_close(p, F.softmax((g - loss.center) / 0.5, -1))
    assert torch.allclose(p.sum(-1), torch.ones(1))
    # lower temperature -> sharper (lower entropy)
    assert (
        entropy_stats(loss.teacher_probs([g], 0.1)[0])["teacher_entropy"]
        < entropy_stats(p)["teacher_entropy"]
    )


def test_center_update_is_ema_of_batch_mean():
    loss = DINOLoss(3, LossConfig(center_momentum=0.9))
    loss.center.fill_(1.0)
    t1, t2 = (
        torch.tensor([[0.0, 3.0, 6.0], [2.0, 1.0, 0.0]]),
        torch.tensor([[4.0, 2.0, 0.0], [2.0, 2.0, 2.0]]),
    )
    loss.update_center([t1, t2])
    mean = torch.cat([t1, t2]).mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, 0.9 * torch.ones(1, 3) + 0.1 * mean)


def test_entropy_stats_limits():
    K = 50
    uniform = torch.full((8, K), 1.0 / K)
    s = entropy_stats(uniform)
    assert abs(s["teacher_entropy"] - math.log(K)) < 1e-5 and abs(s["teacher_kl_uniform"]) < 1e-5
    one_mode = F.one_hot(torch.zeros(8, dtype=torch.long), K).float()
    s = entropy_stats(one_mode)
    assert s["teacher_entropy"] < 1e-5 and abs(s["teacher_kl_uniform"] - math.log(K)) < 1e-5


def test_ibot_loss_hand_computed_per_image_then_over_images():
    from minidino.losses import ibot_loss
    from minidino.masking import StepMasks

    # image 0 has 2 masked patches, image 1 none, image 2 one; student temp 1, logits = log-probabilities
    masks = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    s = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.1, 0.9]]).log()
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    per_patch = [math.log(2), -math.log(0.75), -math.log(0.9)]
    # per-image means, divided by all 3 images (the unmasked one counts, as in the official DINOv2 code)
    expected = ((per_patch[0] + per_patch[1]) / 2 + per_patch[2]) / 3
    m = StepMasks.of(masks)  # the index buffers the loss reads: positions and per-image weights
    assert m.indices.tolist() == [0, 2, 7] and m.weights.tolist() == [0.5, 0.5, 1.0]
    assert torch.equal(masks.flatten()[m.indices], torch.ones(3, dtype=torch.bool))
    assert abs(ibot_loss(s, t, m.weights, len(masks), 1.0).item() - expected) < 1e-6


def test_sinkhorn_centering_in_loss_module():
    torch.manual_seed(0)
    loss = DINOLoss(11, LossConfig(centering="sinkhorn"))
    t = [torch.randn(6, 11), torch.randn(6, 11)]
    probs = loss.teacher_probs(t, 0.05)
    assert [p.shape for p in probs] == [(6, 11), (6, 11)]
    torch.testing.assert_close(torch.cat(probs).sum(1), torch.ones(12))
    before = loss.center.clone()
    loss.update_center(t)  # Sinkhorn keeps no running centre
    assert torch.equal(loss.center, before)


def test_koleo_is_summed_over_the_global_crops_as_in_dinov2():
    """Losses adds one KoLeo term per global crop (DINOv2's ssl_meta_arch: sum over the two crops' CLS
    tokens), so a weight of 0.1 means 0.1 per crop. Hand example: three unit vectors 90 degrees apart in turn
    have nearest-neighbour distance sqrt(2), so one crop's term is -log(sqrt(2)) = -ln(2) / 2."""
    from minidino.losses import Losses

    losses = Losses(5, LossConfig(koleo_weight=0.1))
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    student = {"logits": [torch.zeros(3, 5)] * 2, "cls": [square, 2 * square]}  # the scale is normalised away
    targets = {"cls": [torch.full((3, 5), 0.2)] * 2}
    terms = losses(student, targets, None)
    torch.testing.assert_close(terms["loss_koleo"], torch.tensor(-math.log(2.0)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["loss_dino"] + 0.1 * terms["loss_koleo"])


def _crops_and_targets(centering: str, B=3, K=37, n_student=5, dtype=torch.float64):
    """Student logits of 2 global + 3 local crops and the targets of 2 teacher crops, centred by a running
    centre or by Sinkhorn-Knopp (odd shapes: 3 images, 37 prototypes)."""
    torch.manual_seed(0)
    student = [torch.randn(B, K, dtype=dtype, requires_grad=True) for _ in range(n_student)]
    loss = DINOLoss(K, LossConfig(centering=centering))
    loss.center.copy_(torch.randn(1, K))
    teacher = loss.teacher_probs([torch.randn(B, K, dtype=dtype) for _ in range(2)], teacher_temp=0.04)
    # the targets come in fp32; the closed form uses that each sums to 1, so renormalise them in fp64
    return student, [(t.to(dtype) / t.to(dtype).sum(-1, keepdim=True)) for t in teacher]


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_fused_dino_loss_equals_the_pairwise_loss_in_fp64_with_its_gradients(centering):
    from minidino.losses import dino_loss_fused

    student, teacher = _crops_and_targets(centering)
    ref = dino_loss(student, teacher, 0.1)
    fused = dino_loss_fused(student, teacher, 0.1)
    assert abs(ref.item() - fused.item()) < 1e-12
    g_ref = torch.autograd.grad(ref, student)
    g_fused = torch.autograd.grad(fused, student)
    assert all(torch.allclose(a, b, atol=1e-13, rtol=0) for a, b in zip(g_ref, g_fused))
    assert torch.autograd.gradcheck(lambda *s: dino_loss_fused(list(s), teacher, 0.1), student)


def test_fused_dino_loss_keeps_the_logits_dtype_in_its_gradient():
    from minidino.losses import dino_loss_fused

    student, teacher = _crops_and_targets("center", dtype=torch.float32)
    half = [s.detach().bfloat16().requires_grad_() for s in student]
    loss = dino_loss_fused(half, [t.float() for t in teacher], 0.1)
    grads = torch.autograd.grad(loss, half)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    ref = torch.autograd.grad(dino_loss([h.float() for h in half], teacher, 0.1), half)
    assert all(torch.allclose(g.float(), r.float(), atol=1e-3, rtol=1e-2) for g, r in zip(grads, ref))


@pytest.mark.parametrize(
    "method_args",
    [
        [],
        ["--method=dinov2", "--loss.mask_probability=1.0"],  # iBOT (masks drawn as the workers do), KoLeo
        ["--method=dinov2", "--loss.centering=sinkhorn", "--model.pack_crops=True"],  # all crops in one pass
    ],
    ids=["dino", "dinov2", "dinov2_sinkhorn_packed"],
)
def test_the_step_forward_and_loss_compile_as_one_graph_equal_to_eager(method_args):
    """Issue 19's compile check on the CPU: teacher and student forward, targets and the losses (DINO; DINOv2
    with iBOT's masked patches gathered by the index buffers of `StepMasks`, KoLeo, Sinkhorn, packed crops)
    under torch.compile(fullgraph=True) with aot_eager equal eager (eval mode: no random stochastic depth).
    One graph means no graph break, so nothing in the forward reads a value back from the device."""
    from minidino import cli
    from minidino.losses import build_losses
    from minidino.masking import step_masks
    from minidino.meta_arch import build_student_teacher

    cfg, _, _ = cli.parse_args(
        ["--model.arch=vit_nano", "--head.out_dim=67", "--head.hidden_dim=64", "--head.bottleneck_dim=32"]
        + ["--data.local_crops_number=2", "--data.global_crops_size=32", "--model.patch_size=8"]
        + ["--model.attn_impl=sdpa"]
        + method_args
    )
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    losses = build_losses(cfg)
    student.eval(), teacher.eval()
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(2)]
    masks = step_masks(cfg, 3, step=0, n_crops=len(crops))
    assert (masks.indices is not None) == (cfg.method == "dinov2")

    def forward_and_loss(crops, masks):
        targets = losses.teacher_targets(teacher(crops[:2], patch_index=masks.indices), 0.04)
        return losses(student(crops, masks.student, masks.indices), targets, masks)["loss"]

    compiled = torch.compile(forward_and_loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(crops, masks), forward_and_loss(crops, masks), atol=1e-5, rtol=1e-5)


def test_fused_dino_loss_compiles_as_one_graph_with_its_backward():
    from minidino.losses import dino_loss_fused

    student, teacher = _crops_and_targets("center", dtype=torch.float32)
    compiled = torch.compile(dino_loss_fused, backend="aot_eager", fullgraph=True)
    loss, ref = compiled(student, teacher, 0.1), dino_loss_fused(student, teacher, 0.1)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, student), torch.autograd.grad(ref, student)):
        torch.testing.assert_close(g, r)


def test_local_crop_weight_scales_the_local_pairs_only_in_both_forms():
    """DINOv3's reweight_dino_local_loss: its global and local means weighted by their pair counts, the local
    one times w, which is the mean over all pairs with the local pairs counted w times; fused form alike."""
    from minidino.losses import dino_loss_fused

    student, teacher = _crops_and_targets("center")
    n_global, n_all = 2, len(student)

    def cross_entropy(t, s):  # one pair, batch mean
        return (-t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    local_sum = sum(cross_entropy(t, s) for t in teacher for s in student[n_global:])
    n_pairs = n_global * (n_all - 1)
    plain = dino_loss(student, teacher, 0.1)
    global_sum = plain * n_pairs - local_sum
    for w in (0.5, 0.0):
        want = (global_sum + w * local_sum) / n_pairs
        assert abs(dino_loss(student, teacher, 0.1, w).item() - want.item()) < 1e-12
        assert abs(dino_loss_fused(student, teacher, 0.1, w).item() - want.item()) < 1e-12
