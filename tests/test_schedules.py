import math

import pytest

from minidino.presets import imagenet
from minidino.schedules import cosine, linear_warmup, schedules


def test_cosine_at_start_end_of_warmup_and_last_step():
    total, warm = 100, 10
    assert cosine(0, total, 1.0, 0.1, warm) == 0.0
    assert abs(cosine(5, total, 1.0, 0.1, warm) - 0.5) < 1e-12
    assert cosine(warm, total, 1.0, 0.1, warm) == 1.0
    assert abs(cosine(total - 1, total, 1.0, 0.1, warm) - 0.1) < 1e-12
    mid = warm + (total - 1 - warm) / 2
    assert (
        abs(cosine(int(mid), total, 1.0, 0.0, warm) - 0.5 * (1 + math.cos(math.pi * (int(mid) - warm) / 89)))
        < 1e-12
    )


def test_cosine_is_monotone_after_warmup():
    vals = [cosine(s, 50, 0.996, 1.0) for s in range(50)]
    assert vals[0] == 0.996 and vals[-1] == 1.0
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_teacher_temperature_warmup():
    assert linear_warmup(0, 30, 0.04, 0.07) == 0.04
    assert abs(linear_warmup(15, 30, 0.04, 0.07) - 0.055) < 1e-12
    assert linear_warmup(30, 30, 0.04, 0.07) == 0.07 and linear_warmup(99, 30, 0.04, 0.07) == 0.07
    assert linear_warmup(0, 0, 0.04, 0.07) == 0.07  # no warm-up


def test_paper_schedules_from_imagenet_preset():
    cfg = imagenet()
    spe = 10
    total = cfg.optim.epochs * spe
    peak = cfg.optim.lr * 1024 / 256
    s0 = schedules(0, total, spe, cfg.optim, cfg.loss, peak)
    frozen, frozen_backbone = s0.pop("freeze_last_layer"), s0.pop("freeze_backbone")
    assert frozen_backbone  # freeze_backbone_epochs = 1; train.py sets it to 0 unless the heads are new
    assert s0 == pytest.approx({"lr": 0.0, "wd": 0.04, "teacher_temp": 0.04, "momentum": 0.996})
    # the prototypes are frozen for the first epoch (freeze_last_layer = 1): steps 0 .. spe - 1
    assert frozen and schedules(spe - 1, total, spe, cfg.optim, cfg.loss, peak)["freeze_last_layer"]
    assert not schedules(spe, total, spe, cfg.optim, cfg.loss, peak)["freeze_last_layer"]
    s_w = schedules(cfg.optim.warmup_epochs * spe, total, spe, cfg.optim, cfg.loss, peak)
    assert abs(s_w["lr"] - peak) < 1e-12
    s_t = schedules(30 * spe, total, spe, cfg.optim, cfg.loss, peak)
    assert s_t["teacher_temp"] == 0.07
    s_end = schedules(total - 1, total, spe, cfg.optim, cfg.loss, peak)
    assert abs(s_end["lr"] - 1e-6) < 1e-12 and abs(s_end["wd"] - 0.4) < 1e-12 and s_end["momentum"] == 1.0


def test_constant_schedules_are_flat_after_their_warm_up():
    """DINOv3 (dinov3_vit7b16_pretrain.yaml: peak == end): lr warms up then stays; weight decay and teacher
    momentum never move; the teacher temperature still warms up."""
    from minidino.config import LossConfig, OptimConfig
    from minidino.schedules import schedules

    optim = OptimConfig(schedule="constant", warmup_epochs=2, weight_decay=0.04, momentum_teacher=0.994)
    loss = LossConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    rows = [schedules(s, 37, 5, optim, loss, 1e-3) for s in range(37)]
    assert rows[0]["lr"] == 0 and rows[5]["lr"] == 5e-4 and all(r["lr"] == 1e-3 for r in rows[10:])
    assert {r["wd"] for r in rows} == {0.04} and {r["momentum"] for r in rows} == {0.994}
    assert rows[0]["teacher_temp"] == 0.04 and rows[15]["teacher_temp"] == 0.07
