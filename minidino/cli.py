"""The command line of train.py: `--preset NAME`, `--resume RUN_DIR`, `--highres RUN_DIR` and
`--section.name=value` options.

    python train.py --preset cifar10 --optim.epochs=50 --data.root=data/cifar10
    python train.py --epochs=50          # a field name that is unique needs no section
    python train.py --highres runs/x     # DINOv2's high-resolution phase after the finished run runs/x

Values are parsed and type-checked against the field's annotation in config.py; an unknown option names the
closest ones; `--help` prints every option with the comment written beside its field. `validate` holds the
checks across fields, with the choice lists taken from the modules that implement them.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
import typing

from . import parallel
from .checkpoint import adopt_backbone_file
from .config import Config, ConfigError, from_dict, options, sections
from .crops import AUGMENTS
from .data import DATASETS
from .dist import DEVICES, print0, resolve_device
from .kernels.attention import IMPLS
from .losses import CENTERINGS
from .optim import CLIP_MODES, LR_SCALING, peak_lr
from .presets import CPU_RECIPE, METHODS, PRESETS, dinov2, dinov3, highres_phase
from .rope import NORMALIZE
from .schedules import SHAPES
from .vit import ARCHS, DROP_PATH_IMPLS, DROP_PATH_SCHEDULES, FFNS, POS_EMBED_INITS, POS_EMBEDS

CHOICES = {
    "method": METHODS,
    "model.arch": tuple(ARCHS),
    "model.attn_impl": IMPLS,
    "model.drop_path_schedule": DROP_PATH_SCHEDULES,
    "model.ffn": FFNS,
    "model.pos_embed_init": POS_EMBED_INITS,
    "model.drop_path_impl": DROP_PATH_IMPLS,
    "model.pos_embed": POS_EMBEDS,
    "model.rope_normalize": NORMALIZE,
    "optim.schedule": SHAPES,
    "loss.centering": CENTERINGS,
    "optim.lr_scaling": LR_SCALING,
    "optim.clip_mode": CLIP_MODES,
    "data.dataset": DATASETS,
    "data.augment": AUGMENTS,
    "run.device": DEVICES,
    "run.parallel": parallel.MODES,
}


# The range of every numeric option: (lowest, highest, whether the highest is allowed); None: no bound. Floats
# must also be finite. "0 disables" / "0: auto" is said in the field's comment where it holds.
POSITIVE, AT_LEAST_0, FRACTION, PROBABILITY = (1, None, True), (0, None, True), (0, 1, False), (0, 1, True)
RANGES = {
    "model.patch_size": POSITIVE,
    "model.img_size": POSITIVE,
    "model.drop_path": FRACTION,
    "model.layerscale": AT_LEAST_0,
    "model.n_registers": AT_LEAST_0,
    "model.interpolate_offset": (0, 1, False),
    "model.rope_base": (1e-6, None, True),
    "model.rope_min_period": AT_LEAST_0,
    "model.rope_max_period": AT_LEAST_0,
    "model.rope_shift": AT_LEAST_0,
    "model.rope_jitter": (0, None, True),
    "model.rope_rescale": (0, None, True),
    "model.norm_eps": (1e-12, 1, True),
    "model.ffn_ratio": (1e-3, None, True),
    "loss.local_weight": AT_LEAST_0,
    "gram.weight": AT_LEAST_0,
    "gram.start_epoch": AT_LEAST_0,
    "gram.refresh_every": AT_LEAST_0,
    "gram.max_refreshes": AT_LEAST_0,
    "gram.teacher_size": AT_LEAST_0,
    "head.out_dim": AT_LEAST_0,
    "head.hidden_dim": POSITIVE,
    "head.bottleneck_dim": POSITIVE,
    "head.n_layers": POSITIVE,
    "head.ibot_out_dim": AT_LEAST_0,
    "head.ibot_bottleneck_dim": AT_LEAST_0,
    "loss.student_temp": (1e-6, None, True),
    "loss.teacher_temp": AT_LEAST_0,
    "loss.warmup_teacher_temp": (1e-6, None, True),
    "loss.warmup_teacher_temp_epochs": AT_LEAST_0,
    "loss.center_momentum": PROBABILITY,
    "loss.sinkhorn_iters": POSITIVE,
    "loss.dino_weight": AT_LEAST_0,
    "loss.ibot_weight": AT_LEAST_0,
    "loss.koleo_weight": AT_LEAST_0,
    "loss.koleo_group": AT_LEAST_0,
    "loss.mask_probability": PROBABILITY,
    "data.image_size": POSITIVE,
    "data.n_train": POSITIVE,
    "data.n_test": POSITIVE,
    "data.global_crops_size": POSITIVE,
    "data.local_crops_number": AT_LEAST_0,
    "data.local_crops_size": POSITIVE,
    "data.hue": (0, 0.5, True),
    "data.eval_size": POSITIVE,
    "data.eval_crop_ratio": (1e-3, 1, True),
    "data.num_workers": AT_LEAST_0,
    "optim.epochs": AT_LEAST_0,
    "optim.epoch_steps": AT_LEAST_0,
    "optim.batch_size": (2, None, True),  # centering needs a batch
    "optim.accum_steps": POSITIVE,
    "optim.lr": (1e-12, None, True),
    "optim.min_lr": AT_LEAST_0,
    "optim.warmup_epochs": AT_LEAST_0,
    "optim.weight_decay": AT_LEAST_0,
    "optim.weight_decay_end": AT_LEAST_0,
    "optim.momentum_teacher": PROBABILITY,
    "optim.layer_decay": (1e-6, 1, True),
    "optim.patch_embed_lr_mult": AT_LEAST_0,
    "optim.clip_grad": AT_LEAST_0,
    "optim.freeze_last_layer": AT_LEAST_0,
    "optim.freeze_backbone_epochs": AT_LEAST_0,
    "run.seed": AT_LEAST_0,
    "run.log_every": POSITIVE,
    "run.max_steps": AT_LEAST_0,
    "run.minutes": AT_LEAST_0,
    "run.knn_k": POSITIVE,
    "run.knn_every": AT_LEAST_0,
}
TUPLE_RANGES = {
    "data.global_crops_scale": "0 < min <= max <= 1",
    "data.local_crops_scale": "0 < min <= max <= 1",
}
TUPLE_RANGES["loss.mask_ratio"] = "0 <= min <= max <= 1"


def parse_args(argv: list[str]) -> tuple[Config, str | None, bool]:
    """Parse the command line into (config, resume_dir, wants_help).

    `--preset NAME` picks the starting point (default shapes); `--resume RUN_DIR` starts from that run's
    config.json instead; `--highres RUN_DIR` from that run's config turned into its high-resolution phase
    (presets.highres_phase: a new run that starts from its weights); every `--section.name=value` (or
    `--section.name value`) then overrides a field.
    """
    preset, resume, highres, wants_help, pairs = "shapes", None, None, False, []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"option --{key} needs a value (--{key}=VALUE)")
        if key == "preset":
            preset = value
        elif key == "resume":
            resume = value
        elif key == "highres":
            highres = value
        else:
            pairs.append((key, value))
    if resume is None and highres is None:
        preset = machine_preset(preset, dict(pairs))
    if resume is not None:
        cfg = read_run_config(resume)
    elif highres is not None:
        cfg = highres_phase(read_run_config(highres, "--highres"), highres)
    else:
        cfg = preset_config(preset, dict(pairs).get("method", ""))
    explicit = {set_option(cfg, key, value) for key, value in pairs}
    if resume is None and highres is None and cfg.run.init_from:
        # the backbone file decides the patch (and the crops that fit it) before anything is checked; the
        # options given on the command line are applied again on top, so they win
        init_from, cfg = cfg.run.init_from, preset_config(preset, dict(pairs).get("method", ""))
        cfg.run.init_from = init_from
        cfg, adopted = adopt_backbone_file(cfg, explicit)
        for key, value in pairs:
            set_option(cfg, key, value)
        if adopted:
            print0(adopted)
    validate(cfg)
    return cfg, resume, wants_help


def preset_config(name: str, method: str = "") -> Config:
    """The preset's config; with --method=dinov2 or dinov3 that method's defaults go on first, so explicit
    options win."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}{hint}")
    cfg = PRESETS[name]()
    recipe = {"dinov2": dinov2, "dinov3": dinov3}.get(method)
    return recipe(cfg) if recipe is not None and cfg.method != method else cfg


def machine_preset(name: str, options: dict[str, str]) -> str:
    """The preset to use here: `cifar10` on a machine without a GPU (or with --run.device=cpu) is its CPU
    recipe, `cifar10_cpu`, and a line says so."""
    device = options.get("run.device", options.get("device", "auto"))
    if name == "cifar10" and device in DEVICES and resolve_device(device).type == "cpu":
        print0(f"no GPU here: --preset cifar10 runs its CPU recipe, cifar10_cpu ({CPU_RECIPE})")
        return "cifar10_cpu"
    return name


def read_run_config(run_dir: str, flag: str = "--resume") -> Config:
    path = f"{run_dir}/config.json"
    try:
        with open(path) as fh:
            return from_dict(json.load(fh))
    except FileNotFoundError:
        raise ConfigError(f"{flag} {run_dir}: no config.json there (is it a run folder?)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {run_dir}: {path} is not valid JSON ({e})") from None


def set_option(cfg: Config, key: str, text: str) -> str:
    """Set one `section.name` option from its text form, with type checking and a did-you-mean error;
    returns the option's full name."""
    known = options(cfg)
    same_name = [k for k in known if k.split(".")[-1] == key]
    if key not in known and len(same_name) == 1:  # a unique field name needs no section: --parallel=fsdp
        key = same_name[0]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        # also match on the last component, so --epochs suggests optim.epochs
        close += [k for k in known if k.split(".")[-1] == key.split(".")[-1] and k not in close]
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
        raise ConfigError(f"unknown option --{key}{hint}")
    section, name, typ = known[key]
    setattr(section, name, parse_value(key, text, typ))
    return key


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
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            if len(parts) != len(typing.get_args(typ)):
                raise ValueError
            return tuple(t(p) for t, p in zip(typing.get_args(typ), parts))
        if typ is int and not re.fullmatch(r"[+-]?\d+", text.strip()):
            raise ValueError
        return typ(text)
    except ValueError:
        expected = typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", "")
        raise ConfigError(f"option --{key}: expected {expected}, got {text!r}") from None


def field_comments(cfg: Config) -> dict[str, str]:
    """'section.name' -> the trailing `# comment` of that field in config.py: the option's help text."""
    out = {}
    for prefix, obj in sections(cfg):
        for line in inspect.getsource(type(obj)).splitlines():
            m = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
            if m:
                out[f"{prefix}.{m.group(1)}" if prefix else m.group(1)] = m.group(2)
    return out


def help_text(cfg: Config) -> str:
    comments = field_comments(cfg)
    lines = [
        "usage: python train.py [--preset NAME | --resume RUN_DIR | --highres RUN_DIR] [--key=value ...]",
        "",
        f"presets: {', '.join(PRESETS)} (default shapes); values shown are the chosen preset's",
        f"global batch {cfg.optim.batch_size} (all processes): peak lr {peak_lr(cfg.optim):.4g} "
        f"(--optim.lr={cfg.optim.lr:g} x {'batch / 256' if cfg.optim.lr_scaling == 'linear' else 'sqrt(batch / 1024)'})",
        "",
    ]
    rows = [
        (f"  --{key}={getattr(obj, name)}", comments.get(key, ""))
        for key, (obj, name, _) in options(cfg).items()
    ]
    width = max(len(option) for option, _ in rows) + 2
    return "\n".join(lines + [option.ljust(width) + comment for option, comment in rows])


def validate(cfg: Config) -> None:
    """Checks across fields, each failing with one line that names the option."""
    values = {key: getattr(obj, name) for key, (obj, name, _) in options(cfg).items()}
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise ConfigError(f"option --{key}: expected one of {', '.join(allowed)}, got {values[key]!r}")
    for key, (lo, hi, hi_allowed) in RANGES.items():
        check_range(key, values[key], lo, hi, hi_allowed)
    for key, rule in TUPLE_RANGES.items():
        lo, hi = values[key]
        least = 0 < lo if rule.startswith("0 <") else 0 <= lo
        if not (least and lo <= hi <= 1 and math.isfinite(lo)):
            raise ConfigError(f"option --{key}: expected {rule}, got ({lo}, {hi})")
    for key in ("data.global_crops_size", "data.local_crops_size"):
        if values[key] % cfg.model.patch_size:
            raise ConfigError(
                f"option --{key}={values[key]} must be a multiple of --model.patch_size={cfg.model.patch_size}"
            )
    if cfg.run.compile_step and cfg.run.parallel == "fsdp":
        raise ConfigError("--run.compile_step: not with --run.parallel=fsdp (use --run.compile, per block)")
    if cfg.run.cuda_graphs and cfg.loss.ibot_weight and cfg.head.use_bn:
        raise ConfigError("--run.cuda_graphs with iBOT: set --head.use_bn=false (the padding of the fixed-size "
                          "mask buffers would enter BatchNorm's batch statistics)")  # fmt: skip
    if cfg.run.cuda_graphs and not cfg.run.compile_step:
        raise ConfigError(
            "--run.cuda_graphs needs --run.compile_step=true (the graphs are the compiled step's)"
        )
    if cfg.gram.weight and cfg.run.parallel == "fsdp":
        raise ConfigError(
            "--gram.weight: not with --run.parallel=fsdp (the Gram teacher copies a whole backbone)"
        )
    if cfg.gram.teacher_size % cfg.model.patch_size:
        raise ConfigError(
            f"option --gram.teacher_size must be a multiple of --model.patch_size={cfg.model.patch_size}"
        )
    dim, _, heads = ARCHS[cfg.model.arch]
    if cfg.model.pos_embed == "rope" and (dim // heads) % 4:
        raise ConfigError(f"--model.pos_embed=rope needs a head width divisible by 4 ({cfg.model.arch})")
    if cfg.run.distill_from and (cfg.model.drop_path or cfg.loss.mask_probability):
        # DINOv2 distils without masking and without stochastic depth; say so instead of silently changing
        raise ConfigError(
            "--run.distill_from: set --model.drop_path=0 and --loss.mask_probability=0 (DINOv2 "
            "distils without stochastic depth and masking)"
        )


def check_range(key: str, value, lo, hi, hi_allowed: bool) -> None:
    """One numeric option against its range, with a one-line error naming it."""
    ok = math.isfinite(value) and (lo is None or value >= lo)
    ok = ok and (hi is None or value < hi or (hi_allowed and value == hi))
    if not ok:
        if hi is None:
            want = "a positive number" if lo and lo < 1 else f"at least {lo}"
        else:
            want = f"{lo} <= value {'<=' if hi_allowed else '<'} {hi}"
        raise ConfigError(f"option --{key}: expected {want}, got {value}")


def error_line(e: BaseException) -> str:
    """The one-line message of an error for `error: ...`. An error raised in a DataLoader worker arrives with
    the worker's whole traceback in its message; its last line is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, rest = last.partition(": ")
        text = rest if sep and name.replace(".", "_").isidentifier() else last  # drop "module.ErrorName: "
    return text.splitlines()[0] if text else type(e).__name__
