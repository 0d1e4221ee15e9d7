"""Vision Transformer backbone (Dosovitskiy et al. 2020, arXiv 2010.11929) as used by DINO and DINOv2.

What DINO needs beyond a plain classifier ViT:
  * position embeddings interpolated to any crop size (224 px global and 96 px local crops share one table);
  * a forward over a *list* of crops that runs each resolution as one batch (DINO's multi-crop, Sec. 3.1);
  * CLS and patch tokens both returned (CLS for the DINO loss, patches for iBOT and dense evaluation);
  * the last block's attention, for the paper's attention maps, without storing attention while training.
DINOv2 options (arXiv 2304.07193, Sec. 5): LayerScale, register tokens (arXiv 2309.16588), SwiGLU, a learnable
mask token for iBOT, stochastic depth. DINOv3 options (arXiv 2508.10104): rotary positions instead of the table
(rope.py), the key bias held at 0, separate final norms for CLS and patches; the building blocks are layers.py.

Parameter names follow the common ViT layout (timm and the official DINO/DINOv2 checkpoints):
cls_token, pos_embed, patch_embed.proj, blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj,
blocks.{i}.ls1.gamma, blocks.{i}.norm2, blocks.{i}.mlp.fc1/fc2, norm.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import ModelConfig
from .kernels.attention import attention_qkv
from .kernels.drop_path import drop_add
from .layers import LayerNorm, LayerScale, Mlp, SwiGLU
from .packing import Packing, drop_path, forward_packed, kept_count, packed_subset
from .positions import resize_pos_embed, sincos_2d
from .rope import RopePositions, rotate_qk

ARCHS = {  # name -> (embed_dim, depth, num_heads); mlp ratio 4 throughout
    "vit_nano": (128, 4, 4),  # not a standard size: small enough to train on a laptop CPU in minutes
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),  # DINOv2's ViT-g: with --model.ffn=swiglu its hidden width is 4096
    "vit_huge2": (1280, 32, 20),  # DINOv3's ViT-H+/16 (SwiGLU, ffn_ratio 6)
    "vit_7b": (4096, 40, 32),  # DINOv3's ViT-7B/16 (SwiGLU, ffn_ratio 3, no qkv bias: a zero one here)
}
FFNS = ("mlp", "swiglu")
DROP_PATH_SCHEDULES = ("linear", "uniform")  # rate growing with depth from 0 (DINO) or the same everywhere
DROP_PATH_IMPLS = ("mask", "subset", "subset_triton")  # see Block
POS_EMBED_INITS = ("random", "sincos")
POS_EMBEDS = ("learned", "rope")


def key_bias_keep(dim: int, masked: bool = True) -> Tensor:
    """(3 dim,) factors of a qkv bias over q, k, v: 1, 0, 1 (DINOv3's mask_k_bias), or all 1 unmasked."""
    keep = torch.ones(3, dim)
    if masked:
        keep[1] = 0.0
    return keep.flatten()


class Attention(nn.Module):
    """Multi-head self-attention; attn_impl: auto (Triton on CUDA, else sdpa), triton, sdpa or ref."""

    def __init__(self, dim: int, num_heads: int, attn_impl: str = "sdpa", mask_k_bias: bool = False):
        super().__init__()
        self.num_heads, self.attn_impl = num_heads, attn_impl
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # DINOv3's mask_k_bias: the key bias multiplied by 0. Without RoPE it adds q . b_k to every score of a
        # query, which softmax ignores; with RoPE b_k turns with the key's position and would add a term that
        # depends on the position alone. Not saved: the weight files keep it as qkv.bias_mask (weights.py)
        self.register_buffer("k_bias_keep", key_bias_keep(dim) if mask_k_bias else None, persistent=False)

    def forward(
        self,
        x: Tensor,
        return_attention: bool = False,
        packing: Packing | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        # one fused (..., 3, H, D) tensor: attention_qkv splits it into q, k, v as views, and with Triton its
        # gradient comes back whole (no concatenation of three gradients in the backward)
        bias = self.qkv.bias if self.k_bias_keep is None else self.qkv.bias * self.k_bias_keep
        qkv = F.linear(x, self.qkv.weight, bias).unflatten(-1, (3, self.num_heads, -1))
        if rope is not None:  # RoPE (DINOv3): q and k of the patch tokens rotated by their positions
            qkv = rotate_qk(qkv, rope)
        if packing is not None:  # x: (T, C), every crop's tokens back to back; each crop attends on its own
            out = attention_qkv(qkv, self.attn_impl, packing.cu_seqlens, packing.max_seqlen, packing.lengths)
        elif return_attention:  # the (B, H, N, N) attention itself: for maps only, never in training
            q, k, _ = rearrange(qkv, "b n three h d -> three b h n d")
            return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
        else:
            out = attention_qkv(qkv, self.attn_impl)  # (B, N, H, D)
        return self.proj(out.flatten(-2))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(ls1(attn(norm1 x))), then the same with the MLP.

    Stochastic depth, `drop_path_impl`: `mask` multiplies the branch output of dropped samples by 0 (classic);
    `subset` runs the branch on the kept samples only and adds it back scaled by B / B_kept (DINOv2's
    efficient version, PyTorch index_add); `subset_triton` does that update with the fused kernel
    (kernels/drop_path.py). On packed crops, `subset` and `subset_triton` keep sequences per crop size
    (`packed_subset`) and add back with index_add.
    """

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, cfg: ModelConfig | None = None):
        """cfg: the model's options (layerscale, ffn and ffn_ratio, attn_impl, drop_path_impl, norm_eps, ...)."""
        super().__init__()
        c = cfg or ModelConfig()
        self.norm1 = LayerNorm(dim, eps=c.norm_eps)
        self.attn = Attention(dim, num_heads, c.attn_impl, c.mask_k_bias)
        self.ls1 = LayerScale(dim, c.layerscale, c.bf16_residual) if c.layerscale else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=c.norm_eps)
        self.mlp = (SwiGLU if c.ffn == "swiglu" else Mlp)(dim, int(dim * c.ffn_ratio))
        self.ls2 = LayerScale(dim, c.layerscale, c.bf16_residual) if c.layerscale else nn.Identity()
        self.drop_path, self.drop_path_impl = drop_path, c.drop_path_impl

    def residual(self, x: Tensor, branch, ls: nn.Module, packing: Packing | None = None) -> Tensor:
        """x + the scaled branch, with stochastic depth; branch(tokens, packing of those tokens, the rows of
        x they are when packed and a subset: None for all)."""
        if not self.training or self.drop_path == 0.0:
            return x + ls(branch(x, packing, None))
        if self.drop_path_impl == "mask":
            return x + drop_path(ls(branch(x, packing, None)), self.drop_path, True, packing)
        if packing is not None:  # (T, C): whole sequences kept per crop size, added back token by token
            index, scale, kept_packing = packed_subset(packing, self.drop_path)
            y = ls(branch(x[index], kept_packing, index))
            return torch.index_add(x, 0, index, (y * scale[:, None].to(y.dtype)).to(x.dtype))  # += s gamma y
        B = x.shape[0]
        n_keep = kept_count(B, self.drop_path)
        kept = torch.randperm(B, device=x.device)[:n_keep]
        gamma = ls.gamma if isinstance(ls, LayerScale) else None
        impl = "auto" if self.drop_path_impl == "subset_triton" else "ref"
        y = branch(x[kept], None, None)
        return drop_add(x, y, kept, B / n_keep, gamma, impl)  # x[kept] += B/B_kept * gamma * y

    def forward(self, x: Tensor, packing: Packing | None = None, rope: tuple | None = None) -> Tensor:
        """rope: (sin, cos), (N, 1, D) shared by the batch or (T, 1, D) per packed token; None without RoPE."""

        def attn(t: Tensor, pk: Packing | None, rows: Tensor | None) -> Tensor:
            r = rope if rope is None or rows is None else (rope[0][rows], rope[1][rows])
            return self.attn(self.norm1(t), packing=pk, rope=r)

        x = self.residual(x, attn, self.ls1, packing)
        return self.residual(x, lambda t, pk, rows: self.mlp(self.norm2(t)), self.ls2, packing)


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to `dim` (one strided conv)."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b c h w -> b (h w) c")  # (B, N, C)


class VisionTransformer(nn.Module):
    """The backbone described by a `ModelConfig` (config.py; every field is commented there)."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown arch {cfg.arch!r}: expected one of {', '.join(ARCHS)}")
        dim, depth, heads = ARCHS[cfg.arch]
        self.embed_dim, self.num_heads, self.patch_size = dim, heads, cfg.patch_size
        self.n_registers, self.pack_crops = cfg.n_registers, cfg.pack_crops
        self.bf16_residual = cfg.bf16_residual
        self.interpolate_offset, self.interpolate_antialias = (
            cfg.interpolate_offset,
            cfg.interpolate_antialias,
        )
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        n_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed, self.rope_embed = None, None  # registers get no position
        if cfg.pos_embed == "rope":  # rotary positions (DINOv3): no table, q and k rotated in every block
            self.rope_embed = RopePositions(dim // heads, cfg)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.n_registers, dim)) if cfg.n_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # iBOT: replaces masked patch embeddings
        if cfg.drop_path_schedule == "linear":
            rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]
        else:
            rates = [cfg.drop_path] * depth
        self.blocks = nn.ModuleList(Block(dim, heads, r, cfg) for r in rates)
        self.norm = LayerNorm(dim, eps=cfg.norm_eps)
        # DINOv3's untied final norms: CLS and registers apart from the patches; the local crops' CLS apart
        # from the global crops' (training only: evaluation sees global views)
        self.cls_norm = LayerNorm(dim, eps=cfg.norm_eps) if cfg.untie_cls_norm else None
        self.local_cls_norm = LayerNorm(dim, eps=cfg.norm_eps) if cfg.untie_local_cls_norm else None
        self._init_weights(cfg.pos_embed_init)

    def _init_weights(self, pos_embed_init: str) -> None:
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.pos_embed is not None and pos_embed_init == "sincos":  # learnt; only the start changes
            with torch.no_grad():
                self.pos_embed[0, 1:] = sincos_2d(int(math.sqrt(self.pos_embed.shape[1] - 1)), self.embed_dim)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_attn_impl(self, impl: str) -> None:
        for blk in self.blocks:
            blk.attn.attn_impl = impl

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embeddings for an h x w patch grid: the stored n x n grid resized as the code the weights
        come from resizes it (`resize_pos_embed`, with this model's offset and antialias), in fp32."""
        n = math.isqrt(self.pos_embed.shape[1] - 1)
        if (h, w) == (n, n):
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, h, w, self.interpolate_offset, self.interpolate_antialias)

    def fit_pos_embed(self, pos_embed: Tensor) -> Tensor:
        """A position table (1, 1 + m*m, C) of another grid resized once to this model's own grid, by this
        model's rule: the model then computes at its size what the other did by resizing on every forward."""
        if self.pos_embed is None or pos_embed.shape == self.pos_embed.shape:
            return pos_embed
        n = math.isqrt(self.pos_embed.shape[1] - 1)
        return resize_pos_embed(pos_embed, n, n, self.interpolate_offset, self.interpolate_antialias)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Image (B, 3, H, W) -> tokens (B, 1 + R + N, C): [CLS, registers, patches] with positions.

        masks: optional bool (B, N); True patches are replaced by the mask token before positions are added.
        With `bf16_residual`, the tokens keep the patch embedding's dtype (bf16 under autocast): the fp32 CLS
        token, positions and registers are cast to it instead of promoting the whole stream to fp32.
        """
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:  # the patch embedding would drop the remainder
            raise ValueError(f"image size {H} x {W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (B, N, C)
        dtype = x.dtype if self.bf16_residual else torch.promote_types(x.dtype, self.cls_token.dtype)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(dtype), x.to(dtype)], dim=1)  # (B, 1 + N, C)
        if self.pos_embed is not None:  # with RoPE the positions act inside attention instead
            x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size).to(dtype)
        if self.register_tokens is not None:  # after the CLS token, with no position (Darcet et al.)
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(dtype), x[:, 1:]], dim=1)
        return x

    def ropes(self, image: Tensor) -> Iterator[tuple[Tensor, Tensor] | None]:
        """RoPE's (sin, cos) for the tokens of images like `image`, (1 + R + N, 1, D), one per block (zip it
        with the blocks); None without RoPE. While the coordinates are augmented each block draws its own, as
        DINOv3 does; otherwise one table serves every block."""
        if self.rope_embed is None:
            return itertools.repeat(None)
        h, w = image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size
        if self.rope_embed.augments:
            return (self.rope_embed.tokens(h, w, 1 + self.n_registers) for _ in self.blocks)
        return itertools.repeat(self.rope_embed.tokens(h, w, 1 + self.n_registers))

    def forward_features(
        self, x: Tensor, masks: Tensor | None = None, local: bool = False
    ) -> dict[str, Tensor]:
        """One resolution: returns {'cls': (B, C), 'patch': (B, N, C)} after the final norm(s); `local`: the
        crops are local ones (their own CLS norm with `untie_local_cls_norm`)."""
        image, x = x, self.prepare_tokens(x, masks)
        for blk, rope in zip(self.blocks, self.ropes(image)):
            x = blk(x, rope=rope)
        return self._outputs(self.normed(x, local))

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """The tokens after each of the last n blocks, each through the final norm: (B, 1 + R + N, C) each,
        oldest first (what DINO's linear evaluation reads)."""
        image, x, out = x, self.prepare_tokens(x), []
        for i, (blk, rope) in enumerate(zip(self.blocks, self.ropes(image))):
            x = blk(x, rope=rope)
            if i >= len(self.blocks) - n:
                out.append(self.normed(x))
        return out

    def normed(self, x: Tensor, local: bool = False) -> Tensor:
        """The final norm; with DINOv3's untied norms, CLS and registers go through their own."""
        local_own = local and self.training and self.local_cls_norm is not None
        cls_norm = self.local_cls_norm if local_own else self.cls_norm
        if cls_norm is None:
            return self.norm(x)
        prefix = 1 + self.n_registers
        return torch.cat([cls_norm(x[..., :prefix, :]), self.norm(x[..., prefix:, :])], dim=-2)

    def _outputs(self, x: Tensor) -> dict[str, Tensor]:
        return {"cls": x[:, 0], "patch": x[:, 1 + self.n_registers :]}  # registers are dropped

    def forward(self, crops: Tensor | list[Tensor], masks: list[Tensor | None] | None = None) -> list[dict]:
        """A list of crops (each (B, 3, H, W)) -> one features dict per crop.

        Consecutive crops of equal size are concatenated and run as one batch (DINO's multi-crop trick): with
        2 global + 10 local crops the backbone runs twice, not twelve times. With `pack_crops`, it runs once:
        see `packing.forward_packed`.
        """
        if isinstance(crops, Tensor):
            crops = [crops]
        masks = masks if masks is not None else [None] * len(crops)
        groups, i = [], 0  # (crops of one size as one batch, their masks, batch size of each crop)
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            groups.append(
                (
                    torch.cat(crops[i:j]),
                    self._cat_masks(crops[i:j], masks[i:j]),
                    [c.shape[0] for c in crops[i:j]],
                )
            )
            i = j
        if self.pack_crops and len(groups) > 1:
            feats = forward_packed(self, [(x, m) for x, m, _ in groups])
        else:  # the groups after the first are local crops (DINOv3's untied local CLS norm)
            feats = [self.forward_features(x, m, local=i > 0) for i, (x, m, _) in enumerate(groups)]
        out = []
        for f, (_, _, sizes) in zip(feats, groups):
            out += [dict(zip(f, parts)) for parts in zip(*(f[k].split(sizes) for k in f))]
        return out

    def _cat_masks(self, crops: list[Tensor], masks: list[Tensor | None]) -> Tensor | None:
        """Masks of same-size crops as one (sum B, N) bool tensor; None entries become all-False."""
        if all(m is None for m in masks):
            return None
        n = (crops[0].shape[-2] // self.patch_size) * (crops[0].shape[-1] // self.patch_size)
        return torch.cat(
            [
                m if m is not None else torch.zeros(c.shape[0], n, dtype=torch.bool, device=c.device)
                for c, m in zip(crops, masks)
            ]
        )

    @torch.no_grad()
    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Attention of the last block, (B, H, T, T) with T = 1 + R + N; computed only on request."""
        ropes, x = self.ropes(x), self.prepare_tokens(x)
        for blk, rope in zip(self.blocks[:-1], ropes):
            x = blk(x, rope=rope)
        return self.blocks[-1].attn(self.blocks[-1].norm1(x), return_attention=True, rope=next(ropes))
