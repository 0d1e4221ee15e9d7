"""Weight files: safe loading, atomic writing, and every backbone layout minidino reads and writes.

Files are opened with `torch.load(..., weights_only=True)`: no pickled code runs when a file from elsewhere
is read. A backbone file is turned into minidino's keys (`plain_backbone`), its architecture read from the
tensors (`model_config_of`), and its *source* recognised (`weights_source`): each source resizes its
position table its own way for inputs of another size, and the rule is part of the model config, so the
loaded model gives that source's features at every size:

  source      files                                         position table for an h x w grid
  dino        DINO's released ViTs and training checkpoints  bicubic, scale factors (h + 0.1) / n
  dinov2      DINOv2 hub files without registers             the same (hub/backbones.py: offset 0.1)
  dinov2_reg  DINOv2 hub files with registers (*_reg4)       bicubic to size (h, w), antialiased (offset 0)
  timm        timm VisionTransformer state dicts             bicubic to size (h, w), antialiased
              (resample_abs_pos_embed's defaults, dynamic_img_size=True)
  dinov3      DINOv3 hub files (ViT-S/16, S+/16, B/16, L/16,  none: RoPE (rope.py) works at any multiple of 16
              H+/16; the 7B's layout too)
  minidino    a minidino run or checkpoint                   its config's rule (DINO's by default)

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from dataclasses import replace

import torch

from .config import Config, ModelConfig, from_dict


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write `state` to `path` atomically (write a temporary file, fsync, rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def load_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """Load a checkpoint written by `save_checkpoint` (or any torch file of tensors and plain values), with a
    one-line error for a missing or bad file. mmap: map the file instead of reading it (a cheap look)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:  # an official DINO training checkpoint also holds its argparse Namespace: allowed, as plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # no refused object: bytes that are not a pickle at all
            raise CheckpointError(f"checkpoint {path} is not a readable torch file (not a pickle)") from None
        # never the full unpickle torch's message suggests: that runs whatever code the file holds
        raise CheckpointError(
            f"checkpoint {path} was refused as unsafe: it holds objects other than tensors and plain values "
            "(not a minidino or official checkpoint)"
        ) from None
    except Exception as e:  # a truncated zip, a file that is not a torch file at all, ...
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def run_config(state: dict, path: str) -> Config:
    """The config a minidino checkpoint was trained with; a one-line error for other files."""
    if not isinstance(state, dict) or "config" not in state or "teacher" not in state:
        raise CheckpointError(
            f"checkpoint {path} is not a minidino run checkpoint (no 'config' and 'teacher' entries; a "
            "backbone-only state dict such as an official DINO file?)"
        )
    return from_dict(state["config"])


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


def backbone_state_dict(model_state: dict) -> dict:
    """The backbone part of an `SSLModel` state_dict, with plain ViT keys (cls_token, blocks.0.attn.qkv)."""
    return {k.removeprefix("backbone."): v for k, v in model_state.items() if k.startswith("backbone.")}


# ----------------------------------------------------------------------------------------------------------
# Layouts. minidino's ViT uses the common key layout, so most keys need no renaming:
#
#   minidino (and official DINO / DINOv2)     timm VisionTransformer
#   cls_token, pos_embed (1, 1 + N, C)        cls_token, pos_embed (class position included)
#   register_tokens (1, R, C)                 reg_token (1, R, C); with registers timm's table has no class
#                                             position (no_embed_class=True): it is folded into cls_token
#   mask_token (1, C)                         -                      (iBOT only; dropped going to timm)
#   patch_embed.proj.{weight,bias}            patch_embed.proj.{weight,bias}
#   blocks.i.norm1 / attn.qkv / attn.proj     same
#   blocks.i.ls1.gamma, ls2.gamma             same (LayerScale)
#   blocks.i.norm2 / mlp.fc1 / mlp.fc2        same
#   blocks.i.mlp.w12 / mlp.w3 (SwiGLU)        mlp.fc1 / mlp.fc2 (SwiGLUPacked: fc1 twice fc2's input)
#   norm                                      norm
#   -                                         head (classifier; Identity with num_classes=0)
#
#   minidino with --model.pos_embed=rope      DINOv3 hub files (dinov3/models/vision_transformer.py)
#   register_tokens (1, R, C)                 storage_tokens (1, R, C)
#   rope_embed.periods (D_head / 4)           rope_embed.periods (a buffer; no pos_embed)
#   blocks.i.attn.qkv.bias                    blocks.i.attn.qkv.bias and .bias_mask (1, 0, 1 over q, k, v:
#                                             mask_k_bias); read as bias * bias_mask
#   blocks.i.mlp.w12 (SwiGLU)                 blocks.i.mlp.w1 and w2 (w12 is the two stacked)
#   cls_norm, local_cls_norm                  same (untie_cls_and_patch_norms, untie_global_and_local_cls_norm)
#   LayerNorm epsilon: 1e-5 in every released DINOv3 ViT (norm_layer "layernormbf16"), not in the file
#
# DINOv2 checkpoints saved with block_chunks > 0 hold blocks.{chunk}.{i}.*, i the block's own index.
# Nothing here downloads anything: pass files you already have.

SOURCES = {  # source -> (interpolate_offset, interpolate_antialias) of its position-table resizing
    "dino": (0.1, False),  # dino vision_transformer.py interpolate_pos_encoding
    "dinov2": (0.1, False),  # dinov2 hub/backbones.py _make_dinov2_model defaults
    "dinov2_reg": (0.0, True),  # dinov2 hub/backbones.py: every *_reg model
    "timm": (0.0, True),  # timm layers/pos_embed.py resample_abs_pos_embed defaults
    "dinov3": (0.1, False),  # no table (RoPE): the rule is never used
}


def is_dinov3(state: dict) -> bool:
    return "rope_embed.periods" in state or "storage_tokens" in state


def from_dinov3(state: dict) -> dict:
    """DINOv3 hub state dict -> minidino keys (a state without DINOv3's keys is returned as it is): storage
    tokens as registers, the masked key bias folded into the bias, SwiGLU's w1 and w2 stacked as w12, a zero
    qkv bias where the file has none (the 7B's qkv_bias=False)."""
    if not is_dinov3(state):
        return state
    out = {("register_tokens" if k == "storage_tokens" else k): v for k, v in state.items()}
    for key in [k for k in out if k.endswith(".attn.qkv.bias_mask")]:
        mask, bias = out.pop(key), key.removesuffix("_mask")
        out[bias] = out[bias] * mask
    for key in [k for k in out if ".mlp.w1." in k]:
        out[key.replace(".w1.", ".w12.")] = torch.cat([out.pop(key), out.pop(key.replace(".w1.", ".w2."))])
    for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        out.setdefault(key.replace(".weight", ".bias"), out[key].new_zeros(out[key].shape[0]))
    return out


def to_dinov3(state: dict, mask_k_bias: bool = True) -> dict:
    """minidino state dict of a RoPE ViT -> DINOv3 hub keys. Every released DINOv3 ViT is built with
    mask_k_bias, whose bias_mask is read from the file: (1, 0, 1) over q, k, v for a run that held its key
    bias at 0 (then written as 0), all ones for one that learnt it (the official model then uses it too).
    The local crops' CLS norm (training only) is left out: the released ViT-S/B/L/H+ have none."""
    out = {
        ("storage_tokens" if k == "register_tokens" else k): v
        for k, v in state.items()
        if not k.startswith("local_cls_norm.")
    }
    from .vit import key_bias_keep  # the mask the ViT applies (the architectures live with the ViT)

    for key in [k for k in out if k.endswith(".attn.qkv.bias")]:
        keep = key_bias_keep(out[key].shape[0] // 3, mask_k_bias)
        out[key], out[f"{key}_mask"] = out[key] * keep, keep.to(out[key].dtype)
    for key in [k for k in out if ".mlp.w12." in k]:
        out[key.replace(".w12.", ".w1.")], out[key.replace(".w12.", ".w2.")] = out.pop(key).chunk(2)
    return out


def is_timm(state: dict) -> bool:
    """timm's own keys: registers as reg_token, a classifier head, a table without the class position (its
    length a square), or LayerScale without DINOv2's mask token (timm's *_dinov2 models drop it)."""
    if "reg_token" in state or any(k.startswith("head.") for k in state):
        return True
    if "pos_embed" in state and not _has_class_position(state["pos_embed"]):
        return True
    return "blocks.0.ls1.gamma" in state and "mask_token" not in state


def _has_class_position(pos_embed: torch.Tensor) -> bool:
    """Whether a (1, T, C) table holds the class position: T = 1 + n * n, never itself a square."""
    return math.isqrt(pos_embed.shape[1]) ** 2 != pos_embed.shape[1]


def weights_source(state: dict) -> str:
    """The source of a plain backbone state dict (before `from_timm`): one of SOURCES."""
    if is_dinov3(state):
        return "dinov3"
    if is_timm(state):
        return "timm"
    if "register_tokens" in state:
        return "dinov2_reg"
    return "dinov2" if "mask_token" in state else "dino"


def to_timm(state: dict) -> dict:
    """minidino ViT state_dict -> timm VisionTransformer state_dict. Registers: timm's layout for DINOv2's
    register models (no_embed_class=True, reg_tokens=R): the class position is added into cls_token and the
    table keeps the patches only. SwiGLU: timm's SwiGLUPacked (mlp_layer), fc1 holding both halves."""
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return {
        re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v
        for k, v in out.items()
    }


def from_timm(state: dict, mask_token: torch.Tensor | None = None) -> dict:
    """timm VisionTransformer state_dict (or any plain ViT one) -> minidino ViT state_dict: reg_token ->
    register_tokens, a table without the class position gets a zero one (timm's cls_token already holds
    it), SwiGLUPacked's fc1 / fc2 -> w12 / w3, the classifier head dropped. timm has no iBOT mask token: a
    zero one (minidino's initial value) is added unless the state or `mask_token` has one."""
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
    pos = out.get("pos_embed")
    if pos is not None and not _has_class_position(pos):  # timm's table of the patches only
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    fc1, fc2 = out.get("blocks.0.mlp.fc1.weight"), out.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:  # SwiGLUPacked
        out = {
            re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", k)): v
            for k, v in out.items()
        }
    if mask_token is not None or "mask_token" not in out:
        out["mask_token"] = (
            mask_token if mask_token is not None else torch.zeros(1, out["cls_token"].shape[-1])
        )
    return out


def unchunked(state: dict) -> dict:
    """DINOv2's chunked blocks (block_chunks > 0: blocks.{chunk}.{i}.*) as blocks.{i}.*."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def plain_weights(state: dict) -> dict:
    """The backbone's own state dict in its source's keys: a minidino run checkpoint's EMA teacher, an
    official DINO or DINOv2 training checkpoint's teacher ('backbone.' keys, DINOv2's chunks undone), or the
    file itself (a backbone file: official, timm, or an export)."""
    if isinstance(state.get("teacher"), dict):  # minidino, DINO, DINOv2: the teacher is the model to keep
        state = backbone_state_dict({k.removeprefix("module."): v for k, v in state["teacher"].items()})
    return unchunked(state)


def plain_backbone(state: dict) -> dict:
    """A backbone state dict in minidino's keys from any supported file (see `plain_weights` and
    `minidino_keys`)."""
    return minidino_keys(plain_weights(state))


def minidino_keys(weights: dict) -> dict:
    """A backbone's own state dict in minidino's keys: DINOv3's and timm's layouts converted, a missing iBOT
    mask token a zero one, as minidino initialises it; minidino's and DINO/DINOv2's keys as they are."""
    return from_timm(from_dinov3(weights))


def model_config_of(state: dict, what: str, source: str = "dino") -> ModelConfig:
    """The ViT a plain backbone state dict (minidino keys) describes: width and depth give the arch, the
    patch embedding the patch size, the position embeddings the native size; registers, LayerScale and
    SwiGLU if present; `source` (one of SOURCES) the interpolation rule."""
    from .vit import ARCHS  # the architectures live with the ViT

    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{what} holds no ViT backbone (no cls_token / patch_embed.proj.weight)")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    arch = next((name for name, (d, n, _) in ARCHS.items() if (d, n) == (dim, depth)), None)
    if arch is None:
        raise CheckpointError(f"{what}: no minidino arch is {dim} wide with {depth} blocks")
    patch = state["patch_embed.proj.weight"].shape[-1]
    rope = "rope_embed.periods" in state
    side = 224 // patch if rope else math.isqrt(state["pos_embed"].shape[1] - 1)  # RoPE: DINOv3's 224
    offset, antialias = SOURCES[source]
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = state["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[
        1 if swiglu else 0
    ]
    dinov3 = source == "dinov3"
    return ModelConfig(
        arch=arch,
        patch_size=patch,
        img_size=side * patch,
        drop_path=0.0,
        layerscale=1e-5 if "blocks.0.ls1.gamma" in state else 0.0,  # the loaded gammas replace the value
        n_registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        ffn="swiglu" if swiglu else "mlp",
        ffn_ratio=hidden * (1.5 if swiglu else 1) / dim,  # SwiGLU's hidden width is 2/3 of the ratio's
        interpolate_offset=offset,
        interpolate_antialias=antialias,
        pos_embed="rope" if rope else "learned",
        rope_rescale=2.0 if dinov3 else 0.0,  # dinov3 hub/backbones.py: pos_embed_rope_rescale_coords=2
        norm_eps=1e-5 if dinov3 else 1e-6,  # dinov3 hub/backbones.py: norm_layer="layernormbf16"
        mask_k_bias=dinov3 and _key_bias_is_zero(state),  # dinov3 hub/backbones.py: mask_k_bias=True
        untie_cls_norm="cls_norm.weight" in state,
        untie_local_cls_norm="local_cls_norm.weight" in state,
    )


def _key_bias_is_zero(state: dict) -> bool:
    """Whether every block's key bias is exactly 0: a DINOv3 file whose bias_mask (folded in) masks it."""
    biases = [v for k, v in state.items() if k.endswith(".attn.qkv.bias")]
    return all(not b[b.shape[0] // 3 : 2 * b.shape[0] // 3].any() for b in biases)


def backbone_config(state: dict, path: str, source: str | None = None) -> ModelConfig:
    """The ViT of any file `load_backbone` reads: a minidino run's own model config (no stochastic depth),
    or the architecture and interpolation rule of a backbone file (`source` None: recognised from its keys)."""
    if "config" in state:
        return replace(run_config(state, path).model, drop_path=0.0)
    if source is not None and source not in SOURCES:
        raise CheckpointError(f"source {source!r} of {path}: expected one of {', '.join(SOURCES)}")
    weights = plain_weights(state)
    return model_config_of(minidino_keys(weights), f"checkpoint {path}", source or weights_source(weights))


def load_backbone(path: str, source: str | None = None):
    """The backbone (a `VisionTransformer` in eval mode, architecture read from the file) of a minidino run
    folder or checkpoint, an official DINO backbone or training checkpoint, a DINOv2 hub file (with or
    without registers) or training checkpoint (chunked blocks too) or a timm ViT file. The position table
    is resized by the source's own rule (see the module docstring; `source` overrides the recognised one),
    so the features equal the source model's at any input size."""
    from .vit import VisionTransformer

    state = load_checkpoint(path)
    backbone = VisionTransformer(backbone_config(state, path, source))
    load_model_state(backbone, plain_backbone(state), f"checkpoint {path}")
    return backbone.eval()


def export_backbone(state: dict, path: str, layout: str | None = None) -> str:
    """Write the EMA teacher's backbone of a minidino checkpoint as a plain state dict: 'dinov2' (the keys of
    DINOv2's hub files, mask token included: minidino's own layout), 'timm' (timm's VisionTransformer) or,
    for a RoPE ViT, 'dinov3' (DINOv3's hub files; None: the one that fits the run). Returns a note when the
    code of the layout would compute other features (another resizing rule of the position table: they agree
    at the run's own size only; another LayerNorm epsilon), else ''."""
    weights, model = plain_backbone(state), backbone_config(state, path)
    layout = layout or ("dinov3" if model.pos_embed == "rope" else "dinov2")
    if (layout == "dinov3") != (model.pos_embed == "rope"):
        raise CheckpointError(
            f"--layout {layout}: the run has {model.pos_embed} positions, and only the dinov3 layout holds RoPE "
            "ViTs (dinov2 and timm hold learnt tables)"
        )
    if layout == "dinov3":
        save_checkpoint(to_dinov3(weights, model.mask_k_bias), path)
        if model.norm_eps == 1e-5:
            return ""
        return (
            f"note: DINOv3's ViTs use LayerNorm epsilon 1e-5, this run {model.norm_eps}: build it with that"
        )
    save_checkpoint(to_timm(weights) if layout == "timm" else weights, path)
    source = "timm" if layout == "timm" else "dinov2_reg" if model.n_registers else "dinov2"
    if SOURCES[source] == (model.interpolate_offset, model.interpolate_antialias):
        return ""
    offset, antialias = SOURCES[source]
    return (
        f"note: {path} is read as a {source} file, whose code resizes the position table with offset {offset} "
        f"and antialias {antialias}; this run used offset {model.interpolate_offset} and antialias "
        f"{model.interpolate_antialias}: the features agree at {model.img_size} px, not at other sizes"
    )
