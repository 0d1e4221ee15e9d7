import json

import pytest

from minidino import cli
from minidino.config import (
    Config,
    ConfigError,
    cifar10,
    from_dict,
    imagenet,
    options,
    save_json,
    shapes,
    size_for_data,
)


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
    assert cfg.data.dataset == "cifar10" and cfg.model.patch_size == 4
    assert cfg.optim.epochs == 7 and cfg.optim.lr == 1e-3
    assert cfg.data.global_crops_scale == (0.3, 0.9) and cfg.head.norm_last_layer is False


def test_imagenet_preset_is_the_paper_recipe():
    c = imagenet()
    assert (c.model.arch, c.model.patch_size, c.model.drop_path) == ("vit_small", 16, 0.1)
    assert (c.data.global_crops_size, c.data.global_crops_scale) == (224, (0.4, 1.0))
    assert (c.data.local_crops_number, c.data.local_crops_size, c.data.local_crops_scale) == (
        10,
        96,
        (0.05, 0.4),
    )
    assert c.head.out_dim == 65536 and c.loss.student_temp == 0.1 and c.loss.center_momentum == 0.9
    assert (c.loss.warmup_teacher_temp, c.loss.teacher_temp, c.loss.warmup_teacher_temp_epochs) == (
        0.04,
        0.07,
        30,
    )
    assert (c.optim.lr, c.optim.warmup_epochs, c.optim.weight_decay, c.optim.weight_decay_end) == (
        5e-4,
        10,
        0.04,
        0.4,
    )
    assert (c.optim.momentum_teacher, c.optim.clip_grad, c.optim.freeze_last_layer) == (0.996, 3.0, 1)


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
    for preset in ("shapes", "cifar10", "imagenet"):
        for method in ([], ["--method=dinov2"]):
            cli.parse_args(["--preset", preset, *method])  # no error
