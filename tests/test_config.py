import json

import pytest
import torch

from minidino import cli
from minidino.config import Config, ConfigError, from_dict, options, save_json
from minidino.presets import cifar10, dinov2, dinov3, imagenet, lvd142m, shapes, size_for_data


def test_presets_and_overrides_are_typed():
    cfg, resume, wants_help = cli.parse_args(
        [
            "--preset",
            "cifar10",
            "--optim.epochs=7",
            "--data.global_crops_scale=0.3,0.9",
            "--head.norm_last_layer=false",
            "--optim.lr",
            "1e-3",
        ]
    )
    assert resume is None and not wants_help
    # without a GPU, --preset cifar10 is its CPU recipe (ViT-nano/8; tests/test_time_budget.py)
    assert cfg.data.dataset == "cifar10" and cfg.model.patch_size == (4 if torch.cuda.is_available() else 8)
    assert cfg.optim.epochs == 7 and cfg.optim.lr == 1e-3
    assert cfg.data.global_crops_scale == (0.3, 0.9) and cfg.head.norm_last_layer is False


def _value(cfg, key: str):
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


# (option, value, where the value comes from). DINO paper = Caron et al. 2021 (arXiv 2104.14294); main_dino.py
# = facebookresearch/dino's defaults.
DINO_VITS16 = [
    ("model.arch", "vit_small", "paper Sec. 4.1: ViT-S/16"),
    ("model.patch_size", 16, "paper Sec. 4.1: ViT-S/16"),
    ("model.drop_path", 0.1, "main_dino.py --drop_path_rate"),
    ("head.out_dim", 65536, "paper Sec. 3.1 / main_dino.py --out_dim"),
    ("head.hidden_dim", 2048, "paper Sec. 3.1: 3-layer MLP, hidden 2048"),
    ("head.bottleneck_dim", 256, "paper Sec. 3.1: bottleneck 256"),
    ("head.n_layers", 3, "paper Sec. 3.1"),
    ("head.norm_last_layer", True, "main_dino.py --norm_last_layer"),
    ("loss.student_temp", 0.1, "paper Sec. 4.1: tau_s 0.1"),
    ("loss.warmup_teacher_temp", 0.04, "paper Sec. 4.1: tau_t from 0.04"),
    ("loss.teacher_temp", 0.07, "paper Sec. 4.1: to 0.07"),
    ("loss.warmup_teacher_temp_epochs", 30, "paper Sec. 4.1: during the first 30 epochs"),
    ("loss.center_momentum", 0.9, "paper Eq. 4: m = 0.9"),
    ("data.global_crops_size", 224, "paper Sec. 3.1: 224^2 global views"),
    ("data.local_crops_size", 96, "paper Sec. 3.1: 96^2 local views"),
    ("data.local_crops_number", 10, "paper Table 8: 2 x 224^2 + 10 x 96^2"),
    ("data.global_crops_scale", (0.4, 1.0), "main_dino.py --global_crops_scale"),
    ("data.local_crops_scale", (0.05, 0.4), "main_dino.py --local_crops_scale"),
    ("optim.epochs", 100, "paper: the 100-epoch ViT-S/16"),
    ("optim.batch_size", 1024, "paper Sec. 4.1: batch size 1024 over 16 GPUs"),
    ("optim.lr", 5e-4, "paper Sec. 4.1: lr = 0.0005 * batchsize / 256"),
    ("optim.lr_scaling", "linear", "paper Sec. 4.1: linear scaling rule"),
    ("optim.warmup_epochs", 10, "paper Sec. 4.1: first 10 epochs"),
    ("optim.weight_decay", 0.04, "paper Sec. 4.1: cosine 0.04 -> 0.4"),
    ("optim.weight_decay_end", 0.4, "paper Sec. 4.1"),
    ("optim.min_lr", 1e-6, "main_dino.py --min_lr"),
    ("optim.momentum_teacher", 0.996, "paper Sec. 3.1 / main_dino.py --momentum_teacher"),
    ("optim.clip_grad", 3.0, "main_dino.py --clip_grad"),
    ("optim.clip_mode", "tensor", "dino utils.clip_gradients: per parameter tensor"),
    ("optim.freeze_last_layer", 1, "main_dino.py --freeze_last_layer"),
]
# facebookresearch/dinov2 configs/ssl_default_config.yaml (and its README's 32 GPUs for it)
DINOV2_DEFAULT = [
    ("model.arch", "vit_large", "student.arch"),
    ("model.patch_size", 16, "student.patch_size"),
    ("model.drop_path", 0.3, "student.drop_path_rate"),
    ("model.drop_path_schedule", "uniform", "student.drop_path_uniform: true"),
    ("model.drop_path_impl", "subset", "layers/block.py: NestedTensorBlock, drop_add_residual_..._list"),
    ("model.layerscale", 1e-5, "student.layerscale"),
    ("model.ffn", "mlp", "student.ffn_layer"),
    ("model.n_registers", 0, "student.num_register_tokens"),
    ("head.out_dim", 65536, "dino.head_n_prototypes"),
    ("head.bottleneck_dim", 256, "dino.head_bottleneck_dim"),
    ("head.hidden_dim", 2048, "dino.head_hidden_dim"),
    ("head.n_layers", 3, "dino.head_nlayers"),
    ("head.norm_last_layer", False, "layers/dino_head.py: weight_g learnt"),
    ("head.ibot_separate_head", False, "ibot.separate_head"),
    ("loss.koleo_weight", 0.1, "dino.koleo_loss_weight"),
    ("loss.koleo_group", 64, "train.batch_size_per_gpu: KoLeo over each GPU's batch (ssl_meta_arch.py)"),
    ("loss.ibot_weight", 1.0, "ibot.loss_weight"),
    ("loss.dino_weight", 1.0, "dino.loss_weight"),
    ("loss.mask_probability", 0.5, "ibot.mask_sample_probability"),
    ("loss.mask_ratio", (0.1, 0.5), "ibot.mask_ratio_min_max"),
    ("loss.centering", "center", "train.centering: centering"),
    ("loss.warmup_teacher_temp", 0.04, "teacher.warmup_teacher_temp"),
    ("loss.teacher_temp", 0.07, "teacher.teacher_temp"),
    ("loss.warmup_teacher_temp_epochs", 30, "teacher.warmup_teacher_temp_epochs"),
    ("data.global_crops_scale", (0.32, 1.0), "crops.global_crops_scale"),
    ("data.local_crops_scale", (0.05, 0.32), "crops.local_crops_scale"),
    ("data.local_crops_number", 8, "crops.local_crops_number"),
    ("data.global_crops_size", 224, "crops.global_crops_size"),
    ("data.local_crops_size", 96, "crops.local_crops_size"),
    ("optim.epochs", 100, "optim.epochs"),
    ("optim.epoch_steps", 1250, "train.OFFICIAL_EPOCH_LENGTH"),
    ("optim.batch_size", 2048, "train.batch_size_per_gpu 64 x the README's 32 GPUs"),
    ("optim.lr", 4e-3, "optim.base_lr (for a batch of 1024)"),
    ("optim.lr_scaling", "sqrt", "optim.scaling_rule: sqrt_wrt_1024"),
    ("optim.warmup_epochs", 10, "optim.warmup_epochs"),
    ("optim.min_lr", 1e-6, "optim.min_lr"),
    ("optim.weight_decay", 0.04, "optim.weight_decay"),
    ("optim.weight_decay_end", 0.4, "optim.weight_decay_end"),
    ("optim.momentum_teacher", 0.992, "teacher.momentum_teacher"),
    ("optim.layer_decay", 0.9, "optim.layerwise_decay"),
    ("optim.patch_embed_lr_mult", 0.2, "optim.patch_embed_lr_mult"),
    ("optim.clip_grad", 3.0, "optim.clip_grad"),
    ("optim.clip_mode", "part", "train/train.py: clip_grad_norm_ per student part"),
    ("optim.freeze_last_layer", 1, "optim.freeze_last_layer_epochs"),
]
# configs/train/vitl14.yaml over the default yaml (and the README's 12 nodes x 8 GPUs for it)
DINOV2_VITL14 = [
    ("model.patch_size", 14, "student.patch_size"),
    ("model.drop_path", 0.4, "student.drop_path_rate"),
    ("model.drop_path_impl", "subset", "layers/block.py: NestedTensorBlock (crop lists, training)"),
    ("model.ffn", "swiglu", "student.ffn_layer: swiglufused"),
    ("head.out_dim", 131072, "dino.head_n_prototypes / ibot.head_n_prototypes"),
    ("head.bottleneck_dim", 384, "dino.head_bottleneck_dim"),
    ("head.ibot_separate_head", True, "ibot.separate_head"),
    ("head.ibot_out_dim", 131072, "ibot.head_n_prototypes"),
    ("head.ibot_bottleneck_dim", 256, "ibot.head_bottleneck_dim of the default yaml (vitl14 sets dino's)"),
    ("loss.koleo_group", 32, "train.batch_size_per_gpu: KoLeo over each GPU's batch"),
    ("loss.centering", "sinkhorn", "train.centering: sinkhorn_knopp"),
    ("data.local_crops_size", 98, "crops.local_crops_size"),
    ("optim.epochs", 500, "optim.epochs"),
    ("optim.warmup_epochs", 80, "optim.warmup_epochs"),
    ("optim.lr", 2e-4, "optim.base_lr"),
    ("optim.layer_decay", 1.0, "optim.layerwise_decay"),
    ("optim.weight_decay_end", 0.2, "optim.weight_decay_end"),
    ("optim.momentum_teacher", 0.994, "teacher.momentum_teacher"),
    ("optim.batch_size", 3072, "train.batch_size_per_gpu 32 x the README's 96 GPUs"),
]


# facebookresearch/dinov3 @6876159: [pretrain] configs/train/dinov3_vit7b16_pretrain.yaml, [default]
# ssl_default_config.yaml, [hub] hub/backbones.py, [im1k] configs/train/vitl_im1k_lin834.yaml
DINOV3 = [
    ("model.pos_embed", "rope", "[pretrain] student.pos_embed_type"),
    ("model.rope_base", 100.0, "[pretrain] pos_embed_rope_base"),
    ("model.rope_normalize", "separate", "[pretrain] pos_embed_rope_normalize_coords"),
    ("model.rope_rescale", 2.0, "[pretrain] pos_embed_rope_rescale_coords; [hub] every ViT"),
    ("model.rope_shift", 0.0, "[pretrain] pos_embed_rope_shift_coords: null"),
    ("model.rope_jitter", 0.0, "[pretrain] pos_embed_rope_jitter_coords: null"),
    ("model.n_registers", 4, "[pretrain] n_storage_tokens"),
    ("model.mask_k_bias", True, "[pretrain] mask_k_bias"),
    ("model.norm_eps", 1e-5, "[pretrain] norm_layer: layernormbf16"),
    ("model.untie_local_cls_norm", True, "[pretrain] untie_global_and_local_cls_norm"),
    ("model.untie_cls_norm", False, "[pretrain] untie_cls_and_patch_norms"),
    ("model.layerscale", 1e-5, "[pretrain] layerscale"),
    ("model.arch", "vit_large", "[im1k] student.arch"),
    ("model.drop_path", 0.3, "[im1k] drop_path_rate"),
    ("head.weight_norm", False, "[default] force_weight_norm: false; layers/dino_head.py: plain Linear"),
    ("head.ibot_separate_head", True, "[default] ibot.separate_head"),
    ("loss.centering", "sinkhorn", "[default] train.centering: sinkhorn_knopp"),
    ("loss.koleo_weight", 0.1, "[default] dino.koleo_loss_weight"),
    ("loss.ibot_weight", 1.0, "[default] ibot.loss_weight"),
    ("loss.local_weight", 1.0, "[pretrain] reweight_dino_local_loss absent (false in [default])"),
    ("loss.mask_probability", 0.5, "[default] ibot.mask_sample_probability"),
    ("loss.mask_ratio", (0.1, 0.5), "[default] ibot.mask_ratio_min_max"),
    ("data.global_crops_scale", (0.32, 1.0), "[default] crops.global_crops_scale"),
    ("data.local_crops_scale", (0.05, 0.32), "[default] crops.local_crops_scale"),
    ("data.local_crops_number", 8, "[default] crops.local_crops_number"),
    ("optim.schedule", "constant", "[pretrain] schedules: peak == end"),
    ("optim.weight_decay", 0.04, "[pretrain] schedules.weight_decay"),
    ("optim.weight_decay_end", 0.04, "[pretrain] schedules.weight_decay"),
    ("optim.momentum_teacher", 0.994, "[pretrain] schedules.momentum"),
    ("optim.lr", 1e-3, "[im1k] optim.lr"),
    ("optim.lr_scaling", "sqrt", "[im1k] scaling_rule: sqrt_wrt_1024"),
    ("optim.batch_size", 2048, "[im1k] header: total batch 2048"),
    ("optim.epoch_steps", 1250, "[im1k] OFFICIAL_EPOCH_LENGTH"),
    ("optim.patch_embed_lr_mult", 0.2, "[default] optim.patch_embed_lr_mult"),
    ("gram.weight", 0.0, "[pretrain] gram.use_loss: false (anchoring is a later phase)"),
]


@pytest.mark.parametrize(
    "preset, table",
    [
        (imagenet, DINO_VITS16),
        (lambda: dinov2(imagenet()), DINOV2_DEFAULT),
        (lvd142m, DINOV2_VITL14),
        (lambda: dinov3(imagenet()), DINOV3),
    ],
    ids=["dino_vits16", "dinov2_default_yaml", "dinov2_vitl14_yaml", "dinov3_recipe"],
)
def test_paper_presets_equal_their_sources_value_by_value(preset, table):
    cfg = preset()
    wrong = [(key, _value(cfg, key), want, source) for key, want, source in table if _value(cfg, key) != want]
    assert not wrong, wrong


def test_the_lvd142m_preset_keeps_the_default_yaml_where_vitl14_is_silent():
    lvd = lvd142m()
    same = [
        k for k, _, _ in DINOV2_DEFAULT if k not in {k for k, _, _ in DINOV2_VITL14} and k != "model.arch"
    ]
    assert all(_value(lvd, k) == _value(dinov2(imagenet()), k) for k in same)
    assert (
        cli.parse_args(["--preset", "lvd142m", "--method=dinov2"])[0] == lvd
    )  # dinov2() is not applied twice


def test_help_shows_the_global_batch_and_the_lr_it_implies():
    text = cli.help_text(imagenet())
    assert "global batch 1024 (all processes): peak lr 0.002 (--optim.lr=0.0005 x batch / 256)" in text
    assert "sqrt(batch / 1024)" in cli.help_text(dinov2(imagenet()))


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown option --optim.epoch.*--optim.epochs"):
        cli.parse_args(["--optim.epoch=3"])
    with pytest.raises(ConfigError, match=r"--optim.epochs"):
        cli.parse_args(["--epoch=3"])
    # every field name is unique, so the section may be left out
    cfg, _, _ = cli.parse_args(["--epochs=3", "--parallel", "fsdp"])
    assert (cfg.optim.epochs, cfg.run.parallel) == (3, "fsdp")


def test_wrong_type_and_bad_values():
    with pytest.raises(ConfigError, match=r"--optim.epochs: expected int, got 'ten'"):
        cli.parse_args(["--optim.epochs=ten"])
    with pytest.raises(ConfigError, match=r"--optim.epochs: expected int"):
        cli.parse_args(["--optim.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"--head.norm_last_layer: expected bool"):
        cli.parse_args(["--head.norm_last_layer=maybe"])
    with pytest.raises(ConfigError, match=r"--model.arch: expected one of"):
        cli.parse_args(["--model.arch=vit_huge"])
    with pytest.raises(ConfigError, match=r"multiple of --model.patch_size"):
        cli.parse_args(["--data.local_crops_size=18"])
    with pytest.raises(ConfigError, match=r"unknown preset 'cifar'.*cifar10"):
        cli.parse_args(["--preset=cifar"])
    with pytest.raises(ConfigError, match=r"needs a value"):
        cli.parse_args(["--optim.epochs"])


def test_help_lists_every_field_with_its_comment():
    text = cli.help_text(shapes())
    comments = cli.field_comments(shapes())
    for key in options(shapes()):
        assert f"--{key}=" in text
        assert comments.get(key), f"field {key} has no comment"
    assert "tau_s, student softmax temperature" in text


def test_round_trip_through_json(tmp_path):
    cfg = cifar10()
    cfg.optim.epochs = 3
    save_json(cfg, tmp_path / "config.json")
    back = from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert back == cfg


def test_sizes_chosen_from_the_data_size():
    small = Config()
    small.head.out_dim, small.loss.teacher_temp = 0, 0
    chosen_cfg, chosen = size_for_data(small, 5000)
    assert chosen == ["--head.out_dim=256", "--loss.teacher_temp=0.04"]
    assert (chosen_cfg.head.out_dim, chosen_cfg.loss.teacher_temp, chosen_cfg.loss.warmup_teacher_temp) == (
        256,
        0.04,
        0.04,
    )
    assert (small.head.out_dim, small.loss.teacher_temp) == (0, 0)  # the input config is left as it is
    big = Config()
    big.head.out_dim, big.loss.teacher_temp = 0, 0
    big, _ = size_for_data(big, 1_281_167)
    assert (big.head.out_dim, big.loss.teacher_temp) == (65536, 0.07)
    mid = Config()
    mid.head.out_dim = 0
    assert size_for_data(mid, 20_000)[0].head.out_dim == 1024
    explicit, chosen = size_for_data(imagenet(), 10)
    assert chosen == [] and explicit.head.out_dim == 65536  # explicit values stay


@pytest.mark.parametrize(
    "option, expected",
    [
        ("--run.log_every=0", "--run.log_every: expected at least 1, got 0"),
        ("--model.patch_size=0", "--model.patch_size: expected at least 1, got 0"),
        ("--head.out_dim=-5", "--head.out_dim: expected at least 0, got -5"),
        ("--data.local_crops_number=-1", "--data.local_crops_number: expected at least 0, got -1"),
        ("--optim.lr=nan", "--optim.lr: expected a positive number, got nan"),
        ("--optim.weight_decay=inf", "--optim.weight_decay: expected at least 0, got inf"),
        ("--model.drop_path=1", "--model.drop_path: expected 0 <= value < 1, got 1.0"),
        ("--optim.momentum_teacher=1.5", "--optim.momentum_teacher: expected 0 <= value <= 1, got 1.5"),
        ("--loss.mask_ratio=0.5,0.1", "--loss.mask_ratio: expected 0 <= min <= max <= 1, got (0.5, 0.1)"),
        ("--data.global_crops_scale=0,1", "--data.global_crops_scale: expected 0 < min <= max <= 1"),
        ("--optim.batch_size=1", "--optim.batch_size: expected at least 2, got 1"),
    ],
)
def test_every_numeric_option_is_range_checked_with_one_line(option, expected):
    with pytest.raises(ConfigError) as e:
        cli.parse_args([option])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_every_numeric_option_has_a_range_and_the_presets_are_in_range():
    numeric = [k for k, (_, _, typ) in options(Config()).items() if typ in (int, float)]
    assert sorted(numeric) == sorted(cli.RANGES)  # a new numeric field needs its range
    for preset in ("shapes", "cifar10", "cifar10_cpu", "imagenet"):
        for method in ([], ["--method=dinov2"]):
            cli.parse_args(["--preset", preset, *method])  # no error


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run.cuda_graphs=true"], r"--run.cuda_graphs needs --run.compile_step=true"),
        (["--run.compile_step=true", "--run.parallel=fsdp"], r"not with --run.parallel=fsdp"),
        (
            ["--run.compile_step=true", "--run.cuda_graphs=true", "--method=dinov2", "--head.use_bn=true"],
            r"set --head.use_bn=false",
        ),  # fmt: skip
    ],
)
def test_compile_switches_that_cannot_work_together_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        cli.parse_args(args)
    cli.parse_args(
        ["--run.compile_step=true", "--run.cuda_graphs=true", "--method=dinov2", "--head.use_bn=false"]
    )


def test_the_lvd142m_ibot_head_has_its_own_sizes():
    """vitl14.yaml: the DINO head 131072 prototypes x bottleneck 384; the separate iBOT head 131072 x the
    default yaml's 256 (not a copy of the DINO head's)."""
    from minidino.losses import build_losses
    from minidino.meta_arch import build_model

    cfg = lvd142m()
    with torch.device("meta"):  # shapes only: ViT-L and two 131072-prototype heads are never allocated
        model = build_model(cfg)
        losses = build_losses(cfg, world=96)
    assert model.head.last_layer.weight.shape == (131072, 384)
    assert model.ibot_head.last_layer.weight.shape == (131072, 256)
    assert model.ibot_head.mlp[-1].weight.shape == (256, 2048)
    assert losses.ibot.center.shape == (1, 131072)
