"""Configuration: plain dataclasses, one per part of the method.

Every field carries a comment (meaning, typical value); `python train.py --help` prints those comments, so
the comments below *are* the documentation of the options. The presets (functions returning a `Config`, each
naming the source of its values) are `minidino/presets.py`; the command line (`--preset NAME
--section.name=value`, type checks, ranges, did-you-mean, `--help`) is `minidino/cli.py`.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad option or value; the message is one line naming the option and what was expected."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_nano (128 wide, 4 blocks), _tiny, _small (384), _base, _large, _giant2
    patch_size: int = 16  # side of a square patch in pixels (16 for ImageNet, 4 for 32 px images)
    img_size: int = 224  # crop size the position embeddings are created for; other sizes interpolate
    drop_path: float = 0.1  # stochastic depth rate (DINO ViT-S: 0.1)
    drop_path_schedule: str = "linear"  # how the rate grows with depth: linear (0 -> drop_path) or uniform
    drop_path_impl: str = "mask"  # mask (classic), subset (branch on kept samples), subset_triton (fused add)
    pos_embed_init: str = "random"  # random (trunc. normal, DINO) or sincos (2-D sin-cos start, small data)
    attn_impl: str = "sdpa"  # sdpa (torch), triton (kernels/attention.py), ref, or auto (triton on CUDA)
    pack_crops: bool = False  # all crop sizes through the blocks as one packed batch (varlen attention)
    bf16_residual: bool = False  # under bf16 autocast (GPU): tokens, norm outputs, residual adds in bf16
    layerscale: float = 0.0  # LayerScale init (DINOv2: 1e-5); 0 disables LayerScale
    n_registers: int = 0  # register tokens (Darcet et al. 2023, arXiv 2309.16588); DINOv2 uses 4
    ffn: str = "mlp"  # feed-forward type: mlp (GELU) or swiglu (DINOv2's largest models)
    interpolate_offset: float = 0.1  # position table to h x w: scale (h + offset) / n (DINO); 0: size (h, w)
    interpolate_antialias: bool = False  # antialiased bicubic resize (DINOv2 register models, timm)
    pos_embed: str = "learned"  # learned (a table: DINO, DINOv2) or rope (rotary q, k: DINOv3, rope.py)
    rope_base: float = 100.0  # RoPE periods base^(2k / (D/2)) (DINOv3: 100)
    rope_min_period: float = 0.0  # RoPE periods from min to max period instead of the base (0: the base)
    rope_max_period: float = 0.0  # see rope_min_period
    rope_normalize: str = "separate"  # RoPE coordinates over each side (separate), the shorter (min), longer
    rope_shift: float = 0.0  # training: add U(-s, s) to RoPE coordinates, per axis (0: off)
    rope_jitter: float = 0.0  # training: scale RoPE coordinates by log-U(1/j, j) per axis (0: off)
    rope_rescale: float = 0.0  # training: scale RoPE coordinates by log-U(1/r, r) (DINOv3 models: 2; 0: off)
    mask_k_bias: bool = False  # the key part of the qkv bias held at 0 (DINOv3: with RoPE it would matter)
    norm_eps: float = 1e-6  # LayerNorm epsilon (DINO, DINOv2: 1e-6; DINOv3's released ViTs: 1e-5)
    ffn_ratio: float = 4.0  # feed-forward hidden width / embed dim (DINOv3 ViT-S+/16 SwiGLU: 6)
    untie_cls_norm: bool = False  # the final norm of CLS and registers apart from the patches' (DINOv3)
    untie_local_cls_norm: bool = False  # local crops' CLS through their own final norm (DINOv3 7B recipe)


@dataclass
class HeadConfig:
    out_dim: int = 65536  # K, number of prototypes (65536 on ImageNet); 0: chosen from the data size
    hidden_dim: int = 2048  # width of the head's MLP
    bottleneck_dim: int = 256  # output of the MLP, L2-normalised before the prototypes
    n_layers: int = 3  # MLP layers before the bottleneck output (DINO: 3)
    norm_last_layer: bool = True  # fix the prototype norms to 1 (more stable; False can help ViT-S)
    weight_norm: bool = True  # weight-normalised prototypes (DINO, DINOv2); False: plain linear (DINOv3)
    use_bn: bool = False  # BatchNorm in the head's MLP (official option; helps tiny models resist collapse)
    ibot_separate_head: bool = False  # iBOT patches through their own head (DINOv2 big runs)
    ibot_out_dim: int = 0  # prototypes of that separate iBOT head; 0: the DINO head's K
    ibot_bottleneck_dim: int = 0  # bottleneck of that separate iBOT head; 0: the DINO head's


@dataclass
class LossConfig:
    student_temp: float = 0.1  # tau_s, student softmax temperature
    teacher_temp: float = 0.07  # tau_t after warm-up; 0: chosen from the data size
    warmup_teacher_temp: float = 0.04  # tau_t at step 0
    warmup_teacher_temp_epochs: int = 30  # epochs of linear tau_t warm-up
    center_momentum: float = 0.9  # m in c <- m c + (1 - m) mean(g_t)
    centering: str = "center"  # teacher targets: center (DINO, DINOv2 yaml), sinkhorn (DINOv2 /14), none
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations (DINOv2: 3)
    dino_weight: float = 1.0  # weight of the DINO CLS loss
    local_weight: float = 1.0  # weight of the local crops' DINO pairs, the global ones' 1 (DINOv3: 0.5)
    fused_dino_loss: bool = False  # the DINO loss in closed form per student crop (equal; less memory)
    ibot_weight: float = 0.0  # weight of the iBOT masked-patch loss (DINOv2: 1.0; 0 disables masking)
    koleo_weight: float = 0.0  # KoLeo on student CLS features, per global crop, summed (DINOv2: 0.1)
    koleo_group: int = 0  # KoLeo's neighbours: groups of this many images of the global batch; 0: all of it
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: range of the per-image mask ratio
    mask_probability: float = 0.5  # iBOT: share of a batch's global crops that are masked (exactly)


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes (embedded), imagefolder, folder (unlabelled), cifar10, cifar100, stl10
    root: str = ""  # data directory (unused by shapes); for folder also a file list (minidino.curation)
    image_size: int = 32  # side of the shapes images; with augment=batch, the size images are resized to
    augment: str = "crops"  # crops (uint8 crops in workers, colour on the device), batch (equal-size), pil
    n_train: int = 4000  # embedded shapes: number of training images
    n_test: int = 1000  # embedded shapes: number of held-out images
    global_crops_size: int = 224  # side of the 2 global crops
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area range of a global crop (DINO: 0.4-1)
    local_crops_number: int = 10  # number of local crops (0 disables multi-crop)
    local_crops_size: int = 96  # side of a local crop
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area range of a local crop
    hue: float = 0.1  # max hue shift of the colour jitter (papers: 0.1; 0.5 makes colour useless as a cue)
    eval_size: int = 224  # side of the centre crop that evaluation sees
    eval_crop_ratio: float = 0.875  # evaluation resizes to eval_size / ratio first (DINO: 256 -> 224); 1: all
    num_workers: int = 2  # DataLoader worker processes


@dataclass
class OptimConfig:
    epochs: int = 100  # epochs of training: passes over the training set, or of epoch_steps steps each
    epoch_steps: int = 0  # steps per epoch of the schedules (DINOv2: 1250); 0: one pass over the data
    batch_size: int = 64  # images per optimiser step, all processes together (the global batch)
    accum_steps: int = 1  # micro-batches per process and step (gradient accumulation; 1: none)
    lr: float = 5e-4  # base lr, for a batch of 256 (linear rule) or 1024 (sqrt rule): see lr_scaling
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    warmup_epochs: int = 10  # epochs of linear lr warm-up
    weight_decay: float = 0.04  # weight decay at step 0 (cosine schedule)
    weight_decay_end: float = 0.4  # weight decay at the last step
    momentum_teacher: float = 0.996  # EMA momentum at step 0, cosine-increased to 1
    lr_scaling: str = "linear"  # linear: lr x batch/256 (DINO); sqrt: lr x sqrt(batch/1024) (DINOv2)
    schedule: str = "cosine"  # cosine (DINO, DINOv2); constant: lr, wd, momentum flat after warm-up (DINOv3)
    layer_decay: float = 1.0  # layer-wise lr decay: block i of L gets lr x decay^(L + 1 - i) (DINOv2: 0.9)
    patch_embed_lr_mult: float = 1.0  # extra lr factor of the patch embedding (DINOv2: 0.2)
    clip_grad: float = 3.0  # max gradient norm (0 disables)
    fused: bool = False  # fused AdamW, lr etc. on the device; a NaN loss skips the update, seen when logged
    clip_mode: str = "tensor"  # tensor: each tensor's norm apart (DINO); part: backbone, heads (DINOv2)
    freeze_last_layer: int = 1  # epochs during which the prototype layer gets no update
    freeze_backbone_epochs: int = 1  # with --run.init_from a backbone file: epochs the new heads train alone


@dataclass
class GramConfig:
    weight: float = 0.0  # Gram anchoring loss weight (DINOv3 Sec. 4; its anchoring phase: up to 2); 0: off
    start_epoch: int = 0  # the Gram teacher is copied from the EMA teacher here, and the loss starts
    refresh_every: int = 0  # epochs between later copies (DINOv3: 10 of its 1000-step epochs); 0: none
    max_refreshes: int = 3  # later copies at most (DINOv3: 3)
    img_level: bool = True  # Gram matrix per image (DINOv3 anchoring) or of all patches of the batch
    remove_neg: bool = False  # negative similarities set to 0 in both Gram matrices
    remove_only_teacher_neg: bool = False  # negative similarities set to 0 in the teacher's only
    teacher_size: int = 0  # Gram teacher sees the global crops resized to this side (DINOv3: 2x); 0: same
    resize_antialias: bool = False  # antialias when its patch features are resized to the student's grid


@dataclass
class RunConfig:
    out_dir: str = "runs/shapes"  # run folder: config.json, log.jsonl, checkpoint.pt, plots
    seed: int = 0  # seeds model init, data order and augmentations
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    log_every: int = 10  # steps between log.jsonl lines
    max_steps: int = 0  # stop after this many steps in total (0: train all epochs)
    minutes: float = 0.0  # fit the run (training + final k-NN) to this wall time: time_budget.py (0: off)
    knn_k: int = 20  # k of the weighted k-NN printed at the end (DINO: 20)
    knn_every: int = 0  # epochs between k-NN evaluations logged in log.jsonl (0: only at the end)
    distill_from: str = ""  # distillation: run folder/checkpoint of a frozen larger teacher (DINOv2 Sec. 5)
    init_from: str = ""  # start student, teacher and centres from this run or checkpoint (new schedules)
    eval_at_end: bool = True  # print k-NN of the trained and of a random-init model at the end
    parallel: str = "none"  # under torchrun: ddp (replicas) or fsdp (FSDP2 shards); none for one process
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (memory)
    compile: bool = False  # torch.compile each transformer block and the colour jitter of augment=crops
    compile_step: bool = False  # torch.compile student and teacher whole (heads included) and the losses
    cuda_graphs: bool = False  # with compile_step: replay them as CUDA graphs (iBOT masks padded to a bound)


@dataclass
class Config:
    method: str = "dino"  # training method: dino, dinov2 or dinov3 (sets their defaults before other options)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------------------
# Flat views and files


def sections(cfg: Config):
    """Yield (prefix, dataclass instance): '' for the top level, then 'model', 'head', ..."""
    yield "", cfg
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            yield f.name, getattr(cfg, f.name)


def options(cfg: Config) -> dict[str, tuple[object, str, type]]:
    """Every option as 'section.name' ('name' at the top level) -> (the section instance, field name, type)."""
    out = {}
    for prefix, obj in sections(cfg):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if not dataclasses.is_dataclass(getattr(obj, f.name)):
                out[f"{prefix}.{f.name}" if prefix else f.name] = (obj, f.name, hints[f.name])
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json); keys it lacks keep their defaults."""
    cfg = Config()
    if "batch_augment" in d.get("data", {}):  # config.json of a run made before --data.augment
        d = {**d, "data": {**d["data"], "augment": "batch" if d["data"]["batch_augment"] else "pil"}}
    for key, (obj, name, typ) in options(cfg).items():
        section, _, _ = key.rpartition(".")
        src = d.get(section, {}) if section else d
        if name in src:
            setattr(obj, name, tuple(src[name]) if typing.get_origin(typ) is tuple else src[name])
    return cfg


def save_json(cfg: Config, path: str) -> None:
    """Write the config as JSON atomically (a temporary file renamed over the old one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(to_dict(cfg), fh, indent=2)
    os.replace(tmp, path)
