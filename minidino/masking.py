"""Block-wise masking for the iBOT objective (BEiT, Bao et al. 2021, arXiv 2106.08254, Alg. 1; iBOT, Zhou et
al. 2021, arXiv 2111.07832; DINOv2, arXiv 2304.07193, Sec. 4).

A mask is grown from random rectangles ("blocks") until it covers the target number of patches: each block
has an area of at least `min_block` patches and an aspect ratio in [0.3, 1/0.3], and is placed at random;
a block is kept only if it adds new patches without overshooting the target. Blocks hide whole object parts,
which makes predicting the masked tokens a semantic task rather than an interpolation of neighbours.

DINOv2 masks exactly half of the global crops of a batch, with ratios spread over [0.1, 0.5]; the other crops
are unmasked.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import seeds


def block_mask(
    h: int,
    w: int,
    n_masked: int,
    g: torch.Generator,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 10,
) -> Tensor:
    """A (h, w) bool mask with about `n_masked` True patches, made of rectangular blocks."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])

    def rand(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    while mask.sum() < n_masked:
        remaining = n_masked - int(mask.sum())
        grew = False
        for _ in range(max_tries):
            area = rand(min_block, max(remaining, min_block))
            ratio = math.exp(rand(log_lo, log_hi))
            bh, bw = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if bh * bw < min_block or bh > h or bw > w:
                continue
            top = int(torch.randint(0, h - bh + 1, (), generator=g))
            left = int(torch.randint(0, w - bw + 1, (), generator=g))
            new = int((~mask[top : top + bh, left : left + bw]).sum())
            if 0 < new <= remaining:
                mask[top : top + bh, left : left + bw] = True
                grew = True
                break
        if not grew:  # no block fits the remaining budget: stop a little short of the target
            break
    return mask


def ibot_masks(
    n_images: int,
    h: int,
    w: int,
    g: torch.Generator,
    ratio: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    min_block: int = 4,
) -> Tensor:
    """Masks (n_images, h * w) for the global crops of a batch, as DINOv2's collate function draws them:
    exactly int(n_images * probability) crops are masked, with stratified ratios (the k-th of the m masked
    crops masks int(h * w * r) patches, r uniform in the k-th of m equal bins of `ratio`, so that every batch
    spans the whole range); which crops get which mask is a random permutation; the others are unmasked."""
    n_masked = int(n_images * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked + 1).tolist()
    masks = torch.zeros(n_images, h * w, dtype=torch.bool)
    crops = torch.randperm(n_images, generator=g).tolist()
    for k in range(n_masked):
        r = edges[k] + (edges[k + 1] - edges[k]) * torch.rand((), generator=g).item()
        masks[crops[k]] = block_mask(h, w, int(h * w * r), g, min_block).flatten()
    return masks


@dataclass
class StepMasks:
    """The iBOT masks of one training step, ready for `train_step`. `indices` and `weights` are what the patch
    loss reads: computed on the CPU where the masks are drawn, so on the device the masked patches are
    gathered by index (`index_select`), whose output size the host already knows. A boolean gather
    (`tokens[masks]`) would make the host wait for the device to count the True entries, every step."""

    student: list[Tensor | None] | None  # per crop: patches the student sees as the mask token (None: none)
    patches: Tensor | None  # (2B, N) bool: patches of the two global crops that go into the patch loss
    indices: Tensor | None = None  # (M,) int64: where those M patches are in patches.flatten(), in order
    weights: Tensor | None = None  # (M,) 1 / the masked count of its crop: the per-crop mean of the loss
    valid: Tensor | None = None  # padded buffers only: (M,) bool, False for the padding after the M patches

    @classmethod
    def of(cls, patches: Tensor | None, student: bool = True, n_crops: int = 2, size: int = 0) -> StepMasks:
        """From (2B, N) bool masks; `student`: the student sees them too (not in distillation). Meant for CPU
        masks (the workers'); on device masks (train.micro_batches) `nonzero` reads the count back.

        size: pad `indices` and `weights` to this fixed length (an upper bound of the masked count, see
        `upper_bound`), as DINOv2's collate does: the padding points at patch 0 with weight 0 and `valid`
        False, so every step has the same shapes (what CUDA graphs need) and the losses are unchanged."""
        if patches is None:
            return cls(None, None)
        counts = patches.sum(1)  # (2B,)
        indices = patches.flatten().nonzero().squeeze(1)
        weights = (1.0 / counts.clamp(min=1)).repeat_interleave(counts, output_size=len(indices))
        per_crop = list(patches.chunk(2)) + [None] * (n_crops - 2) if student else None
        if not size:
            return cls(per_crop, patches, indices, weights)
        m = len(indices)
        if m > size:
            raise ValueError(f"{m} masked patches do not fit the buffer of {size}")
        pad = size - m
        valid = torch.arange(size) < m
        return cls(per_crop, patches, F.pad(indices, (0, pad)), F.pad(weights, (0, pad)), valid)

    def to(self, device, non_blocking: bool = True) -> StepMasks:
        """On `device` (no stream sync: see attention_host.packed_offsets)."""
        if self.patches is None:
            return self
        patches, indices, weights = (
            t.to(device, non_blocking=non_blocking) for t in (self.patches, self.indices, self.weights)
        )
        valid = None if self.valid is None else self.valid.to(device, non_blocking=non_blocking)
        student = None if self.student is None else list(patches.chunk(2)) + [None] * (len(self.student) - 2)
        return StepMasks(student, patches, indices, weights, valid)


def upper_bound(
    n_images: int, n_local: int, n_patches: int, ratio: tuple[float, float], probability: float
) -> int:
    """The most patches `ibot_masks` can mask among the n_local of its n_images crops that one process
    keeps: the k-th masked crop masks at most int(n_patches * the top of the k-th ratio bin), and a process
    may get the largest of them (DINOv2's collate sums the same per-crop maxima for its upper bound)."""
    n_masked = int(n_images * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked + 1).tolist()
    most = sorted((int(n_patches * e) for e in edges[1:]), reverse=True)
    return sum(most[:n_local])


def step_masks(cfg, b: int, step: int, rank: int = 0, world: int = 1, n_crops: int = 2) -> StepMasks:
    """The masks of a step of a `Config` for b images per process, on the CPU (`.to(device)`): drawn in
    the DataLoader workers with the step's batch (loader.run_loader).

    DINO (iBOT weight 0): none. DINOv2: block masks on the global crops, drawn for the global batch from the
    step's stream (seeds.masks, so resuming and the process count change nothing; DINOv2's collate draws them
    per GPU, so there exactly half of each process's crops are masked, here half of the global batch's);
    this process keeps its images' rows; the student sees them, and the masked patches go into the patch
    loss. None if no crop of the global batch got masked. With --run.cuda_graphs the index buffers are padded
    to `upper_bound`. Distillation (DINOv2 Sec. 5): the student's input is not masked and every patch of the
    global crops goes into the patch loss.
    """
    if not cfg.loss.ibot_weight:
        return StepMasks(None, None)
    side = cfg.data.global_crops_size // cfg.model.patch_size
    if cfg.run.distill_from:
        return StepMasks.of(torch.ones(2 * b, side * side, dtype=torch.bool), student=False)
    g = seeds.masks(cfg.run.seed, step)
    ratio, probability = cfg.loss.mask_ratio, cfg.loss.mask_probability
    masks = ibot_masks(2 * b * world, side, side, g, ratio, probability)
    if not masks.any():  # decided on the global batch, so every process takes the same branch
        return StepMasks(None, None)
    masks = masks.view(2, world, b, -1)[:, rank].reshape(2 * b, -1)  # (crop, process, image, N) -> ours
    # --run.cuda_graphs: buffers of one size every step (a graph replays fixed shapes)
    size = upper_bound(2 * b * world, 2 * b, side * side, ratio, probability) if cfg.run.cuda_graphs else 0
    return StepMasks.of(masks, n_crops=n_crops, size=size)
