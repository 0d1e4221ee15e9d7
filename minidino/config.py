"""Configuration: plain dataclasses, presets as functions, and a `--key=value` command line.

Every field carries a comment (meaning, typical value); `python train.py --help` prints those comments, so
the comments below *are* the documentation of the options.

Presets (functions returning a `Config`):
  shapes    the default: embedded synthetic shapes, a tiny ViT, minutes on a laptop CPU
  cifar10   CIFAR-10 (32x32), ViT with patch 4, 2x32 px global + local 16 px crops
  imagenet  the DINO paper's ViT-S/16 recipe (Caron et al. 2021, arXiv 2104.14294, Sec. 4 and App. B)

Command line: `python train.py --preset cifar10 --optim.epochs=50 --data.root=data/cifar10`.
Values are parsed and type-checked against the field's annotation; an unknown key names the closest ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_nano (128 wide, 4 blocks), vit_tiny (192), vit_small (384), _base, _large
    patch_size: int = 16  # side of a square patch in pixels (16 for ImageNet, 4 for 32 px images)
    img_size: int = 224  # crop size the position embeddings are created for; other sizes interpolate
    drop_path: float = 0.1  # stochastic depth rate (DINO ViT-S: 0.1)
    drop_path_schedule: str = "linear"  # how the rate grows with depth: linear (0 -> drop_path) or uniform
    drop_path_impl: str = "mask"  # mask (classic), subset (branch on kept samples), subset_triton (fused add)
    pos_embed_init: str = "random"  # random (trunc. normal, DINO) or sincos (2-D sin-cos start, small data)
    attn_impl: str = "sdpa"  # sdpa (torch), triton (kernels/attention.py), ref, or auto (triton on CUDA)
    pack_crops: bool = False  # all crop sizes through the blocks as one packed batch (varlen attention)
    layerscale: float = 0.0  # LayerScale init (DINOv2: 1e-5); 0 disables LayerScale
    n_registers: int = 0  # register tokens (Darcet et al. 2023, arXiv 2309.16588); DINOv2 uses 4
    ffn: str = "mlp"  # feed-forward type: mlp (GELU) or swiglu (DINOv2's largest models)


@dataclass
class HeadConfig:
    out_dim: int = 65536  # K, number of prototypes (65536 on ImageNet); 0: chosen from the data size
    hidden_dim: int = 2048  # width of the head's MLP
    bottleneck_dim: int = 256  # output of the MLP, L2-normalised before the prototypes
    n_layers: int = 3  # MLP layers before the bottleneck output (DINO: 3)
    norm_last_layer: bool = True  # fix the prototype norms to 1 (more stable; False can help ViT-S)
    use_bn: bool = False  # BatchNorm in the head's MLP (official option; helps tiny models resist collapse)
    ibot_separate_head: bool = False  # iBOT patches through their own head (DINOv2 big runs)


@dataclass
class LossConfig:
    student_temp: float = 0.1  # tau_s, student softmax temperature
    teacher_temp: float = 0.07  # tau_t after warm-up; 0: chosen from the data size
    warmup_teacher_temp: float = 0.04  # tau_t at step 0
    warmup_teacher_temp_epochs: int = 30  # epochs of linear tau_t warm-up
    center_momentum: float = 0.9  # m in c <- m c + (1 - m) mean(g_t)
    centering: str = "center"  # teacher targets: center (EMA, DINO), sinkhorn (DINOv2) or none (ablation)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations (DINOv2: 3)
    dino_weight: float = 1.0  # weight of the DINO CLS loss
    ibot_weight: float = 0.0  # weight of the iBOT masked-patch loss (DINOv2: 1.0; 0 disables masking)
    koleo_weight: float = 0.0  # weight of the KoLeo regulariser on student CLS features (DINOv2: 0.1)
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: range of the per-image mask ratio
    mask_probability: float = 0.5  # iBOT: share of global crops that are masked


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes (embedded), imagefolder, folder (unlabelled), cifar10, cifar100, stl10
    root: str = ""  # data directory (unused by shapes)
    image_size: int = 32  # side of the shapes images; with batch_augment, the size images are resized to
    batch_augment: bool = False  # augment whole batches on the training device (equal-size images only)
    n_train: int = 4000  # embedded shapes: number of training images
    n_test: int = 1000  # embedded shapes: number of held-out images
    global_crops_size: int = 224  # side of the 2 global crops
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area range of a global crop (DINO: 0.4-1)
    local_crops_number: int = 10  # number of local crops (0 disables multi-crop)
    local_crops_size: int = 96  # side of a local crop
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area range of a local crop
    hue: float = 0.1  # max hue shift of the colour jitter (papers: 0.1; 0.5 makes colour useless as a cue)
    highres_epochs: int = 0  # DINOv2's high-resolution phase: the last N epochs use larger crops (0: off)
    highres_scale: float = 2.0  # crop sides are multiplied by this during the high-resolution phase
    eval_size: int = 224  # images are resized (short side) and centre-cropped to this for evaluation
    num_workers: int = 2  # DataLoader worker processes


@dataclass
class OptimConfig:
    epochs: int = 100  # passes over the training set
    batch_size: int = 64  # images per step (per process)
    lr: float = 5e-4  # peak learning rate for a batch of 256; scaled linearly with the batch size
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    warmup_epochs: int = 10  # epochs of linear lr warm-up
    weight_decay: float = 0.04  # weight decay at step 0 (cosine schedule)
    weight_decay_end: float = 0.4  # weight decay at the last step
    momentum_teacher: float = 0.996  # EMA momentum at step 0, cosine-increased to 1
    lr_scaling: str = "linear"  # linear: lr x batch/256 (DINO); sqrt: lr x sqrt(batch/1024) (DINOv2)
    layer_decay: float = 1.0  # layer-wise lr decay: block i of L gets lr x decay^(L + 1 - i) (DINOv2: 0.9)
    patch_embed_lr_mult: float = 1.0  # extra lr factor of the patch embedding (DINOv2: 0.2)
    clip_grad: float = 3.0  # max gradient norm per parameter tensor's module (0 disables)
    freeze_last_layer: int = 1  # epochs during which the prototype layer gets no update


@dataclass
class RunConfig:
    out_dir: str = "runs/shapes"  # run folder: config.json, log.jsonl, checkpoint.pt, plots
    seed: int = 0  # seeds model init, data order and augmentations
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    log_every: int = 10  # steps between log.jsonl lines
    max_steps: int = 0  # stop after this many steps in total (0: train all epochs)
    knn_k: int = 20  # k of the weighted k-NN printed at the end (DINO: 20)
    knn_every: int = 0  # epochs between k-NN evaluations logged in log.jsonl (0: only at the end)
    distill_from: str = ""  # distillation: run folder/checkpoint of a frozen larger teacher (DINOv2 Sec. 5)
    eval_at_end: bool = True  # print k-NN of the trained and of a random-init model at the end
    parallel: str = "none"  # under torchrun: ddp (replicas) or fsdp (FSDP2 shards); none for one process
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (memory)
    compile: bool = False  # torch.compile each transformer block


@dataclass
class Config:
    method: str = "dino"  # training method: dino, or dinov2 (sets DINOv2's defaults before other options)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------------------
# Presets


def shapes() -> Config:
    """Embedded shapes data, sized to train in under 10 minutes on a 2-core CPU."""
    c = Config()
    # Patch 8: a 32 px crop is 4 x 4 patches (2 x 2 for a 16 px local crop), so 25 epochs fit the budget.
    c.model = ModelConfig(arch="vit_nano", patch_size=8, img_size=32, drop_path=0.0, pos_embed_init="sincos")
    # Small data wants few prototypes and a cool teacher (PAPERS.md: ~1024 prototypes below 20k images).
    c.head = HeadConfig(out_dim=1024, hidden_dim=512, bottleneck_dim=128, use_bn=True)
    # KoLeo (DINOv2's regulariser, 0.1 as there) spreads the CLS features of a batch: on this data it is what
    # turns DINO's features into good k-NN neighbours (README, Results: 26% without it, 66% with it).
    c.loss = LossConfig(teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0)
    c.loss.koleo_weight = 0.1
    c.data = DataConfig(
        dataset="shapes",
        image_size=32,
        global_crops_size=32,
        local_crops_size=16,
        local_crops_number=4,
        global_crops_scale=(0.4, 1.0),
        local_crops_scale=(0.1, 0.4),
        eval_size=32,
        batch_augment=True,
        hue=0.5,
        num_workers=0,
    )
    c.optim = OptimConfig(epochs=25, batch_size=64, lr=1e-3, warmup_epochs=1, momentum_teacher=0.99)
    c.run = RunConfig(out_dir="runs/shapes", log_every=10, knn_every=5)
    return c


def cifar10() -> Config:
    """CIFAR-10 at its native 32 px; `--data.root` points at the extracted data."""
    c = shapes()
    c.data = DataConfig(
        dataset="cifar10",
        root="data/cifar10",
        global_crops_size=32,
        local_crops_size=16,
        local_crops_number=6,
        global_crops_scale=(0.3, 1.0),
        local_crops_scale=(0.1, 0.3),
        eval_size=32,
        num_workers=4,
        batch_augment=True,
    )
    c.model = ModelConfig(arch="vit_small", patch_size=4, img_size=32, drop_path=0.1)
    c.head = HeadConfig(out_dim=4096, hidden_dim=2048, bottleneck_dim=256)
    c.loss = LossConfig(teacher_temp=0.05, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30)
    c.optim = OptimConfig(epochs=200, batch_size=256, lr=5e-4, warmup_epochs=10, momentum_teacher=0.996)
    c.run.out_dir = "runs/cifar10"
    return c


def imagenet() -> Config:
    """DINO ViT-S/16 on ImageNet (paper Sec. 4.1 and App. B); the default dataclass values are this recipe."""
    c = Config()
    c.model = ModelConfig(arch="vit_small", patch_size=16, img_size=224, drop_path=0.1)
    c.data = DataConfig(dataset="imagefolder", root="data/imagenet", num_workers=10)
    c.optim = OptimConfig(batch_size=64)  # 64 per GPU x 16 GPUs = 1024 in the paper
    c.run.out_dir = "runs/imagenet"
    return c


def size_for_data(c: Config, n_images: int) -> list[str]:
    """Fill the options left at 0 ("auto") from the number of training images; return what was chosen.

    Rule: K = 2^round(log2(n / 16)) clamped to [256, 65536], about one prototype per 16 images (1024 at 20k
    images as PAPERS.md's small-scale notes advise, 65536 at ImageNet's 1.28M as in DINO), and tau_t = 0.04
    below 50k images, else 0.07. With few images, many prototypes and a soft teacher give near-uniform
    targets that drift into collapse.
    """
    chosen = []
    if c.head.out_dim == 0:
        c.head.out_dim = int(min(65536, max(256, 2 ** round(math.log2(max(n_images, 1) / 16)))))
        chosen.append(f"--head.out_dim={c.head.out_dim}")
    if c.loss.teacher_temp == 0:
        c.loss.teacher_temp = 0.04 if n_images < 50_000 else 0.07
        c.loss.warmup_teacher_temp = min(c.loss.warmup_teacher_temp, c.loss.teacher_temp)
        chosen.append(f"--loss.teacher_temp={c.loss.teacher_temp}")
    return chosen


def dinov2(c: Config) -> Config:
    """DINOv2's changes to a DINO config (Oquab et al. 2023, arXiv 2304.07193, Sec. 4-5 and App. B):
    iBOT + Sinkhorn-Knopp + KoLeo, LayerScale, crops 0.32-1 / 0.05-0.32, momentum 0.992, layer-wise lr decay
    0.9, patch-embedding lr x 0.2, lr 4e-3 per 1024 images with the square-root rule. Small presets keep their
    sizes (crop pixels, prototype count, teacher temperature) and take the rest."""
    c.method = "dinov2"
    c.loss.centering, c.loss.ibot_weight, c.loss.koleo_weight = "sinkhorn", 1.0, 0.1
    c.model.layerscale = 1e-5
    c.data.global_crops_scale, c.data.local_crops_scale = (0.32, 1.0), (0.05, 0.32)
    c.optim.momentum_teacher = 0.992
    c.optim.layer_decay, c.optim.patch_embed_lr_mult = 0.9, 0.2
    if c.data.dataset == "imagefolder":  # the paper's ImageNet scale
        c.data.local_crops_number = 8
        c.optim.lr, c.optim.lr_scaling = 4e-3, "sqrt"
        c.model.drop_path, c.model.drop_path_schedule = 0.3, "uniform"
    return c


PRESETS: dict[str, typing.Callable[[], Config]] = {"shapes": shapes, "cifar10": cifar10, "imagenet": imagenet}


# ----------------------------------------------------------------------------------------------------------
# Flat views, parsing and the command line


class ConfigError(ValueError):
    """A bad option or value; the message is one line naming the option and what was expected."""


def _sections(cfg: Config):
    """Yield (prefix, dataclass instance): '' for the top level, then 'model', 'head', ..."""
    yield "", cfg
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield f.name, value


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source: the help text of the option."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def flat_fields(cfg: Config) -> dict[str, tuple[object, dataclasses.Field, type, str]]:
    """Map 'section.name' (or 'name' at top level) -> (owner instance, field, type, comment)."""
    out = {}
    for prefix, obj in _sections(cfg):
        hints = typing.get_type_hints(type(obj))
        comments = _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            out[key] = (obj, f, hints[f.name], comments.get(f.name, ""))
    return out


def parse_value(key: str, text: str, typ: type) -> object:
    """Parse `text` as `typ` (bool, int, float, str, tuple[float, float]); ConfigError if it does not fit."""
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(typ) is tuple:
            args = typing.get_args(typ)
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            if len(parts) != len(args):
                raise ValueError
            return tuple(a(p) for a, p in zip(args, parts))
        if typ is int and not re.fullmatch(r"[+-]?\d+", text.strip()):
            raise ValueError
        return typ(text)
    except ValueError:
        expected = typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", "")
        raise ConfigError(f"option --{key}: expected {expected}, got {text!r}") from None


def set_option(cfg: Config, key: str, text: str) -> None:
    """Set one `section.name` option from its text form, with type checking and a did-you-mean error."""
    fields = flat_fields(cfg)
    by_name = [k for k in fields if k.split(".")[-1] == key]
    if key not in fields and len(by_name) == 1:  # a unique field name needs no section: --parallel=fsdp
        key = by_name[0]
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
        # also match on the last component, so --epochs suggests optim.epochs
        close += [k for k in fields if k.split(".")[-1] == key.split(".")[-1] and k not in close]
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
        raise ConfigError(f"unknown option --{key}{hint}")
    obj, f, typ, _ = fields[key]
    setattr(obj, f.name, parse_value(key, text, typ))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json); unknown keys are an error."""
    cfg = Config()
    for key, (obj, f, typ, _) in flat_fields(cfg).items():
        section, _, name = key.rpartition(".")
        src = d.get(section, {}) if section else d
        if name in src:
            value = src[name]
            setattr(obj, f.name, tuple(value) if typing.get_origin(typ) is tuple else value)
    return cfg


def save_json(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(to_dict(cfg), fh, indent=2)


def help_text(cfg: Config) -> str:
    lines = [
        "usage: python train.py [--preset NAME] [--resume RUN_DIR] [--key=value ...]",
        "",
        f"presets: {', '.join(PRESETS)} (default shapes); values shown are the chosen preset's",
        "",
    ]
    options = [
        (f"  --{key}={getattr(obj, f.name)}", comment)
        for key, (obj, f, _, comment) in flat_fields(cfg).items()
    ]
    width = max(len(option) for option, _ in options) + 2
    return "\n".join(lines + [option.ljust(width) + comment for option, comment in options])


def parse_args(argv: list[str]) -> tuple[Config, str | None, bool]:
    """Parse the command line into (config, resume_dir, wants_help).

    `--preset NAME` picks the starting point (default shapes); `--resume RUN_DIR` starts from that run's
    config.json instead; every `--section.name=value` (or `--section.name value`) then overrides a field.
    """
    preset, resume, wants_help, pairs = "shapes", None, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = True
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"option --{key} needs a value (--{key}=VALUE)")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "preset":
            preset = value
        elif key == "resume":
            resume = value
        else:
            pairs.append((key, value))
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}{hint}")
    if resume is not None:
        path = f"{resume}/config.json"
        try:
            with open(path) as fh:
                cfg = from_dict(json.load(fh))
        except FileNotFoundError:
            raise ConfigError(f"--resume {resume}: no config.json there (is it a run folder?)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--resume {resume}: {path} is not valid JSON ({e})") from None
    else:
        cfg = PRESETS[preset]()
        if ("method", "dinov2") in pairs:  # the method's defaults first, so explicit options win
            dinov2(cfg)
    for key, value in pairs:
        set_option(cfg, key, value)
    validate(cfg)
    return cfg, resume, wants_help


def validate(cfg: Config) -> None:
    """Cross-field checks with one-line messages naming the option."""
    choices = {
        "method": ("dino", "dinov2"),
        "model.arch": ("vit_nano", "vit_tiny", "vit_small", "vit_base", "vit_large"),
        "model.attn_impl": ("auto", "triton", "sdpa", "ref"),
        "model.drop_path_schedule": ("linear", "uniform"),
        "model.ffn": ("mlp", "swiglu"),
        "model.pos_embed_init": ("random", "sincos"),
        "model.drop_path_impl": ("mask", "subset", "subset_triton"),
        "loss.centering": ("center", "sinkhorn", "none"),
        "optim.lr_scaling": ("linear", "sqrt"),
        "data.dataset": ("shapes", "imagefolder", "folder", "cifar10", "cifar100", "stl10"),
        "run.device": ("auto", "cpu", "cuda"),
        "run.parallel": ("none", "ddp", "fsdp"),
    }
    fields = flat_fields(cfg)
    for key, allowed in choices.items():
        obj, f, _, _ = fields[key]
        if getattr(obj, f.name) not in allowed:
            raise ConfigError(
                f"option --{key}: expected one of {', '.join(allowed)}, got {getattr(obj, f.name)!r}"
            )
    for key in ("data.global_crops_size", "data.local_crops_size"):
        obj, f, _, _ = fields[key]
        if getattr(obj, f.name) % cfg.model.patch_size:
            raise ConfigError(
                f"option --{key}={getattr(obj, f.name)} must be a multiple of --model.patch_size="
                f"{cfg.model.patch_size}"
            )
    for key in ("data.global_crops_scale", "data.local_crops_scale"):
        lo, hi = fields[key][0].__dict__[fields[key][1].name]
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"option --{key}: expected 0 < min <= max <= 1, got ({lo}, {hi})")
    if cfg.run.distill_from and (cfg.model.drop_path or cfg.loss.mask_probability):
        # DINOv2 distils without masking and without stochastic depth; say so instead of silently changing
        raise ConfigError(
            "--run.distill_from: set --model.drop_path=0 and --loss.mask_probability=0 (DINOv2 "
            "distils without stochastic depth and masking)"
        )
    if cfg.optim.batch_size < 2:
        raise ConfigError("option --optim.batch_size: expected at least 2 (centering needs a batch)")
