"""Checkpoints: atomic save, safe load, and export of the backbone as a plain ViT state_dict.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(path, weights_only=True)` (no pickled code runs when a file from elsewhere is opened).
Saving writes to a temporary file in the same folder, flushes it to disk, then renames it over the old one:
a crash, a full disk or a Ctrl-C during the save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os

import torch


def save_checkpoint(state: dict, path: str) -> None:
    """Write `state` to `path` atomically (write a temporary file, fsync, rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`, with a one-line error for a missing or bad file."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unpickling refused...
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None


def backbone_state_dict(model_state: dict) -> dict:
    """The backbone part of an `SSLModel` state_dict, with plain ViT keys (cls_token, blocks.0.attn.qkv)."""
    return {k.removeprefix("backbone."): v for k, v in model_state.items() if k.startswith("backbone.")}


def load_model_state(model: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict with a one-line error when the checkpoint holds another architecture."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
        )
        raise ValueError(f"{what} does not match this architecture: {detail}")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# Weights in and out. minidino's ViT uses the common key layout, so most keys need no renaming:
#
#   minidino (and official DINO / DINOv2)     timm VisionTransformer
#   cls_token, pos_embed (1, 1 + N, C)        cls_token, pos_embed (class position included)
#   register_tokens (1, R, C)                 reg_token (1, R, C)   [DINOv2 with registers]
#   mask_token (1, C)                         -                      (iBOT only; dropped going to timm)
#   patch_embed.proj.{weight,bias}            patch_embed.proj.{weight,bias}
#   blocks.i.norm1 / attn.qkv / attn.proj     same
#   blocks.i.ls1.gamma, ls2.gamma             same (LayerScale)
#   blocks.i.norm2 / mlp.fc1 / mlp.fc2        same (SwiGLU: mlp.w12 / mlp.w3 as in DINOv2, not in timm)
#   norm                                      norm
#   -                                         head (classifier; Identity with num_classes=0)
#
# Official DINO ViT files (e.g. dino_deitsmall16_pretrain.pth) and DINOv2 hub files hold these same backbone
# keys and load with `load_model_state(vit, state, ...)`; a full DINO training checkpoint keeps the teacher's
# backbone under 'teacher' with a 'backbone.' prefix: `backbone_state_dict(ckpt['teacher'])`. Nothing here
# downloads anything: pass files you already have.


def to_timm(state: dict) -> dict:
    """minidino ViT state_dict -> timm VisionTransformer state_dict (load with strict=False for the head)."""
    out = {("reg_token" if k == "register_tokens" else k): v for k, v in state.items() if k != "mask_token"}
    if any(".mlp.w12." in k for k in out):
        raise ValueError("to_timm: SwiGLU blocks (mlp.w12/w3) have no timm VisionTransformer equivalent")
    return out


def from_timm(state: dict, mask_token: torch.Tensor | None = None) -> dict:
    """timm VisionTransformer state_dict -> minidino ViT state_dict. timm has no iBOT mask token: a zero one
    (minidino's initial value) is added unless `mask_token` is given."""
    out = {
        ("register_tokens" if k == "reg_token" else k): v
        for k, v in state.items()
        if not k.startswith("head.")
    }
    unknown = [k for k in out if k.startswith(("norm_pre.", "fc_norm.", "attn_pool."))]
    if unknown:
        raise ValueError(
            f"from_timm: {unknown[0]} has no minidino equivalent (a timm ViT variant minidino lacks)"
        )
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = mask_token if mask_token is not None else torch.zeros(1, dim)
    return out
