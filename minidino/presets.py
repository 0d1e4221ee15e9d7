"""Presets: functions that return a `Config` (minidino/config.py), each value with its source.

  shapes    the default: embedded synthetic shapes, a tiny ViT, minutes on a laptop CPU
  cifar10   CIFAR-10 (32x32), ViT-S/4, 2x32 px global + local 16 px crops, for one GPU
  cifar10_cpu  the same data on a CPU (what cifar10 becomes without a GPU): ViT-nano, minutes
  imagenet  the DINO paper's ViT-S/16 100-epoch recipe (Caron et al. 2021, arXiv 2104.14294, Sec. 4.1)
  lvd142m   DINOv2's ViT-L/14 recipe for large data (the official vitl14.yaml)
`dinov2(config)` puts DINOv2's method on any of them (`--method=dinov2`: the official default yaml),
`dinov3(config)` DINOv3's (`--method=dinov3`), and `size_for_data` fills the options left at 0 from the size
of the data set.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import dataclasses
import math
import typing

from .config import Config, DataConfig, HeadConfig, LossConfig, ModelConfig, OptimConfig, RunConfig


def shapes() -> Config:
    """Embedded shapes data, sized to train in under 10 minutes on a 2-core CPU."""
    c = Config()
    # Patch 8: a 32 px crop is 4 x 4 patches (2 x 2 for a 16 px local crop), so 25 epochs fit the budget.
    c.model = ModelConfig(arch="vit_nano", patch_size=8, img_size=32, drop_path=0.0, pos_embed_init="sincos")
    # Small data wants few prototypes and a cool teacher (PAPERS.md: ~1024 prototypes below 20k images).
    c.head = HeadConfig(out_dim=1024, hidden_dim=512, bottleneck_dim=128, use_bn=True)
    # KoLeo (DINOv2's regulariser, 0.1 as there) spreads the CLS features of a batch: on this data it is what
    # turns DINO's features into good k-NN neighbours (README, Results).
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
        eval_crop_ratio=1.0,  # the whole 32 px image: nothing to crop away at this size
        augment="batch",
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
        eval_crop_ratio=1.0,  # CIFAR's 32 px images whole
        num_workers=4,
        augment="batch",
    )
    c.model = ModelConfig(arch="vit_small", patch_size=4, img_size=32, drop_path=0.1)
    c.head = HeadConfig(out_dim=4096, hidden_dim=2048, bottleneck_dim=256)
    c.loss = LossConfig(teacher_temp=0.05, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30)
    c.optim = OptimConfig(epochs=200, batch_size=256, lr=5e-4, warmup_epochs=10, momentum_teacher=0.996)
    c.run.out_dir, c.run.knn_every = "runs/cifar10", 20
    return c


def cifar10_cpu() -> Config:
    """CIFAR-10 on a machine without a GPU, tuned for the most k-NN in minutes of a 2-core CPU with
    --run.minutes (benchmarks/README.md, "CIFAR-10 on a CPU"): a narrow 4-block ViT, few prototypes and a
    BatchNorm head as on the shapes data, KoLeo, a cool teacher, and schedules short enough to finish."""
    c = cifar10()
    # patch 8: 4 x 4 tokens per 32 px crop; at the same budget 5.6x the steps of patch 4 and k-NN +10.1
    # points over random init against +1.7 (6-minute runs, benchmarks/README.md)
    c.model = ModelConfig(arch="vit_nano", patch_size=8, img_size=32, drop_path=0.0, pos_embed_init="sincos")
    c.head = HeadConfig(out_dim=1024, hidden_dim=512, bottleneck_dim=128, use_bn=True)
    c.loss = LossConfig(teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0)
    c.loss.koleo_weight = 0.1
    c.data.local_crops_number, c.data.num_workers = 4, 2
    c.optim = OptimConfig(epochs=10, batch_size=64, lr=1e-3, warmup_epochs=1, momentum_teacher=0.99)
    c.run.out_dir, c.run.knn_every = "runs/cifar10_cpu", 0
    return c


CPU_RECIPE = "ViT-nano/8, 2 x 32 + 4 x 16 px crops, 1024 prototypes, batch 64; presets.cifar10_cpu"


def imagenet() -> Config:
    """DINO ViT-S/16 on ImageNet-1k for 100 epochs, value by value. Sources: [paper] Caron et al. 2021, Sec.
    4.1 "Implementation details" (batch 1024 on 16 GPUs, lr 5e-4 x batch/256 after 10 warm-up epochs, cosine
    lr and weight decay 0.04 -> 0.4, tau_s 0.1, tau_t 0.04 -> 0.07 over 30 epochs) and Table 8 (2 x 224 + 10
    x 96 crops); [main_dino] the official code's defaults (facebookresearch/dino main_dino.py) where the
    paper gives no value. The official code's own 100-epoch example (its README: 8 GPUs x 64 = a global batch
    of 512, tau_t 0.04 throughout, 8 local crops) differs from the paper in those three values."""
    c = Config()
    c.model = ModelConfig(arch="vit_small", patch_size=16, img_size=224)
    c.model.drop_path = 0.1  # [main_dino] drop_path_rate
    c.head = HeadConfig(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, n_layers=3)  # [paper] Sec. 3.1
    c.head.norm_last_layer = True  # [main_dino] norm_last_layer
    c.loss = LossConfig(student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04)  # [paper]
    c.loss.warmup_teacher_temp_epochs = 30  # [paper]
    c.loss.center_momentum = 0.9  # [paper] Eq. 4, m = 0.9; [main_dino] DINOLoss
    c.data = DataConfig(dataset="imagefolder", root="data/imagenet", num_workers=10)
    c.data.global_crops_size, c.data.local_crops_size = 224, 96  # [paper] Sec. 3.1
    c.data.local_crops_number = 10  # [paper] Table 8
    c.data.global_crops_scale, c.data.local_crops_scale = (0.4, 1.0), (0.05, 0.4)  # [main_dino]
    c.optim = OptimConfig(
        epochs=100, batch_size=1024, lr=5e-4, lr_scaling="linear", warmup_epochs=10
    )  # [paper]
    c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4  # [paper]
    c.optim.min_lr, c.optim.momentum_teacher = 1e-6, 0.996  # [main_dino] min_lr, momentum_teacher
    c.optim.clip_grad, c.optim.freeze_last_layer = 3.0, 1  # [main_dino] clip_grad, freeze_last_layer
    c.run.out_dir = "runs/imagenet"
    return c


def dinov2(c: Config) -> Config:
    """DINOv2's method on a config (`--method=dinov2`). Source: [default] facebookresearch/dinov2
    configs/ssl_default_config.yaml, the ImageNet-1k recipe (vitl16_short.yaml is this file; its README trains
    it on 32 GPUs x 64 = a global batch of 2048), and ssl_meta_arch.py / train.py for the semantics.

    On every preset: iBOT (weight 1, shared head, half of the global crops masked at ratios 0.1-0.5), KoLeo
    0.1 summed over the global crops, DINO's running centre (the default yaml; Sinkhorn-Knopp comes with the
    /14 recipe, `lvd142m`), LayerScale 1e-5, crops 0.32-1 / 0.05-0.32, momentum 0.992 -> 1, layer-wise lr
    decay 0.9, patch-embedding lr x 0.2, clipping per part, a learnt prototype gain. On `imagenet` also the
    rest of the yaml: ViT-L/16 with drop path 0.3 (uniform), 8 local crops, lr 4e-3 per 1024 images with the
    square-root rule, batch 2048. The small presets keep their sizes (model, prototypes, temperatures, crop
    pixels, lr and batch), which the yaml sets for ImageNet."""
    c.method = "dinov2"
    c.loss.ibot_weight, c.loss.mask_probability, c.loss.mask_ratio = 1.0, 0.5, (0.1, 0.5)  # [default] ibot
    c.loss.koleo_weight, c.loss.centering = 0.1, "center"  # [default] dino.koleo_loss_weight, train.centering
    c.head.ibot_separate_head = False  # [default] ibot.separate_head
    c.head.norm_last_layer = False  # [default] layers/dino_head.py: weight_norm's gain weight_g is learnt
    c.model.layerscale = 1e-5  # [default] student.layerscale
    c.data.global_crops_scale, c.data.local_crops_scale = (0.32, 1.0), (0.05, 0.32)  # [default] crops
    c.optim.momentum_teacher = 0.992  # [default] teacher.momentum_teacher
    c.optim.layer_decay, c.optim.patch_embed_lr_mult = 0.9, 0.2  # [default] optim
    c.optim.clip_mode = "part"  # [default] train.py: clip_grad_norm_ per student part, 3.0
    if c.data.dataset == "imagefolder":  # the yaml's ImageNet scale
        c.model = ModelConfig(arch="vit_large", patch_size=16, img_size=224, layerscale=1e-5)  # [default]
        c.model.drop_path, c.model.drop_path_schedule = 0.3, "uniform"  # [default] drop_path_rate/_uniform
        c.data.local_crops_number = 8  # [default] crops.local_crops_number
        c.optim.lr, c.optim.lr_scaling, c.optim.batch_size = 4e-3, "sqrt", 2048  # [default] base_lr, README
        # [default] OFFICIAL_EPOCH_LENGTH: an epoch of the schedules is 1250 iterations, not a pass
        c.optim.epoch_steps = 1250
        c.loss.koleo_group = 64  # [default] train.batch_size_per_gpu: ssl_meta_arch runs KoLeo per GPU batch
    # [default] the student gets the crops as one list (ssl_meta_arch.py), and layers/block.py's
    # NestedTensorBlock then runs each branch on the kept samples only (drop_add_residual_stochastic_depth_list)
    c.model.drop_path_impl = "subset"
    return c


def lvd142m() -> Config:
    """DINOv2's /14 recipe on a large data set: facebookresearch/dinov2 configs/train/vitl14.yaml (ViT-L/14 on
    ImageNet-22k; vitg14.yaml is the same with arch vit_giant2 and 12 images per GPU) over ssl_default_config
    .yaml, and the README's launch for it (12 nodes x 8 GPUs x 32 = a global batch of 3072). `--data.root`
    points at the image folder (`--data.dataset=folder` for unlabelled images)."""
    c = dinov2(imagenet())
    c.model = ModelConfig(arch="vit_large", patch_size=14, img_size=224, layerscale=1e-5)  # vitl14 student
    c.model.drop_path, c.model.drop_path_schedule, c.model.ffn = 0.4, "uniform", "swiglu"  # vitl14 student
    c.model.drop_path_impl = "subset"  # as in dinov2() (NestedTensorBlock on the crop list)
    c.head = HeadConfig(out_dim=131072, bottleneck_dim=384, norm_last_layer=False)  # vitl14 dino head
    c.head.ibot_separate_head, c.head.ibot_out_dim = (
        True,
        131072,
    )  # vitl14 ibot.separate_head, head_n_prototypes
    c.head.ibot_bottleneck_dim = (
        256  # the default yaml's ibot.head_bottleneck_dim (vitl14 sets dino's 384 only)
    )
    c.loss.koleo_group = 32  # vitl14 train.batch_size_per_gpu: KoLeo runs on each GPU's batch
    c.loss.centering = "sinkhorn"  # vitl14 train.centering: sinkhorn_knopp
    c.data.dataset, c.data.root, c.data.local_crops_size = "imagefolder", "data/lvd142m", 98  # vitl14 crops
    c.optim.epochs, c.optim.warmup_epochs, c.optim.epoch_steps = 500, 80, 1250  # vitl14 optim (625k steps)
    c.optim.lr, c.optim.batch_size, c.optim.layer_decay = 2e-4, 3072, 1.0  # vitl14 optim; README launch
    c.optim.weight_decay_end, c.optim.momentum_teacher = 0.2, 0.994  # vitl14 optim, teacher
    c.run.out_dir = "runs/lvd142m"
    return c


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "shapes": shapes,
    "cifar10": cifar10,
    "cifar10_cpu": cifar10_cpu,
    "imagenet": imagenet,
    "lvd142m": lvd142m,
}
METHODS = ("dino", "dinov2", "dinov3")


def dinov3(c: Config) -> Config:
    """DINOv3's method on a config (`--method=dinov3`). Sources, facebookresearch/dinov3 at 6876159:
    [default] dinov3/configs/ssl_default_config.yaml; [pretrain] configs/train/dinov3_vit7b16_pretrain.yaml,
    the one released pre-training recipe (ViT-7B/16; the released ViT-S/B/L/H+ were distilled from it, and
    no pre-training config of a small ViT exists: multidist_tests/vits_p16.yaml only sets arch and drop path);
    [hub] hub/backbones.py, the architecture of every released ViT; [im1k] configs/train/vitl_im1k_lin834.yaml,
    a ViT-L/16 ImageNet-1k run (82.2 k-NN in its header).

    On top of DINOv2's method (`dinov2`): RoPE instead of the table, 4 storage tokens, the masked key bias,
    LayerNorm epsilon 1e-5, the untied local-crop CLS norm (the ViT of [pretrain] and [hub]); Sinkhorn-Knopp
    centring, a separate iBOT head, prototypes without weight normalisation ([default]); schedules constant
    after warm-up, weight decay 0.04 and momentum 0.994 throughout ([pretrain]). Left out as the 7B's size
    (a small ViT would not want them): clip 30, layer decay 0.98, AdamW beta2 0.99, drop path 0.4, SwiGLU
    ratio 3. Gram anchoring is a later phase, off here as in [pretrain] (`--gram.weight`, gram.py)."""
    c = dinov2(c)
    c.method = "dinov3"
    c.model.pos_embed, c.model.rope_base, c.model.rope_normalize = "rope", 100.0, "separate"  # [pretrain]
    c.model.rope_rescale = 2.0  # [pretrain] pos_embed_rope_rescale_coords, [hub] every model
    c.model.n_registers, c.model.mask_k_bias, c.model.norm_eps = 4, True, 1e-5  # [pretrain] student, [hub]
    c.model.untie_local_cls_norm = True  # [pretrain] untie_global_and_local_cls_norm
    c.loss.centering = "sinkhorn"  # [default] train.centering: sinkhorn_knopp
    c.head.ibot_separate_head, c.head.weight_norm = True, False  # [default] ibot.separate_head; dino_head.py
    c.optim.schedule = "constant"  # [pretrain] schedules: lr/weight_decay/momentum peak == end
    c.optim.weight_decay = c.optim.weight_decay_end = 0.04  # [pretrain] schedules.weight_decay
    c.optim.momentum_teacher = 0.994  # [pretrain] schedules.momentum
    if c.data.dataset == "imagefolder":  # the ImageNet scale: [im1k]'s ViT-L/16 and batch
        c.model.arch, c.model.drop_path = "vit_large", 0.3  # [im1k] student
        c.optim.lr, c.optim.batch_size = 1e-3, 2048  # [im1k] optim.lr (sqrt rule), header: total batch 2048
    return c


def highres_phase(c: Config, run_dir: str, steps: int = 10_000) -> Config:
    """DINOv2's high-resolution phase (Oquab et al. 2023, Sec. 4 "Adapting the resolution", App. B.2): after
    pre-training, a separate short phase at 518 px global crops whose schedules are compressed into it. It
    starts from the run in `run_dir` (--run.init_from: weights of student and teacher, and the centres) into
    a new run folder. Values: 518 px global crops and 10k steps are the paper's; the rest is not published,
    and these are documented guesses: local crops scaled by the same 518/224 (98 -> 224 px at /14, in
    whole patches), the phase's lr 10x below the run's, its schedules the run's shape over 10 epochs of
    steps / 10 steps (lr warm-up 1 epoch, teacher temperature warm-up 3, so 10% and 30% as in the papers'
    100 epochs), teacher momentum restarted at its first value, prototypes never frozen (the head is
    trained). The position table is rebuilt at the new global crop size. `--optim.epoch_steps=N` makes the
    phase 10 N steps."""
    patch, scale = c.model.patch_size, 518 / 224
    c.data.global_crops_size = (
        518 if patch == 14 else max(patch, round(c.data.global_crops_size * scale / patch) * patch)
    )
    c.data.local_crops_size = max(patch, round(c.data.local_crops_size * scale / patch) * patch)
    c.data.image_size = max(c.data.image_size, c.data.global_crops_size)  # batched views resize to this first
    # the model is built at the new size, as DINOv2's released models are (518 px: a 37 x 37 table at /14):
    # the run's table is resized once, by the run's own rule (checkpoint.restore_weights), and then learnt
    c.model.img_size = c.data.global_crops_size
    c.optim.epochs, c.optim.epoch_steps, c.optim.lr = 10, steps // 10, c.optim.lr / 10
    c.optim.warmup_epochs, c.loss.warmup_teacher_temp_epochs, c.optim.freeze_last_layer = 1, 3, 0
    c.run.init_from, c.run.out_dir, c.run.max_steps = run_dir, f"{run_dir.rstrip('/')}_highres", 0
    return c


def size_for_data(c: Config, n_images: int) -> tuple[Config, list[str]]:
    """The config with the options left at 0 ("auto") filled from the number of training images, and what
    was chosen (as options); `c` itself is left as it is.

    Rule: K = 2^round(log2(n / 16)) clamped to [256, 65536], about one prototype per 16 images (1024 at 20k
    images as PAPERS.md's small-scale notes advise, 65536 at ImageNet's 1.28M as in DINO), and tau_t = 0.04
    below 50k images, else 0.07. With few images, many prototypes and a soft teacher give near-uniform
    targets that drift into collapse.
    """
    head, loss, filled = c.head, c.loss, []
    if head.out_dim == 0:
        head = dataclasses.replace(
            head, out_dim=int(min(65536, max(256, 2 ** round(math.log2(max(n_images, 1) / 16)))))
        )
        filled.append(f"--head.out_dim={head.out_dim}")
    if loss.teacher_temp == 0:
        temp = 0.04 if n_images < 50_000 else 0.07
        loss = dataclasses.replace(
            loss, teacher_temp=temp, warmup_teacher_temp=min(loss.warmup_teacher_temp, temp)
        )
        filled.append(f"--loss.teacher_temp={temp}")
    return dataclasses.replace(c, head=head, loss=loss), filled
