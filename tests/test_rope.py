"""RoPE (minidino/rope.py) and the RoPE ViT: the papers' properties, an independent reference, DINOv3's layout."""

import math

import pytest
import torch

from minidino.config import ModelConfig
from minidino.rope import RopePositions, rotate
from minidino.vit import VisionTransformer
from minidino.weights import CheckpointError, export_backbone, load_backbone, load_checkpoint


def _rope(head_dim=8, **options) -> RopePositions:
    return RopePositions(head_dim, ModelConfig(pos_embed="rope", **options))


def reference_rotation(x: torch.Tensor, h: int, w: int, base: float = 100.0) -> torch.Tensor:
    """Written apart from rope.py: channel pair (c, c + D/2) as the complex number x_c + i x_{c+D/2},
    multiplied by exp(i angle_c); angle_c = 2 pi coord / base^(2k / (D/2)) with the row coordinate for
    k = c < D/4 and the column coordinate for k = c - D/4 otherwise; coordinates at the patch centres."""
    n, d = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for t in range(n):
        i, j = divmod(t, w)
        coord = (2 * (i + 0.5) / h - 1, 2 * (j + 0.5) / w - 1)
        for c in range(d // 2):
            axis, k = (0, c) if c < d // 4 else (1, c - d // 4)
            angle = 2 * math.pi * coord[axis] / base ** (2 * k / (d // 2))
            z = complex(x[t, c], x[t, c + d // 2]) * complex(math.cos(angle), math.sin(angle))
            out[t, c], out[t, c + d // 2] = z.real, z.imag
    return out


def test_rotation_equals_an_independent_reference_on_an_odd_grid():
    h, w, d = 7, 5, 12
    x = torch.randn(h * w, d, dtype=torch.float64)
    sin, cos = _rope(d)(h, w)
    assert torch.allclose(rotate(x, sin.double(), cos.double()), reference_rotation(x, h, w), atol=1e-5)


def test_scores_depend_only_on_the_offset_between_positions():
    """The same query and key vectors placed at every patch of a 7 x 5 grid: q_i . k_j after rotation is the
    same for every pair of patches with the same (row, column) offset, and differs between offsets."""
    h, w, d = 7, 5, 16
    sin, cos = _rope(d)(h, w)
    torch.manual_seed(0)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rq = rotate(q.expand(h * w, d), sin.double(), cos.double())
    rk = rotate(k.expand(h * w, d), sin.double(), cos.double())
    scores = (rq @ rk.T).view(h, w, h, w)
    by_offset = {}
    for i, j, i2, j2 in torch.cartesian_prod(*(torch.arange(s) for s in (h, w, h, w))).tolist():
        by_offset.setdefault((i2 - i, j2 - j), []).append(scores[i, j, i2, j2])
    for offset, values in by_offset.items():
        assert torch.allclose(torch.stack(values), values[0], atol=1e-5), offset  # fp32 angles
    assert not torch.allclose(torch.stack(by_offset[(0, 1)]), torch.stack(by_offset[(0, 0)][:1]))


def test_prefix_tokens_and_position_zero_are_left_as_they_are():
    rope = _rope(8)
    sin, cos = rope.tokens(3, 3, n_prefix=5)  # 5 prefix rows (CLS + 4 registers), then a 3 x 3 grid
    x = torch.randn(5 + 9, 2, 8)
    y = rotate(x, sin, cos)
    assert torch.equal(y[:5], x[:5])
    # the centre of an odd grid sits at coordinate (0, 0): angle 0, no rotation
    assert torch.equal(y[5 + 4], x[5 + 4])
    assert not torch.allclose(y[5], x[5])


def test_coordinate_augmentation_acts_in_training_only():
    rope = _rope(8, rope_shift=0.3, rope_jitter=1.5, rope_rescale=2.0)
    plain = _rope(8)
    rope.eval()
    assert all(torch.equal(a, b) for a, b in zip(rope(4, 6), plain(4, 6)))
    rope.train()
    torch.manual_seed(0)
    assert not torch.allclose(rope(4, 6)[0], plain(4, 6)[0])


def test_periods_from_min_and_max():
    periods = _rope(16, rope_min_period=0.5, rope_max_period=90.0).periods
    assert periods[0].item() == pytest.approx(0.5) and periods[-1].item() == pytest.approx(90.0)
    assert torch.allclose(periods[1:] / periods[:-1], (periods[1] / periods[0]).expand(3))


def rope_vit(**options) -> VisionTransformer:
    cfg = dict(arch="vit_nano", patch_size=8, img_size=32, drop_path=0.0, pos_embed="rope", n_registers=2)
    return VisionTransformer(ModelConfig(**{**cfg, **options})).eval()


def test_rope_vit_runs_every_attention_path_alike_and_at_any_grid():
    torch.manual_seed(0)
    vit = rope_vit(mask_k_bias=True)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 24)]
    with torch.no_grad():
        grouped = vit(crops)
        vit.set_attn_impl("ref")
        vit.pack_crops = True
        packed = vit(crops)
    for a, b in zip(grouped, packed):
        assert torch.allclose(a["patch"], b["patch"], atol=1e-5) and a["patch"].shape[1] in (16, 6)


@pytest.mark.parametrize(
    "pos_embed,mask_k_bias,changes", [("learned", False, False), ("rope", False, True), ("rope", True, False)]
)
def test_key_bias_matters_with_rope_unless_masked(pos_embed, mask_k_bias, changes):
    """Without RoPE a key bias adds q . b_k to all scores of a query (softmax ignores it); with RoPE it turns
    with the key's position, which is why DINOv3 masks it."""
    torch.manual_seed(0)
    vit = rope_vit(pos_embed=pos_embed, mask_k_bias=mask_k_bias)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        before = vit.forward_features(x)["patch"]
        for blk in vit.blocks:
            blk.attn.qkv.bias[128:256].normal_()
        after = vit.forward_features(x)["patch"]
    assert torch.allclose(before, after, atol=1e-5) != changes


def official_layout(swiglu: bool) -> dict:
    """A state dict with the key names and shapes of DINOv3's hub files (dinov3/models/vision_transformer.py)
    at ViT-nano's size: 128 wide, 4 blocks, 4 heads, 4 storage tokens, mask_k_bias."""
    torch.manual_seed(1)
    dim, sd = 128, {}
    sd["cls_token"], sd["storage_tokens"], sd["mask_token"] = (
        torch.randn(1, 1, dim),
        torch.randn(1, 4, dim),
        torch.zeros(1, dim),
    )
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = (
        torch.randn(dim, 3, 16, 16) * 0.02,
        torch.randn(dim),
    )
    sd["rope_embed.periods"] = 100 ** (2 * torch.arange(8) / 16)
    for i in range(4):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = 1 + 0.1 * torch.randn(dim), 0.1 * torch.randn(dim)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = (
            torch.randn(3 * dim, dim) * 0.05,
            torch.randn(3 * dim),
        )
        sd[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = torch.randn(dim, dim) * 0.05, torch.randn(dim)
        sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = torch.rand(dim), torch.rand(dim)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = 1 + 0.1 * torch.randn(dim), 0.1 * torch.randn(dim)
        if swiglu:  # ViT-S+/16: ratio 6 -> hidden int(6 * 128 * 2 / 3) = 512
            for name, shape in (("w1", (512, dim)), ("w2", (512, dim)), ("w3", (dim, 512))):
                sd[b + f"mlp.{name}.weight"], sd[b + f"mlp.{name}.bias"] = (
                    torch.randn(shape) * 0.05,
                    torch.randn(shape[0]),
                )
        else:
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = (
                torch.randn(4 * dim, dim) * 0.05,
                torch.randn(4 * dim),
            )
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = (
                torch.randn(dim, 4 * dim) * 0.05,
                torch.randn(dim),
            )
    sd["norm.weight"], sd["norm.bias"] = 1 + 0.1 * torch.randn(dim), 0.1 * torch.randn(dim)
    return sd


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov3_layout_loads_as_its_architecture_and_exports_back(tmp_path, swiglu):
    sd = official_layout(swiglu)
    path = str(tmp_path / "dinov3.pth")
    torch.save(sd, path)
    vit = load_backbone(path)
    assert vit.rope_embed is not None and vit.pos_embed is None and vit.n_registers == 4
    assert vit.norm.eps == 1e-5 and vit.blocks[0].attn.k_bias_keep is not None
    assert (type(vit.blocks[0].mlp).__name__, vit.blocks[0].mlp.w3.in_features if swiglu else 0) == (
        ("SwiGLU", 512) if swiglu else ("Mlp", 0)
    )
    with torch.no_grad():
        for size in ((32, 32), (48, 80)):  # any multiple of the patch: no table to resize
            assert (
                vit.forward_features(torch.randn(1, 3, *size))["patch"].shape[1] == size[0] * size[1] // 256
            )
    run = {"config": None, "teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}
    run_state = {**run, "config": _config_of(vit, path)}
    out = str(tmp_path / "export.pth")
    assert export_backbone(run_state, out) == ""
    back = load_checkpoint(out)
    assert set(back) == set(sd)
    sd_kmasked = {**sd}
    for i in range(4):  # the file's key bias, times its mask, is what the model uses and writes back
        key = f"blocks.{i}.attn.qkv.bias"
        sd_kmasked[key] = sd[key] * sd[f"{key}_mask"]
    assert all(torch.equal(back[k], sd_kmasked[k]) for k in sd)
    with pytest.raises(CheckpointError, match="only the dinov3 layout holds RoPE"):
        export_backbone(run_state, out, "timm")


def _config_of(vit, path):
    from minidino.config import Config, to_dict
    from minidino.weights import backbone_config

    return to_dict(Config(model=backbone_config(load_checkpoint(path), path)))


def test_export_leaves_out_the_training_only_local_cls_norm():
    """DINOv3's recipe unties the local crops' CLS norm; evaluation never uses it and the released ViT-S/B/L
    have none, so the dinov3 layout leaves it out (and the file loads into their code)."""
    from minidino.weights import to_dinov3

    vit = rope_vit(untie_local_cls_norm=True, mask_k_bias=True)
    assert "local_cls_norm.weight" in vit.state_dict()
    out = to_dinov3(vit.state_dict())
    assert not any(k.startswith("local_cls_norm") for k in out) and "storage_tokens" in out
    assert torch.equal(out["blocks.0.attn.qkv.bias_mask"][128:256], torch.zeros(128))


def test_continued_pretraining_from_a_dinov3_file_starts_from_its_weights(tmp_path):
    """--run.init_from with a DINOv3-layout file: the RoPE ViT's options are adopted (patch 16, 4 storage
    tokens, epsilon 1e-5, DINOv3's coordinate rescaling), and with the backbone frozen the whole run the
    trained student's backbone is the file's, its key bias masked (the heads alone were trained)."""
    import train
    from conftest import tiny_run
    from minidino import cli

    path = tmp_path / "dinov3_vits16_like.pth"
    sd = official_layout(False)
    torch.save(sd, path)
    args = [f"--run.init_from={path}", "--optim.freeze_backbone_epochs=2", "--run.eval_at_end=false"]
    cfg, _, _ = cli.parse_args(tiny_run(tmp_path / "run", *args))
    m = cfg.model
    assert (m.pos_embed, m.patch_size, m.n_registers, m.norm_eps, m.rope_rescale, m.mask_k_bias) == (
        "rope",
        16,
        4,
        1e-5,
        2.0,
        True,
    )
    train.main(tiny_run(tmp_path / "run", *args))
    state = load_checkpoint(str(tmp_path / "run"))
    student = {
        k.removeprefix("backbone."): v for k, v in state["student"].items() if k.startswith("backbone.")
    }
    assert torch.equal(student["register_tokens"], sd["storage_tokens"])
    assert torch.equal(student["blocks.3.mlp.fc2.weight"], sd["blocks.3.mlp.fc2.weight"])
    assert torch.equal(
        student["blocks.0.attn.qkv.bias"], sd["blocks.0.attn.qkv.bias"] * sd["blocks.0.attn.qkv.bias_mask"]
    )
