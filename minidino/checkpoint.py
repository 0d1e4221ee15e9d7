"""Run folders and checkpoints: what a run saves, what it resumes from, what it starts from.

A run folder holds config.json, log.jsonl (one JSON object per logging step), checkpoint.pt, curves.png and
knn.json. A checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(path, weights_only=True)` (no pickled code runs when a file from elsewhere is opened). Its
weights are full tensors keyed by parameter name whatever wrote them, so a run saved by FSDP on N processes
resumes on M processes or in one. Saving writes to a temporary file in the same folder, flushes it to disk,
then renames it over the old one: a crash, a full disk or a Ctrl-C during the save leaves the previous
checkpoint intact. Reading and writing weight files of every layout is `minidino/weights.py`.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import torch

from . import parallel, seeds
from .config import Config, ConfigError, DataConfig, save_json, to_dict
from .dist import is_main, print0
from .visualize import plot_training_curves
from .weights import (
    backbone_config,
    load_checkpoint,
    load_model_state,
    plain_backbone,
    run_config,
    save_checkpoint,
)


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
    timm or an export): then the heads are new, the ViT's architecture and its source's interpolation rule
    are read from the file, and the backbone waits --optim.freeze_backbone_epochs while the heads learn.
    Otherwise that option is 0."""
    if state is not None:
        return cfg, state
    start = load_checkpoint(cfg.run.init_from) if cfg.run.init_from else None
    if start is None or "config" in start:
        return replace(cfg, optim=replace(cfg.optim, freeze_backbone_epochs=0)), start
    found = backbone_config(start, f"--run.init_from={cfg.run.init_from}")
    n = cfg.optim.freeze_backbone_epochs
    print0(
        f"--run.init_from={cfg.run.init_from}: a {found.arch}/{found.patch_size} backbone; new heads, the "
        f"backbone frozen for {n} epoch{'' if n == 1 else 's'}"
    )
    return replace(cfg, model=replace(cfg.model, **{k: getattr(found, k) for k in FILE_FIELDS})), start


def adopt_backbone_file(cfg: Config, explicit: set[str]) -> tuple[Config, str]:
    """The config with the architecture of the backbone file in --run.init_from (a minidino run: unchanged)
    and, when its patch differs from the preset's, the crop and evaluation sides rounded to whole patches of
    it, as DINOv2 moved from 224 / 96 px at /16 to 224 / 98 px at /14 (ssl_default_config.yaml ->
    vitl14.yaml). `explicit`: the options named on the command line; one of the file's own fields set there
    to another value is an error. Returns (config, a line saying what was adopted, or '')."""
    path = cfg.run.init_from
    state = load_checkpoint(path, mmap=True)  # a look at the shapes: nothing is read into memory
    if "config" in state:
        return cfg, ""
    found = backbone_config(state, f"--run.init_from={path}")
    for field in FILE_FIELDS:
        if field == "rope_rescale":  # training only (DINOv3's 2 by default): the command line may change it
            continue
        if f"model.{field}" in explicit and getattr(cfg.model, field) != getattr(found, field):
            raise ConfigError(
                f"option --model.{field}={getattr(cfg.model, field)} contradicts --run.init_from={path}, "
                f"whose backbone has {field} {getattr(found, field)}: leave the option out"
            )
    patch, old = found.patch_size, cfg.model.patch_size
    cfg = replace(cfg, model=replace(cfg.model, **{k: getattr(found, k) for k in FILE_FIELDS}))
    if patch == old:
        return cfg, ""
    sides = {}
    for key in ("global_crops_size", "local_crops_size", "eval_size"):
        if f"data.{key}" not in explicit:
            sides[key] = max(patch, round(getattr(cfg.data, key) / patch) * patch)
    cfg = replace(cfg, data=replace(cfg.data, **sides))
    d = cfg.data
    return cfg, (
        f"--run.init_from={path}: patch {patch} (the preset's {old}), so crops {d.global_crops_size} / "
        f"{d.local_crops_size} px and evaluation at {d.eval_size} px, in whole patches"
    )


FILE_FIELDS = (  # what a backbone file decides about the model (the rest stays the run's: drop path, kernels)
    "arch",
    "patch_size",
    "img_size",
    "layerscale",
    "n_registers",
    "ffn",
    "interpolate_offset",
    "interpolate_antialias",
    "pos_embed",
    "rope_base",
    "rope_rescale",
    "norm_eps",
    "mask_k_bias",
    "ffn_ratio",
    "untie_cls_norm",
    "untie_local_cls_norm",
)


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
    heads are new). A position table of another grid (the high-resolution phase starts from a run at a
    lower resolution) is resized once, by the backbone's own interpolation rule: the model then computes
    at the new size what the old one computed by resizing on every forward."""
    if "config" in state and "student" in state:
        for model, part in ((student, "student"), (ema_target, "teacher")):
            weights = _fitted(model.backbone, state[part], "backbone.pos_embed")
            load_model_state(model, weights, f"checkpoint {path} ({part})")
        return True
    weights = plain_backbone(state)
    for model in (student, ema_target):
        load_model_state(model.backbone, _fitted(model.backbone, weights), f"checkpoint {path} (backbone)")
    return False


def _fitted(backbone, weights: dict, key: str = "pos_embed") -> dict:
    """`weights` with its position table (if it has one: a RoPE ViT has none) fitted to `backbone`'s grid."""
    return {**weights, key: backbone.fit_pos_embed(weights[key])} if key in weights else weights


def restore_training(state: dict, student, optimizer) -> tuple[int, int]:
    """Load the optimiser and the RNG states (after wrapping the student for DDP/FSDP); returns (step,
    skipped images). The weights and the centres are loaded apart (also when a run starts from another's)."""
    parallel.load_optimizer_state(student, optimizer, state["optimizer"])
    seeds.set_rng_state(state["rng"])
    return state["step"], state["skipped_images"]


def backbone_and_config(
    path: str, random_init: bool = False, source: str | None = None
) -> tuple[torch.nn.Module, Config]:
    """`load_backbone` plus a config to evaluate it with: a minidino run's teacher with the run's config, any
    other backbone file with the defaults of a 224 px model (eval crops of 224 after resizing to 256, as DINO)
    and no data set (the caller names one). `random_init`: the same architecture at the run's initialisation;
    `source`: the file's source (weights.SOURCES) when its keys do not tell it."""
    from .vit import VisionTransformer

    state = load_checkpoint(path)
    if "config" in state:
        cfg = run_config(state, path)
    else:
        cfg = Config(model=backbone_config(state, path, source), data=DataConfig(dataset=""))
    seeds.model_init(cfg.run.seed)
    backbone = VisionTransformer(cfg.model)
    if not random_init:
        load_model_state(backbone, plain_backbone(state), f"checkpoint {path}")
    return backbone.eval(), cfg
