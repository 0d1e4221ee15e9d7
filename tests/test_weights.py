"""Weights in and out (minidino/checkpoint.py): official DINO and DINOv2 layouts, built here with random
tensors (nothing is downloaded), against an independent forward written for the official conventions."""

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

from minidino.weights import CheckpointError, export_backbone, load_backbone, load_checkpoint

D, HEADS, DEPTH = 384, 6, 12  # ViT-S


def official_state(
    patch: int,
    side: int,
    registers: int = 0,
    dinov2: bool = True,
    seed: int = 0,
    dim: int = D,
    depth: int = DEPTH,
) -> dict:
    """A backbone state dict laid out as the released files: DINO's dino_deitsmall16_pretrain.pth (no mask
    token, no LayerScale) or DINOv2's dinov2_vits14[_reg4]_pretrain.pth (mask token, LayerScale gammas,
    registers), with random values; `dim`, `depth`: another ViT size."""
    D, DEPTH = dim, depth
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "cls_token": rnd(1, 1, D),
        "pos_embed": rnd(1, 1 + side * side, D),
        "patch_embed.proj.weight": rnd(D, 3, patch, patch),
        "patch_embed.proj.bias": rnd(D),
        "norm.weight": 1 + rnd(D),
        "norm.bias": rnd(D),
    }
    if dinov2:
        sd["mask_token"] = rnd(1, D)
    if registers:
        sd["register_tokens"] = rnd(1, registers, D)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": 1 + rnd(D), b + "norm1.bias": rnd(D), b + "norm2.weight": 1 + rnd(D)}
        sd |= {
            b + "norm2.bias": rnd(D),
            b + "attn.qkv.weight": rnd(3 * D, D),
            b + "attn.qkv.bias": rnd(3 * D),
        }
        sd |= {b + "attn.proj.weight": rnd(D, D), b + "attn.proj.bias": rnd(D)}
        sd |= {b + "mlp.fc1.weight": rnd(4 * D, D), b + "mlp.fc1.bias": rnd(4 * D)}
        sd |= {b + "mlp.fc2.weight": rnd(D, 4 * D), b + "mlp.fc2.bias": rnd(D)}
        if dinov2:
            sd |= {b + "ls1.gamma": 0.1 + rnd(D, std=0.05), b + "ls2.gamma": 0.1 + rnd(D, std=0.05)}
    return sd


def official_forward(sd: dict, x: torch.Tensor, patch: int, offset: float = 0.1, antialias: bool = False):
    """The official models' forward, written out: conv patches, CLS + positions, registers after CLS, pre-norm
    blocks with LayerScale when present, the final norm. -> (CLS, patches). The stored grid is resized as
    DINO's and DINOv2's interpolate_pos_encoding do: bicubic, by the scale factors (n + offset) / M when the
    model's interpolate_offset is not 0, else to the size (n_h, n_w), antialiased when its
    interpolate_antialias is set (DINOv2's hub builds every *_reg model with offset 0 and antialias)."""
    B, _, H, W = x.shape
    h, w = H // patch, W // patch
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)  # (B, h*w, D)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1)
    pos = sd["pos_embed"]
    M = math.isqrt(pos.shape[1] - 1)
    if (h, w) != (M, M):
        grid = pos[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)
        how = {"scale_factor": ((h + offset) / M, (w + offset) / M)} if offset else {"size": (h, w)}
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **how)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], 1)
    t = t + pos
    r = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if r:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], 1)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        q, k, v = (
            F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
            .reshape(B, -1, 3, HEADS, D // HEADS)
            .permute(2, 0, 3, 1, 4)
        )
        a = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(-1) @ v  # (B, heads, N, d)
        y = F.linear(
            a.transpose(1, 2).reshape(B, -1, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]
        )
        t = t + y * sd.get(b + "ls1.gamma", 1.0)
        y = F.layer_norm(t, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        y = F.linear(
            F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
        t = t + y * sd.get(b + "ls2.gamma", 1.0)
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 0], t[:, 1 + r :]


@pytest.mark.parametrize(
    "name, patch, side, registers, dinov2, sizes",
    [
        ("dino_vits16", 16, 14, 0, False, [(224, 224), (160, 208)]),  # native, then 10 x 13 patches
        ("dinov2_vits14", 14, 37, 0, True, [(518, 518), (98, 126)]),  # native 37 x 37, then 7 x 9
        ("dinov2_vits14_reg4", 14, 16, 4, True, [(224, 224), (126, 98), (308, 280)]),
    ],
)
def test_official_files_give_the_official_features_at_any_size(
    tmp_path, name, patch, side, registers, dinov2, sizes
):
    sd = official_state(patch, side, registers, dinov2)
    torch.save(sd, tmp_path / f"{name}.pth")
    vit = load_backbone(str(tmp_path / f"{name}.pth"))
    assert (vit.embed_dim, vit.patch_size, vit.n_registers, len(vit.blocks)) == (D, patch, registers, DEPTH)
    assert not vit.training
    rule = (0.0, True) if registers else (0.1, False)  # dinov2 hub/backbones.py
    torch.manual_seed(1)
    for H, W in sizes:  # odd grids: 7 x 9, 9 x 7; smaller and larger than the table (antialias shrinks)
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            want_cls, want_patch = official_forward(sd, x, patch, *rule)
            got = vit.forward_features(x)
        torch.testing.assert_close(got["cls"], want_cls, atol=2e-5, rtol=1e-4, msg=f"{name} {H}x{W}")
        torch.testing.assert_close(got["patch"], want_patch, atol=2e-5, rtol=1e-4, msg=f"{name} {H}x{W}")


def test_a_dino_training_checkpoint_opens_safely_and_code_is_refused(tmp_path):
    sd = official_state(16, 14, dinov2=False)
    teacher = {f"backbone.{k}": v for k, v in sd.items()} | {"head.last_layer.weight_g": torch.ones(8, 1)}
    args = argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005)  # what main_dino.py saves
    full = {"student": {f"module.{k}": v for k, v in teacher.items()}, "teacher": teacher, "args": args}
    torch.save(full | {"epoch": 100, "optimizer": {}}, tmp_path / "checkpoint.pth")
    vit = load_backbone(str(tmp_path / "checkpoint.pth"))  # weights_only=True with Namespace allowed
    torch.testing.assert_close(vit.cls_token, sd["cls_token"])
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["args"].lr == 0.0005

    class Code:
        def __reduce__(self):
            return (os.system, ("echo PWNED",))

    torch.save({"teacher": teacher, "args": Code()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as e:
        load_backbone(str(tmp_path / "evil.pth"))
    assert "refused as unsafe" in str(e.value) and "\n" not in str(e.value)


def test_a_vit_giant2_builds_with_dinov2s_shapes():
    from minidino.config import ModelConfig
    from minidino.vit import VisionTransformer

    with torch.device("meta"):  # shapes only: 1.1 billion parameters are never allocated
        vit = VisionTransformer(
            ModelConfig(arch="vit_giant2", patch_size=14, img_size=518, ffn="swiglu", layerscale=1e-5)
        )
        out = vit.forward_features(torch.empty(1, 3, 28, 42))
    assert (vit.embed_dim, len(vit.blocks), vit.num_heads) == (1536, 40, 24)
    assert vit.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536) and vit.blocks[0].mlp.w3.weight.shape == (
        1536,
        4096,
    )
    assert 1.1e9 < sum(p.numel() for p in vit.parameters()) < 1.2e9  # DINOv2's ViT-g/14: 1.1 B
    assert out["patch"].shape == (1, 6, 1536) and vit.pos_embed.shape == (1, 1370, 1536)


def test_export_round_trips_through_the_dinov2_and_timm_layouts(tmp_path):
    import train
    from conftest import tiny_run

    run = tmp_path / "run"
    train.main(tiny_run(run, "--run.max_steps=1", "--run.eval_at_end=false", "--model.n_registers=2"))
    state = load_checkpoint(str(run))
    ours = load_backbone(str(run))
    x = torch.randn(2, 3, 32, 32)
    for layout in ("dinov2", "timm"):
        note = export_backbone(state, str(tmp_path / f"{layout}.pth"), layout)
        # the run resizes positions as DINO does; DINOv2's register models and timm resize otherwise
        assert "the features agree at 32 px, not at other sizes" in note
        keys = set(torch.load(tmp_path / f"{layout}.pth", weights_only=True))
        assert ("mask_token" in keys) == (layout == "dinov2") and ("reg_token" in keys) == (layout == "timm")
        back = load_backbone(str(tmp_path / f"{layout}.pth"))
        with torch.no_grad():
            torch.testing.assert_close(back.forward_features(x)["patch"], ours.forward_features(x)["patch"])


def test_continued_pretraining_trains_new_heads_on_a_frozen_backbone_first(tmp_path, capsys):
    """--run.init_from with a DINO-layout backbone file: the architecture comes from the file, the heads are
    new, and the backbone stays as loaded for --optim.freeze_backbone_epochs (1 epoch = 2 steps here)."""
    import train
    from conftest import tiny_run

    train.main(
        tiny_run(tmp_path / "src", "--run.max_steps=2", "--run.eval_at_end=false", "--model.arch=vit_tiny")
    )
    export_backbone(load_checkpoint(str(tmp_path / "src")), str(tmp_path / "dino.pth"), "timm")
    backbone = torch.load(tmp_path / "dino.pth", weights_only=True)  # DINO's files: no mask token either
    start = {k: v for k, v in backbone.items()}
    new = tmp_path / "new"
    opts = tiny_run(new, f"--run.init_from={tmp_path / 'dino.pth'}", "--run.eval_at_end=false")
    train.main([*opts, "--run.max_steps=2"])
    assert "a vit_tiny/8 backbone; new heads, the backbone frozen for 1 epoch" in capsys.readouterr().out
    after_freeze = load_checkpoint(str(new))
    for part in ("student", "teacher"):
        assert all(torch.equal(after_freeze[part][f"backbone.{k}"], start[k]) for k in start), part
    head = after_freeze["student"]["head.mlp.0.weight"]
    train.main(["--resume", str(new), "--run.max_steps=0"])  # steps 3 and 4: everything trains
    done = load_checkpoint(str(new))
    assert (
        done["config"]["model"]["arch"] == "vit_tiny"
        and done["config"]["optim"]["freeze_backbone_epochs"] == 1
    )
    assert any(not torch.equal(done["student"][f"backbone.{k}"], start[k]) for k in start)
    assert not torch.equal(done["student"]["head.mlp.0.weight"], head)


def test_eval_reads_official_layout_files(tmp_path):
    import numpy as np
    from PIL import Image

    import eval as evaluate_cli

    for split in ("train", "test"):  # a small ImageFolder of 64 px images
        for c in ("a", "b"):
            os.makedirs(tmp_path / "data" / split / c)
            for i in range(3):
                pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / c / f"{i}.png")
    for name, patch, side, dinov2 in (("dino.pth", 16, 14, False), ("dinov2.pth", 14, 16, True)):
        torch.save(official_state(patch, side, dinov2=dinov2), tmp_path / name)
        args = [str(tmp_path / name), "--data", str(tmp_path / "data"), "--knn", "--num-workers", "0"]
        report = evaluate_cli.main([*args, "--size", str(4 * patch), "--ks", "1,3"])
        assert set(report["knn_top1"]) == {"1", "3"} and report["n_train"] == 6
    with pytest.raises(Exception, match=r"--data: .* is a backbone file without a run config"):
        evaluate_cli.main([str(tmp_path / "dino.pth"), "--knn"])


def _timm_vit(registers: int, swiglu: bool, layerscale: bool):
    """A timm VisionTransformer of minidino's vit_nano/8 shape, at random init then perturbed, the way timm
    builds DINOv2's models: registers with no_embed_class (vit_*_reg4_dinov2), SwiGLUPacked with SiLU and a
    hidden width of twice minidino's (vit_giant_patch14_dinov2), dynamic_img_size for any input size."""
    timm = pytest.importorskip("timm")
    from timm.layers import SwiGLUPacked

    hidden = (int(4 * 128 * 2 / 3) + 7) // 8 * 8  # minidino's (and DINOv2's) SwiGLU width
    extra = (
        {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "mlp_ratio": 2 * hidden / 128}
        if swiglu
        else {}
    )
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=0, dynamic_img_size=True,
        init_values=1e-5 if layerscale else None, reg_tokens=registers, no_embed_class=bool(registers), **extra,
    )  # fmt: skip
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


TIMM_VARIANTS = {  # (registers, SwiGLU, LayerScale): timm's DINO, DINOv2, DINOv2-reg and ViT-g layouts
    "plain": (0, False, False),
    "layerscale": (0, False, True),
    "registers": (4, False, True),
    "swiglu": (0, True, True),
    "registers_swiglu": (4, True, True),
}


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_timm_files_load_with_timms_features_and_exports_load_into_timm(tmp_path, variant):
    """In: a timm state dict (registers, SwiGLU included) read by load_backbone gives timm's own features at
    its size and at others (timm resizes with size= and antialias). Out: minidino's timm layout loads into
    the same timm architecture with strict=True and gives the same features."""
    registers, swiglu, layerscale = TIMM_VARIANTS[variant]
    ref = _timm_vit(registers, swiglu, layerscale)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    # a timm ViT without registers, LayerScale or head has exactly DINO's keys: read as DINO's unless named
    source = "timm" if variant == "plain" else None
    ours = load_backbone(str(tmp_path / "timm.pth"), source)
    assert (ours.n_registers, ours.interpolate_offset, ours.interpolate_antialias) == (registers, 0.0, True)
    for H, W in [(32, 32), (24, 40), (56, 48)]:  # native 4 x 4, then 3 x 5 and 7 x 6 patches
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            want, got = ref.forward_features(x), ours.forward_features(x)
        torch.testing.assert_close(got["cls"], want[:, 0], atol=1e-5, rtol=1e-5, msg=f"{H}x{W}")
        torch.testing.assert_close(
            got["patch"], want[:, 1 + registers :], atol=1e-5, rtol=1e-5, msg=f"{H}x{W}"
        )
    back = _timm_vit(registers, swiglu, layerscale)
    from minidino.weights import to_timm

    back.load_state_dict(to_timm(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_a_chunked_dinov2_training_checkpoint_loads(tmp_path):
    """DINOv2 trained with block_chunks=4 saves blocks.{chunk}.{i}.*: read as blocks.{i}.* (the chunk index is
    not the depth), from a hub-style state dict and from a training checkpoint's teacher."""
    sd = official_state(14, 4, registers=4)
    chunk = DEPTH // 4
    chunked = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = k.replace(f"blocks.{i}.", f"blocks.{i // chunk}.{i}.", 1)
        chunked[k] = v
    torch.save({"teacher": {f"backbone.{k}": v for k, v in chunked.items()}}, tmp_path / "teacher.pth")
    torch.save(chunked, tmp_path / "chunked.pth")
    x = torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        want_cls, want_patch = official_forward(sd, x, 14, 0.0, True)
        for name in ("teacher.pth", "chunked.pth"):
            vit = load_backbone(str(tmp_path / name))
            assert len(vit.blocks) == DEPTH
            torch.testing.assert_close(vit.forward_features(x)["cls"], want_cls, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(vit.forward_features(x)["patch"], want_patch, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("patch", [14, 16])
def test_continued_pretraining_from_an_official_file_adopts_its_patch(tmp_path, capsys, patch):
    """The README's line, `python train.py --run.init_from=FILE --data.dataset=folder --data.root=DIR`, with a
    DINOv2-layout /14 file and a DINO-layout /16 file: the file's patch is adopted before the crops are
    checked, the preset's crops rounded to whole patches of it (DINOv2: 96 -> 98 px at /14)."""
    import numpy as np
    from PIL import Image

    import train
    from conftest import tiny_run
    from minidino import cli
    from minidino.config import ConfigError

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(32):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    sd = official_state(patch, 3, dinov2=patch == 14, dim=128, depth=4)  # vit_nano's shapes
    torch.save(sd, tmp_path / "released.pth")
    opts = [f"--run.init_from={tmp_path / 'released.pth'}", "--data.dataset=folder", f"--data.root={images}"]
    cfg, _, _ = cli.parse_args(opts)
    want = (28, 14, 28) if patch == 14 else (32, 16, 32)  # shapes' 32 / 16 / 32 px in whole patches
    got = (cfg.model.patch_size, cfg.data.global_crops_size, cfg.data.local_crops_size, cfg.data.eval_size)
    assert got == (patch, *want)
    cfg, _, _ = cli.parse_args([*opts, f"--data.local_crops_size={3 * patch}"])  # an explicit option wins
    assert cfg.data.local_crops_size == 3 * patch
    with pytest.raises(
        ConfigError, match=r"--data.local_crops_size=20 must be a multiple of --model.patch_size"
    ):
        cli.parse_args([*opts, "--data.local_crops_size=20"])
    with pytest.raises(ConfigError, match=rf"--model.patch_size=8 contradicts --run.init_from=.* {patch}:"):
        cli.parse_args([*opts, "--model.patch_size=8"])
    result = train.main(tiny_run(tmp_path / "run", *opts, "--run.max_steps=2", "--run.eval_at_end=false"))
    assert result["step"] == 2
    saved = load_checkpoint(str(tmp_path / "run"))
    assert saved["config"]["model"]["patch_size"] == patch
    assert torch.equal(saved["teacher"]["backbone.pos_embed"], sd["pos_embed"])  # frozen in the first epoch
