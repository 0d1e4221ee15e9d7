"""The momentum teacher (DINO, arXiv 2104.14294, Sec. 3.1): theta_t <- lambda theta_t + (1 - lambda) theta_s.

lambda follows a cosine schedule from 0.996 to 1 (`schedules.cosine`). The teacher never receives gradients;
it is a running average of past students, "a form of model ensembling" (Sec. 5.2). The update is one fused
`_foreach_lerp_` over all parameters instead of a Python loop of small kernels.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dist import local


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float | Tensor) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for all parameters: m=0 copies the student, m=1 keeps the
    teacher. A 0-d tensor m stays on the device (train.py's step that never waits).

    Buffers are not averaged (the ViT has none that train); both modules must have the same parameter names.
    """
    # FSDP shards teacher and student alike, so the update runs on this process's shards (local tensors);
    # FSDP2 leaves the root module's parameters gathered after a forward with no backward: shard them again
    for model in (teacher, student):
        if hasattr(model, "reshard"):
            model.reshard()
    t_params = [local(p) for p in teacher.parameters()]
    s_params = [local(p).detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(
            f"teacher has {len(t_params)} parameters, student {len(s_params)}: not the same model"
        )
    # lerp(t, s, w) = t + w (s - t) = (1 - w) t + w s, with w = 1 - m
    if isinstance(momentum, Tensor):  # lerp would read a tensor weight back to the host: t += w (s - t)
        steps = torch._foreach_sub(s_params, t_params)
        torch._foreach_mul_(steps, 1.0 - momentum)
        torch._foreach_add_(t_params, steps)
    else:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
