"""Run folders and checkpoints: atomic save, safe load, and export of the backbone as a plain ViT state_dict.

A run folder holds config.json, log.jsonl (one JSON object per logging step), checkpoint.pt, curves.png and
knn.json. A checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(path, weights_only=True)` (no pickled code runs when a file from elsewhere is opened). Its
weights are full tensors keyed by parameter name whatever wrote them, so a run saved by FSDP on N processes
resumes on M processes or in one. Saving writes to a temporary file in the same folder, flushes it to disk,
then renames it over the old one: a crash, a full disk or a Ctrl-C during the save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import time
from dataclasses import replace

import torch

from . import parallel, seeds
from .config import Config, ConfigError, DataConfig, ModelConfig, from_dict, save_json, to_dict
from .dist import is_main, print0
from .visualize import plot_training_curves


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file."""


class RunFolder:
    """The files of one run, written by rank 0 only."""

    def __init__(self, path: str):
        self.path = path
        self.config, self.log, self.checkpoint = (
            os.path.join(path, f) for f in ("config.json", "log.jsonl", "checkpoint.pt")
        )
        self.curves, self.knn = os.path.join(path, "curves.png"), os.path.join(path, "knn.json")
        self.plotted_at = 0.0  # time.monotonic() of the last plot of the curves

    def start(self, resume: bool) -> dict | None:
        """The saved state to continue from (None: start at step 0); a new run refuses a folder that holds a
        checkpoint already."""
        if os.path.exists(self.checkpoint):
            if resume:
                return load_checkpoint(self.checkpoint)
            raise ConfigError(
                f"run folder {self.path} already holds a checkpoint: continue it with --resume "
                f"{self.path}, or choose another --run.out_dir"
            )
        if resume:
            print0(
                f"--resume {self.path}: no checkpoint there yet, so the run starts at step 0 (its config.json)"
            )
        return None

    def begin(self, cfg: Config, step: int) -> None:
        """Write config.json and drop log lines written after `step` (a crashed run may have logged past its
        last checkpoint)."""
        if not is_main():
            return
        os.makedirs(self.path, exist_ok=True)
        save_json(cfg, self.config)
        if os.path.exists(self.log):
            with open(self.log) as fh:
                rows = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
            with open(f"{self.log}.tmp", "w") as fh:  # a temporary file renamed over the log: atomic
                fh.writelines(rows)
            os.replace(f"{self.log}.tmp", self.log)

    def append_log(self, row: dict) -> None:
        if is_main():
            with open(self.log, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def save(self, state: dict, last: bool = False) -> None:
        """Write the checkpoint atomically, and redraw the training curves at most once a minute (a plot
        costs about a second of a small run) and at the last save."""
        if not is_main():
            return
        save_checkpoint(state, self.checkpoint)
        has_rows = os.path.exists(self.log) and os.path.getsize(self.log)
        if has_rows and (last or time.monotonic() - self.plotted_at > 60):
            plot_training_curves(self.log, self.curves)
            self.plotted_at = time.monotonic()

    def write_knn(self, result: dict) -> None:
        if is_main():
            with open(self.knn, "w") as fh:
                json.dump(result, fh, indent=2)


def starting_point(cfg: Config, state: dict | None) -> tuple[Config, dict | None]:
    """What the networks start from: a resumed run's checkpoint, or the file of --run.init_from: a minidino
    run (every weight and the centres: the high-resolution phase) or a backbone file (official DINO, DINOv2,
    timm or an export): then the heads are new, the ViT's architecture is read from the file, and the
    backbone waits --optim.freeze_backbone_epochs while the heads learn. Otherwise that option is 0."""
    if state is not None:
        return cfg, state
    start = load_checkpoint(cfg.run.init_from) if cfg.run.init_from else None
    if start is None or "config" in start:
        return replace(cfg, optim=replace(cfg.optim, freeze_backbone_epochs=0)), start
    found = model_config_of(plain_backbone(start), f"--run.init_from={cfg.run.init_from}")
    arch = {
        k: getattr(found, k) for k in ("arch", "patch_size", "img_size", "layerscale", "n_registers", "ffn")
    }
    n = cfg.optim.freeze_backbone_epochs
    print0(
        f"--run.init_from={cfg.run.init_from}: a {found.arch}/{found.patch_size} backbone; new heads, the "
        f"backbone frozen for {n} epoch{'' if n == 1 else 's'}"
    )
    return replace(cfg, model=replace(cfg.model, **arch)), start


def training_state(
    student, ema_target, optimizer, losses, step: int, epoch: int, cfg: Config, skipped: int
) -> dict:
    """What a checkpoint holds: full weights of the student and of the EMA teacher, the optimiser state, the
    loss centres, where the run is and the RNG states. Gathering FSDP shards is a collective: every process
    calls this; the tensors land on rank 0."""
    return {
        "student": parallel.full_state_dict(student),
        "teacher": parallel.full_state_dict(ema_target),
        "optimizer": parallel.optimizer_state_dict(student, optimizer),
        "losses": losses.centers(),
        "step": step,
        "epoch": epoch,
        "config": to_dict(cfg),
        "skipped_images": skipped,
        "rng": seeds.rng_state(),
    }


def restore_weights(state: dict, student, ema_target, path: str) -> bool:
    """Load a checkpoint's weights into the unwrapped (unsharded) student and EMA teacher: all of them from a
    minidino checkpoint (True), the backbones only from any other file `load_backbone` reads (False: the
    heads are new)."""
    if "config" in state and "student" in state:
        load_model_state(student, state["student"], f"checkpoint {path} (student)")
        load_model_state(ema_target, state["teacher"], f"checkpoint {path} (teacher)")
        return True
    weights = plain_backbone(state)
    for model in (student, ema_target):
        load_model_state(model.backbone, weights, f"checkpoint {path} (backbone)")
    return False


def restore_training(state: dict, student, optimizer) -> tuple[int, int]:
    """Load the optimiser and the RNG states (after wrapping the student for DDP/FSDP); returns (step,
    skipped images). The weights and the centres are loaded apart (also when a run starts from another's)."""
    parallel.load_optimizer_state(student, optimizer, state["optimizer"])
    seeds.set_rng_state(state["rng"])
    return state["step"], state["skipped_images"]


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
    try:  # an official DINO training checkpoint also holds its argparse Namespace: allowed, as plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
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


def run_config(state: dict, path: str) -> Config:
    """The config a minidino checkpoint was trained with; a one-line error for other files."""
    if not isinstance(state, dict) or "config" not in state or "teacher" not in state:
        raise CheckpointError(
            f"checkpoint {path} is not a minidino run checkpoint (no 'config' and 'teacher' entries; a "
            "backbone-only state dict such as an official DINO file?)"
        )
    return from_dict(state["config"])


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


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
    """timm VisionTransformer state_dict (or any plain ViT one) -> minidino ViT state_dict. timm has no iBOT
    mask token: a zero one (minidino's initial value) is added unless the state or `mask_token` has one."""
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
    if mask_token is not None or "mask_token" not in out:
        out["mask_token"] = (
            mask_token if mask_token is not None else torch.zeros(1, out["cls_token"].shape[-1])
        )
    return out


def plain_backbone(state: dict) -> dict:
    """A backbone state dict in minidino's keys from any supported file: a minidino run checkpoint (its EMA
    teacher), an official DINO full training checkpoint ('teacher' with 'backbone.' keys), or a plain ViT
    state dict: official DINO and DINOv2 backbone files, timm ViTs (a classifier head is dropped, a missing
    iBOT mask token becomes a zero one, as minidino initialises it)."""
    if isinstance(state.get("teacher"), dict):  # minidino or DINO: the teacher is the model to keep
        state = {k.removeprefix("module."): v for k, v in state["teacher"].items()}
        return from_timm(backbone_state_dict(state))
    return from_timm(state)


def model_config_of(state: dict, what: str) -> ModelConfig:
    """The ViT a plain backbone state dict describes: width and depth give the arch, the patch embedding
    the patch size, the position embeddings the native size; registers, LayerScale and SwiGLU if present."""
    from .vit import ARCHS  # the architectures live with the ViT

    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{what} holds no ViT backbone (no cls_token / patch_embed.proj.weight)")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    arch = next((name for name, (d, n, _) in ARCHS.items() if (d, n) == (dim, depth)), None)
    if arch is None:
        raise CheckpointError(f"{what}: no minidino arch is {dim} wide with {depth} blocks")
    patch = state["patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    return ModelConfig(
        arch=arch,
        patch_size=patch,
        img_size=side * patch,
        drop_path=0.0,
        layerscale=1e-5 if "blocks.0.ls1.gamma" in state else 0.0,  # the loaded gammas replace the value
        n_registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        ffn="swiglu" if "blocks.0.mlp.w12.weight" in state else "mlp",
    )


def load_backbone(path: str):
    """The backbone (a `VisionTransformer` in eval mode, architecture read from the file) of a minidino run
    folder or checkpoint, an official DINO backbone or full training checkpoint, a DINOv2 hub file (with or
    without registers) or a timm ViT file. Position embeddings interpolate as in the official code, so the
    features equal the official model's at any input size."""
    from .vit import VisionTransformer

    state = load_checkpoint(path)
    weights = plain_backbone(state)
    backbone = VisionTransformer(model_config_of(weights, f"checkpoint {path}"))
    load_model_state(backbone, weights, f"checkpoint {path}")
    return backbone.eval()


def backbone_and_config(path: str, random_init: bool = False) -> tuple[torch.nn.Module, Config]:
    """`load_backbone` plus a config to evaluate it with: a minidino run's teacher with the run's config, any
    other backbone file with the defaults of a 224 px model (eval crops of 224 after resizing to 256, as DINO)
    and no data set (the caller names one). `random_init`: the same architecture at the run's initialisation."""
    from .vit import VisionTransformer

    state = load_checkpoint(path)
    weights = plain_backbone(state)
    if "config" in state:
        cfg = run_config(state, path)
    else:
        cfg = Config(model=model_config_of(weights, f"checkpoint {path}"), data=DataConfig(dataset=""))
    seeds.model_init(cfg.run.seed)
    backbone = VisionTransformer(cfg.model)
    if not random_init:
        load_model_state(backbone, weights, f"checkpoint {path}")
    return backbone.eval(), cfg


def export_backbone(state: dict, path: str, layout: str = "dinov2") -> None:
    """Write the EMA teacher's backbone of a minidino checkpoint as a plain state dict: 'dinov2' (the keys of
    DINOv2's hub files, mask token included: minidino's own layout) or 'timm' (timm's VisionTransformer)."""
    weights = plain_backbone(state)
    save_checkpoint(to_timm(weights) if layout == "timm" else weights, path)
