"""The optimiser side of a step: AdamW parameter groups, the lr scaling rule, gradient clipping and the
frozen prototype layer (DINO, arXiv 2104.14294, App. B; DINOv2, arXiv 2304.07193, App. B).

    groups      no weight decay on biases and other 1-D parameters (norm weights, LayerScale): DINO's
                get_params_groups, and what DINOv2's rule (biases, "norm", "gamma") gives for these models;
                tokens and position embeddings are decayed, as in both. DINOv2's layer-wise lr decay (block i
                of L: decay^(L + 1 - i)) and a smaller lr for the patch embedding
    lr          the base lr is given for a batch of 256 (DINO, linear rule) or 1024 (DINOv2, square root)
    clipping    DINO clips each parameter tensor's gradient norm to 3.0 on its own; DINOv2 clips one global
                norm per part (backbone, DINO head, iBOT head)
    freezing    the prototypes (the head's last layer) get no update in the first epoch
The values of lr and weight decay change every step (`schedules.py`); `apply_schedule` writes them into
the groups, each scaled by its lr multiplier (on the device for the fused AdamW of `--optim.fused`).

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import parallel
from .dist import all_true, local

LR_SCALING = ("linear", "sqrt")
EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token")


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
    name = name.removeprefix("backbone.")
    if name.startswith(EMBEDDINGS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """Optimiser groups, each with an lr multiplier ('lr_mult') and a weight-decay flag ('apply_wd')."""
    depth = len(model.backbone.blocks) if hasattr(model, "backbone") else 0
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layer_decay ** (depth + 1 - layer_id(name, depth))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((lr_mult, not no_wd), []).append(p)
    return [{"params": ps, "lr_mult": m, "apply_wd": wd} for (m, wd), ps in groups.items()]


def build_optimizer(model: nn.Module, optim) -> torch.optim.AdamW:
    """AdamW over `param_groups` of an `OptimConfig`; lr and weight decay are set every step."""
    groups = param_groups(model, optim.layer_decay, optim.patch_embed_lr_mult)
    if not optim.fused:  # foreach: reads each group's step count back to the host
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))
    # fused: one kernel for all tensors, step counters on the device, `found_inf` to skip a step there, and
    # (capturable) every value it reads on the device, so the update can be recorded in a CUDA graph
    opt = torch.optim.AdamW(
        groups, lr=torch.zeros(()), betas=(0.9, 0.999), weight_decay=0.0, fused=True, capturable=True
    )
    hyperparameters_on_device(opt)
    return opt


def hyperparameters_on_device(optimizer: torch.optim.Optimizer) -> None:
    """A fused optimiser's per-group lr, and `keep` = 1 - lr x weight decay, as 0-d tensors on its weights'
    device, which `apply_schedule` rewrites in place (a float would be a new value from the host each step,
    and a recorded graph would keep the first one). Fused AdamW takes weight decay as a Python number, so it
    runs with 0 (the optimiser's default) and `decay_weights` applies the decay. A resumed run keeps these
    tensors: `parallel.load_optimizer_state` loads the saved state into this optimiser's own groups."""
    if not optimizer.defaults.get("fused"):
        return
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["lr"], group["keep"] = torch.zeros((), device=device), torch.ones((), device=device)


def peak_lr(optim) -> float:
    """The lr after warm-up for the global batch: lr x batch / 256 (DINO) or lr x sqrt(batch / 1024) (DINOv2)."""
    if optim.lr_scaling == "linear":
        return optim.lr * optim.batch_size / 256
    return optim.lr * (optim.batch_size / 1024) ** 0.5


def small_batch_advice(optim) -> str | None:
    """DINO's advice for small batches (main_dino.py, --momentum_teacher): a teacher momentum of 0.9995 for a
    global batch of 256 or less; the line to print when a run does not follow it, else None."""
    if optim.batch_size <= 256 and optim.momentum_teacher < 0.9995:
        return (
            f"note: DINO advises --optim.momentum_teacher=0.9995 for global batches of 256 or less "
            f"(here {optim.batch_size} and {optim.momentum_teacher:g})"
        )
    return None


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's lr and weight decay into every group, the lr scaled by the group's multiplier; written in
    place on the device for a fused optimiser (`hyperparameters_on_device`)."""
    for group in optimizer.param_groups:
        group_lr, group_wd = lr * group["lr_mult"], (weight_decay if group["apply_wd"] else 0.0)
        if "keep" in group:
            group["lr"].fill_(group_lr)  # a kernel with the value as its argument: nothing waits
            group["keep"].fill_(1.0 - group_lr * group_wd)
        else:
            group["lr"], group["weight_decay"] = group_lr, group_wd


@torch.no_grad()
def decay_weights(optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
    """AdamW's decoupled weight decay for a fused optimiser, before its update as AdamW does it:
    theta <- (1 - lr x wd) theta on the weights that get an update this step (those with a gradient), none
    when `finite` is False (the update is skipped too)."""
    for group in optimizer.param_groups:
        if "keep" not in group or not group["apply_wd"]:
            continue
        params = [local(p) for p in group["params"] if p.grad is not None]
        if params:
            torch._foreach_mul_(params, torch.where(finite, group["keep"], 1.0))


CLIP_MODES = ("tensor", "part")


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float, mode: str = "tensor") -> None:
    """Clip gradient norms to `clip` (0 leaves them). mode 'tensor': each parameter tensor's norm on its own
    (DINO's clip_gradients); 'part': one global norm for each of the backbone, the DINO head and the iBOT
    head (DINOv2, clip_grad_norm_ per submodule). Under FSDP each process holds a shard of every gradient:
    squared norms of the shards are summed over processes first."""
    if not clip:
        return
    model = parallel.unwrap(model)
    parts = (
        [m for m in (model.backbone, model.head, model.ibot_head) if m is not None]
        if mode == "part"
        else [model]
    )
    for part in parts:
        grads = [local(p.grad) for p in part.parameters() if p.grad is not None]
        if not grads:
            continue
        sq_norms = torch.stack(torch._foreach_norm(grads)) ** 2  # (P,) per tensor
        if mode == "part":
            sq_norms = sq_norms.sum(0, keepdim=True)  # the part's global norm, squared
        if parallel.is_sharded(part):
            torch.distributed.all_reduce(sq_norms)
        factors = (clip / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(factors.expand(len(grads)).unbind()))


def drop_frozen_gradients(model: nn.Module, sched: dict) -> None:
    """Drop the gradients of what stays fixed this step (AdamW then skips it: no update, no weight decay):
    the heads' prototype layers in the first epoch(s) (DINO finds it stabilises training), and the backbone
    while new heads learn on a backbone loaded from another model (--run.init_from)."""
    model = parallel.unwrap(model)
    if sched["freeze_last_layer"]:
        for head in (model.head, model.ibot_head):
            if head is not None:
                for p in head.last_layer_params():
                    p.grad = None
    if sched.get("freeze_backbone"):
        for p in model.backbone.parameters():
            p.grad = None


class NonFiniteLoss(RuntimeError):
    """A loss that is NaN or infinite: the run stops with the step and the last good checkpoint."""


class FiniteGuard:
    """Whether a step's losses were finite, and what follows when one was not. Plain: `check` raises
    NonFiniteLoss at once, which makes the host wait for the device every step to know. With --optim.fused
    the flag stays on the device: `before_update` makes the fused AdamW skip its update (found_inf),
    `decay_weights` skip the weight decay and the EMA keep the teacher (momentum 1), and the loop reads the
    flag at log and checkpoint steps only (train.check_finite)."""

    def __init__(self, fused: bool, device: torch.device):
        self.fused = fused
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # every micro-batch's loss finite

    def check(self, loss: Tensor) -> None:
        if self.fused:
            self.finite &= torch.isfinite(loss)  # stays on the device
        elif not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()}")

    def before_update(self, optimizer: torch.optim.Optimizer, momentum):
        """The EMA momentum to use; with fused, the optimiser told to skip a non-finite step."""
        if not self.fused:
            return momentum
        self.finite = all_true(self.finite)  # one process's NaN reaches every gradient through the all-reduce
        optimizer.found_inf = (~self.finite).float()
        decay_weights(optimizer, self.finite)  # theta <- (1 - lr wd) theta, as AdamW would before its update
        return torch.where(self.finite, momentum, 1.0)
