"""Schedules as pure functions of the step (DINO, arXiv 2104.14294, App. B; DINOv2, arXiv 2304.07193, App. B).

DINO precomputes one value per iteration (`cosine_scheduler`); here each schedule is a function of the step,
which is easier to test and to resume. Steps count optimiser updates from 0 to total_steps - 1.

  lr:            linear warm-up from 0, then cosine from the peak down to min_lr
  weight decay:  cosine from weight_decay to weight_decay_end (0.04 -> 0.4)
  teacher temp:  linear warm-up from warmup_teacher_temp to teacher_temp, then constant (0.04 -> 0.07)
  momentum:      cosine from momentum_teacher to 1 (0.996 -> 1)
  constant:      optim.schedule=constant (DINOv3): lr, weight decay and momentum flat after their warm-up
  frozen head:   the prototype layer gets no update during the first freeze_last_layer epochs (1)
  frozen trunk:  a backbone loaded from another model waits freeze_backbone_epochs while new heads learn

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import math

SHAPES = ("cosine", "constant")  # optim.schedule


def cosine(
    step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear from `warmup_start` to `start` over `warmup_steps`, then half a cosine from `start` to `end`.

    At step == warmup_steps the value is `start`; at the last step (total_steps - 1) it is `end`.
    """
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over `warmup_steps`, then constant at `end`."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def schedules(step: int, total_steps: int, steps_per_epoch: int, optim, loss, lr_peak: float) -> dict:
    """All training schedules at `step`: lr, weight decay, teacher temperature, teacher momentum and whether the
    prototypes are frozen."""
    flat = optim.schedule == "constant"  # DINOv3 (dinov3_vit7b16_pretrain.yaml: peak = end)
    return {
        "lr": cosine(
            step,
            total_steps,
            lr_peak,
            lr_peak if flat else optim.min_lr,
            optim.warmup_epochs * steps_per_epoch,
        ),
        "wd": cosine(
            step, total_steps, optim.weight_decay, optim.weight_decay if flat else optim.weight_decay_end
        ),
        "teacher_temp": linear_warmup(
            step,
            loss.warmup_teacher_temp_epochs * steps_per_epoch,
            loss.warmup_teacher_temp,
            loss.teacher_temp,
        ),
        "momentum": cosine(
            step, total_steps, optim.momentum_teacher, optim.momentum_teacher if flat else 1.0
        ),
        "freeze_last_layer": step < optim.freeze_last_layer * steps_per_epoch,  # no prototype update yet
        "freeze_backbone": step < optim.freeze_backbone_epochs * steps_per_epoch,  # new heads learn alone
    }
