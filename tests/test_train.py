import dataclasses
import json
import os

import pytest
import torch

import train
from conftest import tiny_run
from minidino import cli
from minidino.config import ConfigError, LossConfig, OptimConfig
from minidino.losses import Losses
from minidino.masking import StepMasks
from minidino.meta_arch import build_student_teacher
from minidino.optim import apply_schedule, build_optimizer, param_groups
from minidino.weights import load_checkpoint


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_end_to_end_writes_run_folder(tmp_path, capsys):
    result = train.main(tiny_run(tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "curves.png", "knn.json"):
        assert (run / name).exists(), name
    rows = _log(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "loss",
        "lr",
        "wd",
        "teacher_temp",
        "momentum",
        "teacher_entropy",
        "teacher_kl_uniform",
        "ln_K",
        "images_per_s",
        "epoch",
        "skipped_images",
    ):
        assert key in rows[0], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["optim"]["epochs"] == 2
    out = capsys.readouterr().out
    assert "k-NN top-1 (k=20" in out and "random init" in out
    assert 0 <= result["knn_top1"] <= 100 and 0 <= result["knn_top1_random_init"] <= 100


@pytest.mark.parametrize(
    "switch",
    [
        ["--loss.fused_dino_loss=true"],
        ["--optim.fused=true"],
        ["--run.compile_step=true", "--method=dinov2", "--model.pack_crops=true", "--model.attn_impl=sdpa"],
    ],
    ids=["fused_loss", "fused_optim", "compile_step_dinov2_packed"],
)
def test_fused_switches_train_the_same_steps(tmp_path, monkeypatch, switch):
    """--loss.fused_dino_loss (the closed form reorders the sums), --optim.fused (fused AdamW, the
    non-finite check on the device) and --run.compile_step (student, teacher and losses each one graph;
    aot_eager here, the graphs inductor would generate code for; DINOv2 with packed crops): 4 steps give the losses and teacher
    weights of the default path, to fp32 rounding. For DINOv2 the stochastic depth is off, so both runs
    draw the same random numbers whatever order the graphs run their operations in, and the head has no
    BatchNorm: the gradients of the biases before it are 0 in exact arithmetic, rounding noise in fp32, and
    AdamW's first steps turn noise of either sign into full-size updates that differ between the paths."""
    import minidino.parallel

    monkeypatch.setattr(minidino.parallel, "COMPILE_BACKEND", "aot_eager")
    base = [a for a in switch if not a.startswith("--run.compile_step")]
    if "--method=dinov2" in switch:
        base += ["--model.drop_path=0", "--head.use_bn=false"]
    train.main(tiny_run(tmp_path / "a", "--run.eval_at_end=false", *base))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train.main(tiny_run(tmp_path / "b", "--run.eval_at_end=false", *base, *switch))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 3 if "--run.compile_step=true" in switch else graphs == 0  # student, teacher, losses
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    # AdamW's normalisation of tiny LayerScale gradients turns fp32 rounding into full-size updates: by the
    # 4th DINOv2 step the compiled path's loss is 4e-4 away on some CPUs (1e-5 on others)
    rel = 1e-3 if "--method=dinov2" in switch else 1e-5
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=rel)
    ta, tb = (load_checkpoint(str(tmp_path / d))["teacher"] for d in "ab")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5, rtol=1e-4) for k in ta)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_padded_mask_buffers_train_the_same_step(accum_steps):
    """What --run.cuda_graphs changes in the step on a CPU: iBOT's index buffers padded to a fixed size
    (`masking.upper_bound`). One DINOv2 step with Sinkhorn targets, whole or in 2 micro-batches (which
    regroup the padded targets by row), gives the loss and the gradients of the unpadded buffers."""

    from minidino.losses import build_losses
    from minidino.masking import step_masks
    from minidino.meta_arch import build_student_teacher
    from minidino.schedules import schedules

    args = tiny_run(
        "unused", "--method=dinov2", "--loss.centering=sinkhorn", f"--optim.accum_steps={accum_steps}"
    )
    args.append("--loss.koleo_group=4")  # KoLeo's neighbours within each micro-batch of 4
    args.append("--head.use_bn=false")  # BatchNorm would see the padding (refused with --run.cuda_graphs)
    cfg, _, _ = cli.parse_args(args)
    crops = [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(2)]
    results = []
    for padded in (False, True):
        c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, cuda_graphs=padded))
        torch.manual_seed(0)
        student, teacher = build_student_teacher(c)
        losses, opt = build_losses(c), build_optimizer(student, c.optim)
        masks = step_masks(c, 8, step=1, n_crops=4)
        assert (masks.valid is not None) == padded and (not padded or not masks.valid.all())
        sched = {**schedules(3, 10, 2, c.optim, c.loss, 1e-3), "freeze_last_layer": False}
        torch.manual_seed(1)  # the same stochastic-depth draws in both
        out = train.train_step(student, teacher, teacher, losses, opt, crops, masks, sched, c.optim)
        results.append(
            (out["loss"], {n: p.grad for n, p in student.named_parameters() if p.grad is not None})
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-4, msg=name)


def _one_step(cfg, student, teacher, crops, **sched):
    """train_step with DINO's loss on these crops, lr 1e-2, no clipping; `sched` overrides the schedules."""
    from minidino.schedules import schedules

    opt = torch.optim.AdamW(param_groups(student), lr=1e-2)
    sched = {**schedules(0, 10, 1, cfg.optim, cfg.loss, 1e-2), "lr": 1e-2, **sched}
    losses = Losses(cfg.head.out_dim, LossConfig())
    no_clip = OptimConfig(clip_grad=0.0)
    train.train_step(student, teacher, teacher, losses, opt, crops, StepMasks(None, None), sched, no_clip)


def test_teacher_gets_no_gradient_and_moves_only_by_ema(tmp_path):
    cfg, _, _ = cli.parse_args(tiny_run(tmp_path / "a", "--optim.momentum_teacher=1.0"))

    student, teacher = build_student_teacher(cfg)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    _one_step(cfg, student, teacher, crops, momentum=1.0, freeze_last_layer=False)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.named_parameters())  # m = 1: unchanged
    assert any(not torch.equal(before[k], v) for k, v in student.named_parameters())  # the student moved


@pytest.mark.parametrize("weight_norm", ["true", "false"])
def test_frozen_last_layer_does_not_move(tmp_path, weight_norm):
    """With DINO's weight-normalised prototypes and with DINOv3's plain linear layer (no gain to freeze)."""
    cfg, _, _ = cli.parse_args(tiny_run(tmp_path / "a", f"--head.weight_norm={weight_norm}"))
    assert (cfg.head.weight_norm, build_student_teacher(cfg)[0].head.last_layer_g is None) == (
        weight_norm == "true",
        weight_norm == "false",
    )

    student, teacher = build_student_teacher(cfg)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    w = student.head.last_layer.weight.clone()
    _one_step(cfg, student, teacher, crops, momentum=0.99, freeze_last_layer=True)
    assert torch.equal(student.head.last_layer.weight, w)
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), teacher.parameters()))


def test_dinov2_end_to_end_logs_all_terms(tmp_path):
    train.main(
        tiny_run(
            tmp_path / "a",
            "--method=dinov2",
            "--loss.mask_probability=1.0",
            "--head.ibot_separate_head=true",
            "--model.n_registers=2",
        )
    )
    rows = _log(tmp_path / "a")
    for key in ("loss_dino", "loss_ibot", "loss_koleo"):
        assert all(key in r and torch.isfinite(torch.tensor(r[key])) for r in rows), key
    ckpt = load_checkpoint(str(tmp_path / "a"))
    assert set(ckpt["losses"]) == {"dino", "ibot"} and any(
        k.startswith("ibot_head.") for k in ckpt["student"]
    )


def test_high_resolution_phase_restarts_its_schedules_and_moves_the_teacher(tmp_path, monkeypatch):
    """DINOv2's high-resolution phase as its own run: from a finished run's weights, at 518/224 x the crop
    sides, with lr warm-up, momentum and teacher temperature restarted inside the phase. The kept teacher
    must move during it (the old 'larger crops for the last epochs' took < 1% of its weights from them)."""
    run = tmp_path / "a"
    train.main(tiny_run(run, "--run.eval_at_end=false"))
    before = load_checkpoint(str(run))["teacher"]
    seen = []
    real = train.train_step

    def spy(student, teacher, ema_target, losses, optimizer, crops, masks, sched, optim):
        seen.append((crops[0].shape[-1], crops[-1].shape[-1], sched["lr"], sched["momentum"]))
        return real(student, teacher, ema_target, losses, optimizer, crops, masks, sched, optim)

    monkeypatch.setattr(train, "train_step", spy)
    train.main(["--highres", str(run), "--optim.epoch_steps=2", "--run.eval_at_end=false"])  # 10 x 2 steps
    phase = load_checkpoint(str(tmp_path / "a_highres"))
    assert phase["step"] == 20 and phase["config"]["run"]["init_from"] == str(run)
    assert {(big, small) for big, small, _, _ in seen} == {(72, 40)}  # 32 -> 72, 16 -> 40 px at patch 8
    lrs, momenta = [lr for _, _, lr, _ in seen], [m for _, _, _, m in seen]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-3 / 10 * 16 / 256)  # warm-up to a 10x lower peak
    assert momenta[0] == 0.99 and momenta[-1] == 1.0  # the momentum schedule starts again
    # the share of the kept teacher made during the phase, 1 - prod(m_t): 0.095 here (momentum 0.99 -> 1 over
    # 20 steps); with the pre-training schedules near their end (m ~ 1) it would be close to 0
    share = 1 - torch.tensor(momenta, dtype=torch.float64).prod()
    assert share > 0.09, share
    # the model is built at the phase's 72 px: a 9 x 9 position table, learnt there (DINOv2's 518 px: 37 x 37)
    assert (
        phase["config"]["model"]["img_size"] == 72 and phase["teacher"]["backbone.pos_embed"].shape[1] == 82
    )
    weights = [k for k in before if k.startswith("backbone.") and k != "backbone.pos_embed"]
    delta = torch.cat([(phase["teacher"][k] - before[k]).flatten() for k in weights]).norm()
    assert delta / torch.cat([before[k].flatten() for k in weights]).norm() > 5e-5  # measured 1.0e-4


def test_distillation_from_a_larger_frozen_teacher(tmp_path):
    big = ["--model.arch=vit_tiny", "--run.eval_at_end=false", "--run.max_steps=2"]
    train.main(tiny_run(tmp_path / "big", *big))
    teacher_before = load_checkpoint(str(tmp_path / "big"))["teacher"]
    result = train.main(
        tiny_run(
            tmp_path / "small",
            "--method=dinov2",
            f"--run.distill_from={tmp_path / 'big'}",
            "--model.drop_path=0",
            "--loss.mask_probability=0",
        )
    )
    rows = _log(tmp_path / "small")
    assert all("loss_ibot" in r and torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ckpt = load_checkpoint(str(tmp_path / "small"))
    assert ckpt["teacher"]["backbone.pos_embed"].shape[-1] == 128  # the saved model is the small EMA student
    assert not torch.equal(ckpt["teacher"]["backbone.pos_embed"], ckpt["student"]["backbone.pos_embed"])
    after = load_checkpoint(str(tmp_path / "big"))["teacher"]
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)  # the big teacher file is untouched
    assert 0 <= result["knn_top1"] <= 100


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_two_accumulated_micro_batches_of_4_equal_one_batch_of_8(tmp_path, method):
    """Gradient accumulation: the same losses and weights as the whole batch at once. The centre, Sinkhorn's
    equipartition and the EMA use the whole batch either way; KoLeo (nearest neighbours within a micro-batch)
    and BatchNorm (statistics of a micro-batch) would differ by design, so BatchNorm is off, as is drop path,
    and KoLeo's neighbours are searched in groups of 4 images (`--loss.koleo_group`), the same either way.
    DINOv2 without KoLeo: its LayerScale (1e-5) keeps the CLS features of different images within ~1e-5 of
    each other at first, where the accumulated sums' last-bit differences can change a nearest neighbour."""
    extra = ["--optim.batch_size=8", "--loss.koleo_weight=0.1", "--loss.koleo_group=4", "--head.use_bn=false"]
    extra += ["--run.eval_at_end=false", "--model.drop_path=0"]
    extra += ["--method=dinov2", "--loss.koleo_weight=0"] if method == "dinov2" else []
    train.main(tiny_run(tmp_path / "whole", *extra))
    train.main(tiny_run(tmp_path / "accum", *extra, "--optim.accum_steps=2"))
    a, b = _log(tmp_path / "whole"), _log(tmp_path / "accum")
    assert len(a) == len(b) == 8
    for key in ("loss", "loss_dino") + (("loss_ibot",) if method == "dinov2" else ("loss_koleo",)):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]), atol=1e-5, rtol=1e-5
        )
    wa, wb = (load_checkpoint(str(tmp_path / d)) for d in ("whole", "accum"))
    for part in ("student", "teacher"):
        for k in wa[part]:
            torch.testing.assert_close(wb[part][k], wa[part][k], atol=1e-5, rtol=1e-4, msg=f"{part} {k}")
    torch.testing.assert_close(wb["losses"]["dino"]["center"], wa["losses"]["dino"]["center"])


def test_a_koleo_group_that_spans_micro_batches_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--loss.koleo_group=0 .* micro-batch of 8 images .* try 8"):
        train.main(tiny_run(tmp_path / "a", "--optim.accum_steps=2"))  # the shapes preset's KoLeo, 16 images


def test_accumulation_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match=r"must be divisible by the 1 processes x --optim.accum_steps=3"):
        train.main(tiny_run(tmp_path / "a", "--optim.accum_steps=3"))


@pytest.mark.parametrize("method", ["dino", "dinov2", "dinov2_packed"])
def test_fused_step_never_reads_a_value_back(method):
    """With --optim.fused a training step asks the device for no value (the sync detector counts 0), the
    iBOT masks' index buffers and packed crops (SDPA per run of equal lengths, from the host's lengths; with
    DINOv2's efficient stochastic depth on them) included; the default step reads the loss's finiteness and AdamW's counts."""
    from minidino.losses import build_losses
    from minidino.masking import step_masks
    from minidino.schedules import schedules
    from minidino.syncs import HostSyncs

    counts = {}
    for fused in (False, True):
        packed = [f"--model.pack_crops={method.endswith('packed')}", "--model.attn_impl=sdpa"]
        packed += ["--model.drop_path=0.2"] * method.endswith("packed")  # DINOv2's subset drop path, packed
        args = tiny_run("unused", f"--method={method.split('_')[0]}", f"--optim.fused={fused}", *packed)
        cfg, _, _ = cli.parse_args(args)
        torch.manual_seed(0)
        student, teacher = build_student_teacher(cfg)
        losses, opt = build_losses(cfg), build_optimizer(student, cfg.optim)
        crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
        masks = step_masks(cfg, 4, step=3, n_crops=4)  # drawn in the DataLoader workers in a run
        assert method == "dino" or masks.indices is not None
        assert student.backbone.pack_crops == method.endswith("packed")
        sched = {**schedules(3, 10, 2, cfg.optim, cfg.loss, 1e-3), "freeze_last_layer": False}
        with HostSyncs() as syncs:
            for _ in range(2):
                out = train.train_step(student, teacher, teacher, losses, opt, crops, masks, sched, cfg.optim)
        counts[fused] = syncs.count
        assert torch.isfinite(out["loss"])
    assert counts[True] == 0 and counts[False] >= 2, counts


def test_fused_step_skips_a_non_finite_update_on_the_device():
    """A NaN loss under --optim.fused: no weight of student or teacher changes, and the step says so."""
    from minidino.losses import build_losses
    from minidino.schedules import schedules

    cfg, _, _ = cli.parse_args(tiny_run("unused", "--optim.fused=true"))
    student, teacher = build_student_teacher(cfg)
    losses, opt = build_losses(cfg), build_optimizer(student, cfg.optim)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    sched = {**schedules(3, 10, 2, cfg.optim, cfg.loss, 1e-2), "lr": 1e-2, "freeze_last_layer": False}
    apply_schedule(opt, sched["lr"], 0.04)  # an update and a weight decay that would both change weights
    out = train.train_step(
        student, teacher, teacher, losses, opt, crops, StepMasks(None, None), sched, cfg.optim
    )
    assert bool(out["finite"])
    before = [p.detach().clone() for p in (*student.parameters(), *teacher.parameters())]
    crops[3][0, 0, 0, 0] = float("nan")  # one local crop's pixel: the student's loss becomes NaN
    out = train.train_step(
        student, teacher, teacher, losses, opt, crops, StepMasks(None, None), sched, cfg.optim
    )
    assert not bool(out["finite"])
    after = [*student.parameters(), *teacher.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
