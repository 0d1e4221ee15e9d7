"""Crops of several sizes as one packed token batch, and stochastic depth on plain and packed batches.

DINO's multi-crop gives each step crops of two sizes (2 global, n local). The ViT can run them as one (T, C)
tensor of every crop's tokens back to back (`--model.pack_crops`): the token-wise layers see one large batch
and the varlen attention kernel keeps each crop to itself. `Packing` says where each crop lies.

Stochastic depth (Huang et al. 2016, arXiv 1603.09382) drops a residual branch per sample: `drop_path`
(the classic mask), `kept_count` and `packed_subset` (DINOv2's efficient version, which runs the branch on
the kept samples only; on packed crops, whole sequences per crop size). Its random draws come from torch's
global generator, seeded for each training step by `seeds.step_draws`.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels.attention_host import packed_offsets
from .rope import packed_rope


@dataclass
class Packing:
    """Where each sequence lies when crops of all sizes are packed into one (T, C) token tensor."""

    cu_seqlens: Tensor  # (S + 1,) int32 offsets: sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    max_seqlen: int
    seq_ids: Tensor  # (T,) which sequence each token belongs to (for per-sample stochastic depth)
    lengths: list[int]  # the host's copy of the lengths: the PyTorch attention path needs no read-back
    runs: list[tuple[int, int, int]]  # (first token, sequences, length) of each run of equal lengths

    @classmethod
    def from_lengths(cls, lengths: list[int], device) -> Packing:
        """Built once per crop layout and device (the layout repeats every step): no host-to-device copy per
        step, and the same device buffers every step (what CUDA graphs want)."""
        if torch.compiler.is_compiling():  # traced once into the graph: its buffers become the graph's own
            return cls._build(tuple(lengths), torch.device(device))
        return cls._cached(tuple(lengths), torch.device(device))

    @classmethod
    def _build(cls, lengths: tuple[int, ...], device: torch.device) -> Packing:
        cu, longest = packed_offsets(list(lengths), device)
        # from the offsets already on the device; output_size spares a device-to-host sync for the length
        ids = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), cu.diff(), output_size=sum(lengths)
        )
        runs, start = [], 0
        for n, group in itertools.groupby(lengths):
            count = len(list(group))
            runs.append((start, count, n))
            start += count * n
        return cls(cu, longest, ids, list(lengths), runs)

    @classmethod
    @functools.lru_cache(maxsize=8)
    def _cached(cls, lengths: tuple[int, ...], device: torch.device) -> Packing:
        return cls._build(lengths, device)


def drop_path(x: Tensor, p: float, training: bool, packing: Packing | None = None) -> Tensor:
    """Stochastic depth (Huang et al. 2016): zero the branch of a random subset of samples, scale the rest by
    1/(1-p) so the expectation is unchanged. x: (B, N, C), or packed (T, C) with one draw per sequence."""
    if p == 0.0 or not training:
        return x
    if packing is not None:
        keep = x.new_empty(packing.cu_seqlens.numel() - 1).bernoulli_(1 - p).div_(1 - p)  # (S,)
        return x * keep[packing.seq_ids, None]  # (T, C): one pass over the branch output
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p).div_(1 - p)  # (B, 1, 1): 0 or 1 / (1 - p)
    return x * keep


def kept_count(n: int, p: float) -> int:
    """How many of n samples efficient stochastic depth keeps at drop rate p: floored, at least one (as
    DINOv2's layers/block.py)."""
    return max(1, int(n * (1 - p)))


def packed_subset(packing: Packing, p: float) -> tuple[Tensor, Tensor, Packing]:
    """Efficient stochastic depth on packed crops: in each run of equal-length crops (the B global crops,
    the 10 B local ones) keep `kept_count(count, p)` sequences at random. Returns the kept tokens' positions
    (T_kept,), each kept token's scale count / kept of its run (DINOv2's B / B_kept), and the packing of the
    kept sequences, whose layout is the same every step (its offsets are built once)."""
    device = packing.seq_ids.device
    index, scale, lengths = [], [], []
    for start, count, n in packing.runs:
        keep = kept_count(count, p)
        kept = torch.randperm(count, device=device)[:keep]  # (keep,) sequences of this run
        index.append((start + kept[:, None] * n + torch.arange(n, device=device)).flatten())
        scale.append(torch.full((keep * n,), count / keep, device=device))
        lengths += [n] * keep
    return torch.cat(index), torch.cat(scale), Packing.from_lengths(lengths, device)


def forward_packed(vit, groups: list[tuple[Tensor, Tensor | None]]) -> list[dict[str, Tensor]]:
    """A `VisionTransformer` over crops of all resolutions in one pass (`--model.pack_crops`). The tokens of
    every crop are concatenated into one (T, C) tensor; the token-wise layers (norms, qkv, MLP) see one big
    batch, and attention keeps each crop to itself through the packed (varlen) kernel. groups: (crops of one
    size, their masks); the same outputs as one `vit.forward_features` per group."""
    tokens = [vit.prepare_tokens(x, m) for x, m in groups]  # each (B_g, N_g, C)
    lengths = [t.shape[1] for t in tokens for _ in range(t.shape[0])]
    packing = Packing.from_lengths(lengths, tokens[0].device)
    x = torch.cat([t.flatten(0, 1) for t in tokens])  # (T, C), T = sum of B_g * N_g
    batch_sizes = [t.shape[0] for t in tokens]
    ropes = [vit.ropes(image) for image, _ in groups]  # RoPE: each crop size's angles, per block
    for blk, *tables in zip(vit.blocks, *ropes):
        x = blk(x, packing, None if tables[0] is None else packed_rope(tables, batch_sizes))
    parts = x.split([t.shape[0] * t.shape[1] for t in tokens])
    return [
        vit._outputs(vit.normed(part.view(t.shape), local=i > 0))
        for i, (part, t) in enumerate(zip(parts, tokens))
    ]  # (B_g, N_g, C) each
