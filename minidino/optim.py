"""The optimiser side of a step: AdamW parameter groups, the lr scaling rule, gradient clipping and the
frozen prototype layer (DINO, arXiv 2104.14294, App. B; DINOv2, arXiv 2304.07193, App. B).

    groups      no weight decay on biases, norm weights, tokens and position embeddings; DINOv2's layer-wise
                lr decay (block i of L: decay^(L + 1 - i)) and a smaller lr for the patch embedding
    lr          the base lr is given for a batch of 256 (DINO, linear rule) or 1024 (DINOv2, square root)
    clipping    DINO clips each parameter tensor's gradient norm to 3.0 on its own
    freezing    the prototypes (the head's last layer) get no update in the first epoch
The values of lr and weight decay change every step (`schedules.py`); `apply_schedule` writes them into
the groups, each scaled by its lr multiplier.
"""

from __future__ import annotations

import torch
from torch import nn

from . import parallel
from .dist import local

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
        no_wd = p.ndim <= 1 or name.endswith(("_token", "_tokens")) or "pos_embed" in name
        groups.setdefault((lr_mult, not no_wd), []).append(p)
    return [{"params": ps, "lr_mult": m, "apply_wd": wd} for (m, wd), ps in groups.items()]


def build_optimizer(model: nn.Module, optim) -> torch.optim.AdamW:
    """AdamW over `param_groups` of an `OptimConfig`; lr and weight decay are set every step."""
    groups = param_groups(model, optim.layer_decay, optim.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))


def peak_lr(optim) -> float:
    """The lr after warm-up for the global batch: lr x batch / 256 (DINO) or lr x sqrt(batch / 1024) (DINOv2)."""
    if optim.lr_scaling == "linear":
        return optim.lr * optim.batch_size / 256
    return optim.lr * (optim.batch_size / 1024) ** 0.5


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = weight_decay if group["apply_wd"] else 0.0


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """Clip each parameter tensor's gradient norm to `clip` on its own (DINO's clip_gradients, not one global
    norm); 0 leaves them. Under FSDP each process holds a shard of every gradient: the squared norms of the
    shards are summed over processes first."""
    if not clip:
        return
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    sq_norms = torch.stack(torch._foreach_norm(grads)) ** 2  # (P,)
    if parallel.is_sharded(model):
        torch.distributed.all_reduce(sq_norms)
    factors = (clip / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(factors.unbind()))


def freeze_prototypes(model: nn.Module) -> None:
    """Drop the gradients of the heads' prototype layers: they stay fixed this step (DINO: first epoch)."""
    model = parallel.unwrap(model)
    for head in (model.head, model.ibot_head):
        if head is not None:
            head.last_layer.weight.grad, head.last_layer_g.grad = None, None
