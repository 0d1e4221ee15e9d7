"""A copy-detection descriptor for deduplication, trained on the pool itself (SSCD, Pizzi et al. 2022, arXiv
2202.10261, is what DINOv2 App. A deduplicates LVD-142M with).

Why not the DINO features themselves: DINO is trained to give two crops of one image, under colour jitter,
the same CLS token, so it keeps the concept and drops what tells one picture from another of the same concept
(its colours, the place of the object). Copy detection needs the opposite: an image and its edited copies
close, any two different images apart, however alike their content. SSCD gets that by contrastive training:

    views   two random edits of each of B pool images (crop and resize back, shift, mirror, colour, JPEG: the
            edits a copy goes through on the web), 2B images in a batch
    loss    InfoNCE over the batch, each view against its partner with the other 2B - 2 as negatives,
            temperature 0.05 (SSCD), plus lambda x the differential-entropy term -mean log(distance to the
            nearest negative) (SSCD's regulariser, the KoLeo estimator of minidino/koleo.py on negatives only)

Here the network is the self-supervised backbone itself (fine-tuned: it starts from what DINO learnt) with a
linear projection of [CLS, patch tokens averaged per quarter] to `dim` features. Differences from SSCD, with their reasons:
a ViT and AdamW instead of a ResNet-50 and LARS (AdamW is how every ViT in this project is trained);
lambda = 3, not 30 (SSCD's authors say 30 is unstable outside their exact setting and suggest 10 for new
ones; with minidino's ViT-nano 3 was the value measured, benchmarks/README.md); a few hundred steps on the pool
to curate instead of 100 epochs on a million DISC images; and the images are enlarged so the backbone sees at
least 8 x 8 patches (`descriptor_size`): on 4 x 4 patches a 1 px shift changes every token.

At search time (`CopyDescriptor.search`) an image's descriptor is the sum of those of the image and of four
copies of it shifted by 1/32 of the side, each also mirrored: a mirrored copy then matches exactly, and a copy
that is shifted or cropped a little lands nearer its original. SSCD compares single views; the ten views cost
5x the embedding time of a mirrored pair, which is still little next to training, and raise precision and
recall on benchmarks/curation.py by a few points (benchmarks/README.md).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from ..augment import eval_transform
from ..data import load_rgb
from ..schedules import linear_warmup

TEMPERATURE = 0.05  # SSCD's InfoNCE temperature
SEARCH_SHIFT = 1 / 32  # of the side: the shifted views of CopyDescriptor.search
ENTROPY_WEIGHT = 3.0  # SSCD: 30 (10 suggested for new set-ups); see the module docstring


def descriptor_size(eval_size: int, patch_size: int) -> int:
    """The side images are enlarged to for copy detection: the backbone's eval size, or as much as gives
    8 x 8 patches if that is more (32 px with 8 px patches -> 64)."""
    return max(eval_size, 8 * patch_size)


def crop_resized(img: Image.Image, rng: np.random.Generator, low: float, high: float) -> Image.Image:
    """A random crop of `low`-`high` of each side (one fraction for both), resized back to the image's size."""
    w, h = img.size
    side = rng.uniform(low, high)
    cw, ch = max(1, round(w * side)), max(1, round(h * side))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)


def rolled(img: Image.Image, dy: int, dx: int) -> Image.Image:
    """The image shifted circularly by dy rows and dx columns (what leaves the right edge re-enters on the left)."""
    return Image.fromarray(np.roll(np.asarray(img), (dy, dx), axis=(0, 1)))


def jpeg_reencoded(img: Image.Image, quality: int) -> Image.Image:
    """The image saved as JPEG at `quality` and read back."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def random_edit(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random copy edit of a PIL image: each of crop-and-resize (75-100 % of the side), a circular shift of
    up to 1/10 of the side, mirror, colour (brightness, contrast, saturation +-25 %) and JPEG re-encoding
    (quality 40-95) is applied with probability 1/2, in that order. Wider than the edits the benchmark's pools
    inject (minidino/curation/pools.py), so those are inside what was trained."""
    if rng.random() < 0.5:
        img = crop_resized(img, rng, 0.75, 1.0)
    if rng.random() < 0.5:
        most = max(1, round(0.1 * min(img.size)))
        img = rolled(img, *(int(rng.integers(-most, most + 1)) for _ in range(2)))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(rng.uniform(0.75, 1.25))
    if rng.random() < 0.5:
        img = jpeg_reencoded(img, int(rng.integers(40, 96)))
    return img


class _EditedPairs(Dataset):
    """Two random edits of pool image i, at the descriptor's size (the paths are readable ones)."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.transform = paths, eval_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        # torch's generator, seeded by train_descriptor (and by DataLoader in each worker): repeatable runs
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        img = load_rgb(self.paths[i])
        return self.transform(random_edit(img, rng)), self.transform(random_edit(img, rng))


class CopyDescriptor(nn.Module):
    """backbone -> [CLS, patch tokens averaged over each quarter of the image] -> linear -> L2-normalised
    (B, dim). The quarters keep where things are (a copy keeps its layout; two images of one colour rarely
    share it) yet move little under a shift of a few pixels."""

    def __init__(self, backbone: nn.Module, dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(5 * backbone.embed_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone(x)[0]
        b, n, c = out["patch"].shape
        side = math.isqrt(n)  # square inputs (eval_transform crops them so)
        grid = out["patch"].transpose(1, 2).reshape(b, c, side, side)
        quarters = F.adaptive_avg_pool2d(grid, 2).flatten(1)  # (B, 4C)
        z = self.proj(torch.cat([out["cls"], quarters], dim=-1).float())
        return F.normalize(z, dim=-1)

    @torch.no_grad()
    def search(self, x: Tensor) -> Tensor:
        """The descriptor images are compared by, (B, dim) L2-normalised: the sum of forward() over the
        image and the image rolled by SEARCH_SHIFT of the side up, down, left and right, each also mirrored.
        That set of views mirrors into itself, so a mirror image gets exactly the same descriptor."""
        s = max(1, round(SEARCH_SHIFT * x.shape[-1]))
        views = [x] + [x.roll(d, dims) for d in (s, -s) for dims in (-2, -1)]
        return F.normalize(sum(self(v).float() + self(v.flip(-1)).float() for v in views), dim=-1)


def sscd_loss(z: Tensor, temperature: float = TEMPERATURE, entropy_weight: float = ENTROPY_WEIGHT) -> dict:
    """z: (2B, D) L2-normalised, rows i and i + B two views of one image. {'loss', 'infonce', 'entropy'}."""
    n = z.shape[0]
    b = n // 2
    sims = z @ z.T
    partner = torch.arange(n, device=z.device).roll(b)  # i <-> i + B
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (sims / temperature).masked_fill(self_mask, -math.inf)
    infonce = F.cross_entropy(logits, partner)
    negatives = sims.masked_fill(self_mask, -2.0).scatter(1, partner[:, None], -2.0)
    nearest = negatives.max(dim=1).values  # the most similar other image, per view
    entropy = -torch.log((2 - 2 * nearest).clamp_min(1e-12).sqrt() + 1e-8).mean()
    return {"loss": infonce + entropy_weight * entropy, "infonce": infonce, "entropy": entropy}


def train_descriptor(
    backbone: nn.Module,
    paths: list[str],
    size: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device="cpu",
    num_workers: int = 0,
    dim: int = 128,
    entropy_weight: float = ENTROPY_WEIGHT,
) -> CopyDescriptor:
    """Fine-tune `backbone` (a copy is made) into a CopyDescriptor on edited pairs of `paths` (readable
    images): AdamW, lr for the backbone and 2 lr for the new projection, weight decay 1e-4, constant lr after a
    warm-up of steps / 10. Returns it in eval mode."""
    torch.manual_seed(seed)
    model = CopyDescriptor(copy.deepcopy(backbone), dim).to(device).train()
    opt = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": lr},
            {"params": model.proj.parameters(), "lr": 2 * lr},
        ],
        weight_decay=1e-4,
    )
    base = [g["lr"] for g in opt.param_groups]
    batch_size = min(batch_size, len(paths))
    sampler = RandomSampler(
        range(len(paths)),
        replacement=True,
        num_samples=steps * batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    loader = DataLoader(
        _EditedPairs(paths, size), batch_size, sampler=sampler, num_workers=num_workers, drop_last=True
    )
    warmup = max(1, steps // 10)
    bar = tqdm(loader, total=steps, desc="copy descriptor", leave=False, dynamic_ncols=True)
    for step, (a, b) in enumerate(bar):
        for g, lr0 in zip(opt.param_groups, base):
            g["lr"] = linear_warmup(step + 1, warmup, 0.0, lr0)
        out = sscd_loss(model(torch.cat([a, b]).to(device)), entropy_weight=entropy_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(infonce=f"{out['infonce'].item():.3f}", entropy=f"{out['entropy'].item():.3f}")
    return model.eval()
