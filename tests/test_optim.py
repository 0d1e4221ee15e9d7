"""The optimiser (minidino/optim.py): parameter groups, layer-wise lr decay, clipping per tensor or per part,
and the fused AdamW whose values live on the device."""

import dataclasses

import torch

from conftest import tiny_run
from minidino import cli
from minidino.meta_arch import build_student_teacher
from minidino.optim import apply_schedule, build_optimizer, decay_weights, param_groups


def test_layerwise_lr_decay_and_weight_decay_groups(tmp_path):
    cfg, _, _ = cli.parse_args(tiny_run(tmp_path / "a", "--method=dinov2"))
    assert (cfg.optim.layer_decay, cfg.optim.patch_embed_lr_mult) == (0.9, 0.2)
    from minidino.meta_arch import build_student_teacher

    student, _ = build_student_teacher(cfg)
    groups = param_groups(student, cfg.optim.layer_decay, cfg.optim.patch_embed_lr_mult)
    mult = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    wd = {id(p): g["apply_wd"] for g in groups for p in g["params"]}
    depth = len(student.backbone.blocks)  # 4
    assert abs(mult[id(student.backbone.blocks[0].attn.qkv.weight)] - 0.9**depth) < 1e-12
    assert abs(mult[id(student.backbone.blocks[depth - 1].mlp.fc1.weight)] - 0.9) < 1e-12
    assert abs(mult[id(student.backbone.patch_embed.proj.weight)] - 0.2 * 0.9 ** (depth + 1)) < 1e-12
    assert mult[id(student.head.last_layer.weight)] == 1.0
    # no decay on biases and 1-D parameters (DINO's get_params_groups; DINOv2's bias/norm/gamma rule gives
    # the same here); tokens, position embeddings and the learnt prototype gain are decayed, as in both
    blk = student.backbone.blocks[0]
    assert not any(wd[id(p)] for p in (blk.norm1.weight, blk.attn.qkv.bias, blk.ls1.gamma))
    assert all(
        wd[id(p)] for p in (blk.attn.qkv.weight, student.backbone.pos_embed, student.backbone.cls_token)
    )
    assert student.head.last_layer_g.requires_grad and wd[id(student.head.last_layer_g)]


def test_dinov2_clips_one_norm_per_part_dino_each_tensor():
    from minidino.meta_arch import build_student_teacher
    from minidino.optim import clip_gradients

    cfg, _, _ = cli.parse_args(["--method=dinov2", "--head.ibot_separate_head=true", "--head.out_dim=64"])
    student, _ = build_student_teacher(cfg)
    torch.manual_seed(0)
    for p in student.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.grad.clone() for n, p in student.named_parameters()}
    clip_gradients(student, 3.0, "part")
    for part in (student.backbone, student.head, student.ibot_head):
        names = [n for n, p in student.named_parameters() if any(p is q for q in part.parameters())]
        norm_before = torch.stack([before[n].norm() for n in names]).norm()
        norm_after = torch.stack([p.grad.norm() for p in part.parameters()]).norm()
        assert abs(norm_after - 3.0) < 1e-3 and norm_before > 3.0  # one global norm per part, clipped to 3
        ratios = [(dict(student.named_parameters())[n].grad / before[n]).mean() for n in names]
        assert max(ratios) - min(ratios) < 1e-4  # every tensor of the part scaled by the same factor
    for p in student.parameters():
        p.grad = before_grad = torch.randn_like(p) * 10
    clip_gradients(student, 3.0, "tensor")
    assert all(p.grad.norm() <= 3.0 + 1e-4 for p in student.parameters())  # DINO: each tensor on its own
    assert before_grad.norm() > 3.0


def test_fused_adamw_with_its_values_on_the_device_updates_as_adamw():
    """--optim.fused's optimiser (fused AdamW reading lr from 0-d tensors rewritten in place, the weight decay
    applied by `decay_weights`) against plain AdamW with float lr and weight decay: the same weights over
    steps of changing lr and weight decay, with DINOv2's layer-wise lr decay (groups of different lr), a
    parameter without gradient (left alone by both) and, at the end, a non-finite step (skipped whole)."""
    cfg, _, _ = cli.parse_args(tiny_run("unused", "--method=dinov2"))
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        student, _ = build_student_teacher(cfg)
        models.append((student, build_optimizer(student, dataclasses.replace(cfg.optim, fused=fused))))
    assert len(models[1][1].param_groups) > 2 and all(
        torch.is_tensor(g["lr"]) for g in models[1][1].param_groups
    )
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in models[0][0].parameters()] for _ in range(4)]
    for step, (lr, wd) in enumerate([(1e-2, 0.04), (5e-3, 0.2), (2e-3, 0.4), (1e-3, 0.4)]):
        for (student, opt), fused in zip(models, (False, True)):
            for p, g in zip(student.parameters(), grads[step]):
                p.grad = g.clone()
            student.backbone.cls_token.grad = None  # no gradient: no update and no decay this step
            apply_schedule(opt, lr, wd)
            finite = torch.tensor(step < 3)  # the last step is a non-finite one
            if fused:
                opt.found_inf = (~finite).float()
                decay_weights(opt, finite)
            if fused or step < 3:  # the plain path raises NonFiniteLoss before its update
                opt.step()
        a, b = (dict(m.named_parameters()) for m, _ in models)
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), step
