import pytest
import torch

from minidino.config import HeadConfig, ModelConfig
from minidino.heads import DINOHead
from minidino.kernels.attention import attention_ref
from minidino.vit import VisionTransformer


def _vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(
        ModelConfig(arch="vit_nano", patch_size=4, img_size=32, **kw, drop_path=0.0)
    ).eval()


def test_two_resolutions_in_one_call_match_separate_calls():
    vit = _vit()
    g, loc = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)
    out = vit([g, g.flip(-1), loc, loc * 0.5])
    assert [o["cls"].shape for o in out] == [(3, 128)] * 4
    assert out[0]["patch"].shape == (3, 64, 128) and out[2]["patch"].shape == (3, 16, 128)
    alone = vit.forward_features(loc * 0.5)
    torch.testing.assert_close(out[3]["cls"], alone["cls"], atol=1e-5, rtol=1e-5)


def test_position_embedding_interpolation():
    vit = _vit()
    assert vit.interpolate_pos_encoding(8, 8) is vit.pos_embed  # native grid: untouched
    pe = vit.interpolate_pos_encoding(4, 6)
    assert pe.shape == (1, 1 + 24, 128)
    torch.testing.assert_close(pe[:, 0], vit.pos_embed[:, 0])  # the CLS position is never resized
    # a constant grid stays constant under bicubic resizing
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.3
    torch.testing.assert_close(vit.interpolate_pos_encoding(3, 5)[:, 1:], torch.full((1, 15, 128), 0.3))


def test_sdpa_and_reference_attention_agree():
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    torch.testing.assert_close(
        attention_ref(q, k, v),
        torch.nn.functional.scaled_dot_product_attention(q, k, v),
        atol=1e-5,
        rtol=1e-5,
    )
    vit = _vit()
    x = torch.randn(2, 3, 32, 32)
    a = vit.forward_features(x)["cls"]
    vit.set_attn_impl("ref")
    torch.testing.assert_close(vit.forward_features(x)["cls"], a, atol=1e-5, rtol=1e-5)


def test_last_selfattention_rows_are_distributions():
    vit = _vit()
    attn = vit.get_last_selfattention(torch.randn(2, 3, 32, 32))
    assert attn.shape == (2, 4, 65, 65)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 65))


def test_non_square_grids_work_and_sizes_off_the_patch_grid_are_refused():
    vit = _vit()
    out = vit(torch.randn(1, 3, 20, 28))  # 5 x 7 patches: interpolation handles non-square grids
    assert out[0]["patch"].shape == (1, 35, 128)
    with pytest.raises(ValueError, match=r"image size 30 x 28 is not a multiple of the patch size 4"):
        vit(torch.randn(1, 3, 30, 28))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_normalisation(norm_last_layer):
    torch.manual_seed(0)
    cfg = HeadConfig(out_dim=97, hidden_dim=64, bottleneck_dim=32, norm_last_layer=norm_last_layer)
    head = DINOHead(128, cfg)
    with torch.no_grad():
        head.last_layer.weight.mul_(5.0)  # the raw prototype norm must not matter
    logits = head(torch.randn(11, 128))
    assert logits.shape == (11, 97)
    torch.testing.assert_close(head.prototypes().norm(dim=1), torch.ones(97))
    assert logits.abs().max() <= 1.0 + 1e-5  # cosine similarity between unit vectors
    assert head.last_layer_g.requires_grad == (not norm_last_layer)


def test_sincos_position_init_is_distinct_per_patch_and_still_learnt():
    from minidino.positions import sincos_2d

    codes = sincos_2d(7, 96)
    assert codes.shape == (49, 96) and codes.abs().max() <= 1.0
    dists = torch.cdist(codes, codes) + torch.eye(49) * 1e3
    assert dists.min() > 0.1  # every grid position gets its own code
    vit = VisionTransformer(
        ModelConfig(arch="vit_nano", patch_size=4, img_size=28, pos_embed_init="sincos", drop_path=0.0)
    )
    torch.testing.assert_close(vit.pos_embed[0, 1:].detach(), sincos_2d(7, 128))
    assert vit.pos_embed.requires_grad


def test_registers_layerscale_swiglu():
    torch.manual_seed(0)
    vit = VisionTransformer(
        ModelConfig(
            arch="vit_nano",
            patch_size=4,
            img_size=32,
            n_registers=4,
            layerscale=1e-5,
            ffn="swiglu",
            drop_path=0.0,
        )
    ).eval()
    out = vit.forward_features(torch.randn(2, 3, 32, 32))
    assert out["patch"].shape == (2, 64, 128) and out["cls"].shape == (2, 128)  # registers dropped
    assert vit.prepare_tokens(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 4 + 64, 128)
    blk = vit.blocks[0]
    assert torch.all(blk.ls1.gamma == 1e-5) and blk.ls1.gamma.shape == (128,)
    assert blk.mlp.w12.out_features == 2 * 344 and blk.mlp.w3.in_features == 344  # 2/3 of 512, rounded to 8
    # LayerScale 1e-5: each block is nearly the identity at init
    x = torch.randn(2, 69, 128)
    assert (blk(x) - x).abs().max() < 1e-3


def test_mask_token_replaces_masked_patches_only():
    vit = _vit()
    x = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 64, dtype=torch.bool)
    masks[0, :10] = True
    a, b = vit.prepare_tokens(x), vit.prepare_tokens(x, masks)
    assert torch.equal(a[:, 11:], b[:, 11:]) and not torch.equal(a[:, 1:11], b[:, 1:11])
    torch.testing.assert_close(b[0, 1:11], vit.mask_token.expand(10, -1) + vit.pos_embed[0, 1:11])


def test_drop_path_keeps_the_expected_value():
    from minidino.packing import drop_path

    torch.manual_seed(0)
    x = torch.ones(20000, 1, 3)
    y = drop_path(x, 0.3, training=True)
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.7))  # kept samples scaled by 1 / (1 - p)
    assert abs(y.mean().item() - 1.0) < 0.02
    assert torch.equal(drop_path(x, 0.3, training=False), x) and torch.equal(drop_path(x, 0.0, True), x)


def _packed_block(p: float):
    from minidino.packing import Packing
    from minidino.vit import Block

    torch.manual_seed(0)
    blk = Block(16, 2, p, ModelConfig(layerscale=0.5, drop_path_impl="subset")).train()
    return blk, Packing.from_lengths([5] * 4 + [3] * 6, "cpu")  # 4 crops of 5 tokens, then 6 of 3: T = 38


def test_packed_efficient_stochastic_depth_keeps_whole_sequences_per_crop_size_unbiased():
    """DINOv2's efficient stochastic depth on packed crops: per crop size, int(count * (1 - p)) whole
    sequences go through the branch (with their own packing) and come back scaled by count / kept; the others
    are untouched; the expected update is the branch's output (identity branch here: E[out] = 2 x)."""
    from torch import nn

    blk, packing = _packed_block(0.3)
    x, seen = torch.randn(38, 16), []

    def branch(t, pk, rows):
        seen.append((t.shape[0], pk.lengths))
        return t

    out = blk.residual(x, branch, nn.Identity(), packing)
    assert seen == [(2 * 5 + 4 * 3, [5, 5, 3, 3, 3, 3])]  # int(4 * 0.7) = 2 and int(6 * 0.7) = 4 kept
    ratio = (out / x).split([5] * 4 + [3] * 6)
    factors = [r.mean().item() for r in ratio]
    assert all(torch.allclose(r, torch.full_like(r, f)) for r, f in zip(ratio, factors))  # whole sequences
    assert sorted(round(f, 4) for f in factors[:4]) == [1, 1, 3, 3]  # 1 + 4 / 2
    assert sorted(round(f, 4) for f in factors[4:]) == [1, 1, 2.5, 2.5, 2.5, 2.5]  # 1 + 6 / 4
    mean = sum(blk.residual(x, lambda t, pk, rows: t, nn.Identity(), packing) for _ in range(3000)) / 3000
    torch.testing.assert_close(mean, 2 * x, atol=0.1, rtol=0.05)


def test_packed_efficient_stochastic_depth_compiles_as_one_graph_with_its_backward():
    blk, packing = _packed_block(0.4)
    x = torch.randn(38, 16, requires_grad=True)
    compiled = torch.compile(lambda t: blk(t, packing), backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(x)
    torch.manual_seed(1)
    ref = blk(x, packing)
    torch.testing.assert_close(out, ref)  # the same draws in the same order
    g, g_ref = torch.autograd.grad(out.square().sum(), x), torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref)


class FP32Activations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operation whose output is an fp32 tensor at least as large as the block's (tokens,
    channels) input: under bf16 autocast, the activations that still cost fp32 memory and bandwidth."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.found = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.found.append(f"{func} -> {tuple(t.shape)}")
        return out


@pytest.mark.parametrize(
    "bf16_residual,drop_path_impl,packed",
    [(False, "mask", False), (True, "mask", False), (True, "subset", False), (True, "mask", True)]
    + [(True, "subset", True)],
    ids=["fp32_residual", "bf16", "bf16_subset", "bf16_packed", "bf16_packed_subset"],
)
def test_dtype_audit_no_fp32_token_activation_inside_a_block_under_bf16_autocast(
    bf16_residual, drop_path_impl, packed
):
    """Issue 19's dtype audit: with `bf16_residual`, no operation inside a block (norms, attention, MLP,
    LayerScale, stochastic depth, residual adds) writes an fp32 tensor of the tokens' size under bf16
    autocast; the present path (fp32 residual stream, the first case) writes many, so the audit can fail."""
    from minidino.packing import Packing

    torch.manual_seed(0)
    cfg = ModelConfig(
        **dict(arch="vit_nano", patch_size=4, img_size=32, layerscale=1e-5, ffn="swiglu", n_registers=2),
        **dict(drop_path=0.3, drop_path_schedule="uniform", drop_path_impl=drop_path_impl),
        bf16_residual=bf16_residual,
    )
    vit = VisionTransformer(cfg).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = [
            vit.prepare_tokens(torch.randn(4, 3, 32, 32)),
            vit.prepare_tokens(torch.randn(6, 3, 16, 16)),
        ]
        assert tokens[0].dtype == (torch.bfloat16 if bf16_residual else torch.float32)
        if packed:
            lengths = [t.shape[1] for t in tokens for _ in range(t.shape[0])]
            inputs = [(torch.cat([t.flatten(0, 1) for t in tokens]), Packing.from_lengths(lengths, "cpu"))]
        else:
            inputs = [(t, None) for t in tokens]
        with FP32Activations(min(t.numel() for t, _ in inputs)) as audit:
            for x, packing in inputs:
                for blk in vit.blocks:
                    x = blk(x, packing)
                y = vit.norm(x)
    assert y.dtype == x.dtype == tokens[0].dtype
    if bf16_residual:
        assert audit.found == []
    else:
        assert len(audit.found) >= 2 * len(vit.blocks)  # at least the two residual adds of every block


def test_bf16_residual_changes_nothing_in_fp32_and_stays_close_under_autocast():
    """The switch is exact where there is no autocast (CPU training: fp32), and under bf16 autocast its
    features stay within bf16 rounding of the fp32-stream path (same weights, same input)."""
    base = _vit(layerscale=1e-1, n_registers=1)
    low = VisionTransformer(
        ModelConfig(
            arch="vit_nano",
            patch_size=4,
            img_size=32,
            layerscale=1e-1,
            n_registers=1,
            drop_path=0.0,
            bf16_residual=True,
        )
    ).eval()
    low.load_state_dict(base.state_dict())
    x = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    for a, b in zip(base(x), low(x)):
        assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["patch"], b["patch"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = base(x), low(x)
    for a, b in zip(ref, out):
        assert b["cls"].dtype == torch.bfloat16 and a["cls"].dtype == torch.float32
        err = (a["cls"].float() - b["cls"].float()).norm() / a["cls"].float().norm()
        assert err < 0.03, err


@pytest.mark.parametrize("rule", [(0.1, False), (0.0, True)])
def test_a_table_resized_once_computes_what_resizing_on_every_forward_did(rule):
    """The high-resolution phase builds its model at the new size and resizes the run's table once
    (`fit_pos_embed`): at that size the new model gives exactly the old model's features."""
    offset, antialias = rule
    small, big = (
        VisionTransformer(
            ModelConfig("vit_nano", 8, size, interpolate_offset=offset, interpolate_antialias=antialias)
        )
        for size in (32, 72)
    )
    small.eval(), big.eval()
    state = small.state_dict()
    big.load_state_dict({**state, "pos_embed": big.fit_pos_embed(state["pos_embed"])})
    assert big.pos_embed.shape == (1, 1 + 9 * 9, 128)
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        torch.testing.assert_close(
            big.forward_features(x)["patch"], small.forward_features(x)["patch"], rtol=0, atol=0
        )
