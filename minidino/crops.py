"""Multi-crop for real photos, in two halves: geometry in the DataLoader workers, colour on the device.

`augment.MultiCropAugmentation` is the readable reference: per image, on PIL images, everything in the
workers. On ImageNet-like JPEGs it costs ~45 ms per image on one core (most of it the Gaussian blur, which
torchvision runs as a dense 2-D convolution, and the float tensors it sends), so a GPU would wait for data.
This path (`--data.augment=crops`) gives the same views from the same distributions, split where it is
cheapest:

    worker, per image (uint8)                           device, per batch (float, no host sync)
    1. draw the 2 + n crop boxes on the original size    5. colour jitter (p 0.8) in a random order
       (RandomResizedCrop's rule) and the flips          6. grayscale (p 0.2)
    2. decode the JPEG at the smallest scale that        7. Gaussian blur (1.0 / 0.1 / 0.5), separable
       leaves every box its crop's pixels (PIL draft)    8. solarize (0.2, second global crop)
    3. cut and resize each box (bicubic, antialiased)    9. normalise
    4. draw every photometric parameter of every crop

The workers send uint8 crops (a quarter of the float bytes) and a small parameter table; the device half,
`colour`, only applies what the table says, so every random draw still depends on (seed, epoch, image)
alone (`loader.SeededViews`) and resuming stays exact. The table stays on the host: the rows each operation
applies to (blurred or not, which order of the jitter) are read from it there, so the device computes no
operation for a crop that does not get it and the host never waits for the device.

Where this differs from the reference: the crops are resized with torch's antialiased bicubic (made to
match PIL's, within one grey level), every operation works in float instead of rounding to uint8 after
each step as PIL does, and a JPEG decoded at a reduced scale is cut at box edges rounded outwards to the
reduced pixel grid (at most one reduced pixel wider).

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchMultiCrop,
    MultiCropAugmentation,
    blur_kernel,
    blur_sigma,
    gaussian_blur,
    gray,
    to_tensor_image,
)
from .config import DataConfig

AUGMENTS = ("crops", "batch", "pil")  # --data.augment: see `pipeline`

# the photometric parameter table: one row per crop, these columns
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, SIGMA, SOLARIZE = 0, 1, 2, 3, 4, 5, 9, 10, 11
N_PARAMS = 12  # ORDER takes 4 columns: the permutation of (brightness, contrast, saturation, hue) = (0..3)


# ----------------------------------------------------------------------------------------------------------
# Worker side: boxes, reduced decode, uint8 crops, parameters


def crop_box(width: int, height: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> tuple:
    """(top, left, h, w) of a random resized crop, by torchvision's RandomResizedCrop rule: up to 10 tries
    of an area share in `scale` and a log-uniform aspect ratio, rounded, kept if it fits; otherwise the
    largest centred box whose aspect ratio is within `ratio`. Draws from the global torch RNG."""
    area, log_lo, log_hi = width * height, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(()).item())
        aspect = math.exp(log_lo + (log_hi - log_lo) * torch.rand(()).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def reduction(boxes: list[tuple], sizes: list[int]) -> int:
    """The largest JPEG decode reduction (1, 2, 4 or 8: the scales libjpeg's DCT can skip to) that leaves
    every box at least its output size in both directions."""
    fits = [r for r in (8, 4, 2, 1) if all(min(h, w) // r >= s for (_, _, h, w), s in zip(boxes, sizes))]
    return fits[0] if fits else 1


def scaled_box(box: tuple, original: tuple[int, int], reduced: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box of the original image (width, height) in the pixels of a reduced decode, rounded outwards (and
    kept inside), so it never has fewer pixels than the original box divided by the reduction."""
    (top, left, h, w), sx, sy = box, reduced[0] / original[0], reduced[1] / original[1]
    t, b = math.floor(top * sy), min(math.ceil((top + h) * sy), reduced[1])
    lft, r = math.floor(left * sx), min(math.ceil((left + w) * sx), reduced[0])
    return t, lft, b - t, r - lft


class WorkerCrops:
    """The worker half: PIL image -> (list of uint8 crops (3, s, s), parameter table (2 + n, N_PARAMS)).

    `decode(path)` is what `data.ImageFiles` calls instead of a plain decode when this transform is in use:
    it reads the header, draws the boxes on the original size, and decodes at the reduced scale they allow.
    Images that are already in memory (shapes, CIFAR) go straight to `__call__`, which draws the boxes then.
    """

    def __init__(self, cfg: DataConfig | None = None):
        self.cfg = cfg = cfg or DataConfig()
        g, lc = (cfg.global_crops_size, cfg.global_crops_scale), (cfg.local_crops_size, cfg.local_crops_scale)
        # (size, area range, p blur, p solarize) per crop, in the order of the views
        self.kinds = [(*g, 1.0, 0.0), (*g, 0.1, 0.2)] + [(*lc, 0.5, 0.0)] * cfg.local_crops_number
        self.pending: tuple | None = None  # (original size, boxes) drawn by decode() for the next __call__
        # per crop: the blur's sigma range, p blur, p solarize; the jitter's factor ranges and identity
        self.kind_table = torch.tensor([(*blur_sigma(k[0]), k[2], k[3]) for k in self.kinds])
        self.factor_lo = torch.tensor([0.6, 0.6, 0.8, -cfg.hue])  # brightness, contrast, saturation, hue
        self.factor_hi = torch.tensor([1.4, 1.4, 1.2, cfg.hue])
        self.identity = torch.tensor([1.0, 1.0, 1.0, 0.0])

    def boxes(self, width: int, height: int) -> list[tuple]:
        return [crop_box(width, height, scale) for _, scale, _, _ in self.kinds]

    def decode(self, path: str) -> Image.Image:
        from .data import to_rgb

        img = Image.open(path)
        boxes = self.boxes(*img.size)
        self.pending = (img.size, boxes)
        r = reduction(boxes, [k[0] for k in self.kinds])
        if r > 1:  # JPEG only (a no-op for other formats): DCT scaling, 1/r of the pixels to decode
            img.draft("RGB", (math.ceil(img.width / r), math.ceil(img.height / r)))
        return to_rgb(img)

    def __call__(self, img: Image.Image) -> tuple[list[Tensor], Tensor]:
        original, boxes = self.pending or (img.size, self.boxes(*img.size))
        self.pending = None
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H, W), channels-last memory
        crops = []
        for box, (size, _, _, _) in zip(boxes, self.kinds):
            t, lft, h, w = box if img.size == original else scaled_box(box, original, img.size)
            part = pixels[None, :, t : t + h, lft : lft + w]
            crop = F.interpolate(part, size=(size, size), mode="bicubic", antialias=True)[0]
            crops.append(crop.flip(-1) if torch.rand(()) < 0.5 else crop)  # horizontal flip, p 0.5
        params = self.draw_params()
        return [c.contiguous() for c in crops], params

    def draw_params(self) -> Tensor:
        """The parameter table of one image's crops, drawn as torchvision's transforms draw them:
        ColorJitter (0.4, 0.4, 0.2, hue) with probability 0.8, its four operations in a random order;
        grayscale 0.2; blur (p per crop kind) with sigma uniform in `blur_sigma`; solarize (p per kind)."""
        n = len(self.kinds)
        u = torch.rand(n, 9)  # every uniform number of the table at once
        jitter = u[:, 0] < 0.8
        lo, hi = self.factor_lo, self.factor_hi
        factors = torch.where(jitter[:, None], lo + (hi - lo) * u[:, 1:5], self.identity)
        order = torch.rand(n, 4).argsort(dim=1)  # a uniform random permutation of the four operations
        sigma_lo, sigma_hi, p_blur, p_solarize = self.kind_table.unbind(1)
        sigma = (sigma_lo + (sigma_hi - sigma_lo) * u[:, 6]) * (u[:, 7] < p_blur)  # 0: no blur
        columns = [jitter[:, None], factors, order, (u[:, 5] < 0.2)[:, None], sigma[:, None]]
        return torch.cat([*columns, (u[:, 8] < p_solarize)[:, None]], dim=1).float()


def collate(items: list) -> tuple[dict, Tensor, Tensor]:
    """DataLoader collate of (WorkerCrops output, label, skipped) items -> (batch, labels, skipped), where
    batch holds, per crop size, the uint8 crops of all views stacked view after view ("global": (2B, 3,
    S, S), "local": (nB, 3, s, s)) and their parameter rows ((2B, N_PARAMS), (nB, N_PARAMS))."""
    crops, params = zip(*(x for x, _, _ in items))
    table, batch = torch.stack(params), {}  # (B, 2 + n, N_PARAMS)
    by_view = list(zip(*crops))  # per view: its B crops
    for name, views in (("global", slice(0, 2)), ("local", slice(2, None))):
        per_view = by_view[views]
        if per_view:
            batch[name] = {
                "crops": torch.stack([c for view in per_view for c in view]),
                "params": table[:, views].transpose(0, 1).reshape(-1, N_PARAMS),  # view-major, as the crops
            }
    labels = torch.tensor([label for _, label, _ in items])
    return batch, labels, torch.tensor([skipped for _, _, skipped in items])


# ----------------------------------------------------------------------------------------------------------
# Device side: the photometric operations of a table, on a stack of crops


# The four operations of the colour jitter, as torchvision defines them: blends clamped to [0, 1] with black
# (brightness), the mean gray level of the image (contrast), the gray level of the pixel (saturation), and a
# rotation of the hue in HSV. Comparisons are written as float arithmetic: bool tensors are several times
# slower than float ones in the CPU kernels, and these run on every pixel of every jittered crop.

LUMA = (0.299, 0.587, 0.114)  # augment.gray's weights (ITU-R 601)


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return x.mul_(f[:, None, None, None]).clamp_(0, 1)


def contrast(x: Tensor, f: Tensor) -> Tensor:
    mean_gray = (x.mean(dim=(2, 3)) @ x.new_tensor(LUMA))[:, None, None, None]  # = gray(x).mean()
    return torch.lerp(mean_gray, x, f[:, None, None, None]).clamp_(0, 1)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    return torch.lerp(gray(x), x, f[:, None, None, None]).clamp_(0, 1)


def _is_max(c: Tensor, top: Tensor) -> Tensor:  # 1.0 where channel c is the largest (c <= top), else 0.0
    return torch.sign(c - top).add_(1)


def _ramp(k: Tensor) -> Tensor:  # the HSV -> RGB ramp of one period: 0 -> 1 on [0, 1], 1 to 3, 1 -> 0 to 4
    return torch.minimum(k, 4 - k).clamp_(0, 1)


def hue(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate the hue by `turns` (a fraction of a turn, per row), keeping each pixel's value (max) and
    chroma (max - min): HSV's hue from the largest channel's sector, then the sector formula back."""
    r, g, b = x.unbind(1)
    top = torch.maximum(torch.maximum(r, g), b)
    chroma = top - torch.minimum(torch.minimum(r, g), b)
    # hue x chroma in sixths of a turn: red's sector, else green's, else blue's (torchvision's priority)
    blue_or_green = torch.lerp((r - g).add_(chroma, alpha=4), (b - r).add_(chroma, alpha=2), _is_max(g, top))
    h = torch.lerp(blue_or_green, g - b, _is_max(r, top))
    h = h.div_(chroma.clamp(min=1e-12)).add_(6 * turns[:, None, None])
    h = h.sub_(torch.floor(h / 6).mul_(6))  # the rotated hue, wrapped to [0, 6)
    k = h[:, None] + x.new_tensor([5.0, 3.0, 1.0])[:, None, None]  # per channel (R, G, B), in [1, 11)
    return torch.addcmul(top[:, None], chroma[:, None], torch.maximum(_ramp(k), _ramp(k - 6)), value=-1)


JITTER_OPS = (brightness, contrast, saturation, hue)  # the order of the ORDER and factor columns


def compiled_jitter_ops() -> tuple:
    """JITTER_OPS under torch.compile: each operation one fused loop over its crops' pixels (the hue: one
    instead of ~30 passes); dynamic shapes, so any number of rows reuses one compiled kernel. Compiled once
    per process (~1 min on a CPU, cached on disk by inductor for the next run)."""
    global _COMPILED_OPS
    if _COMPILED_OPS is None:
        _COMPILED_OPS = tuple(torch.compile(op, dynamic=True) for op in JITTER_OPS)
    return _COMPILED_OPS


_COMPILED_OPS = None


def jitter_groups(params: Tensor) -> list[tuple[tuple[int, ...], Tensor]]:
    """The jittered rows grouped by their order of the four operations: [(order, row indices), ...]."""
    jittered = params[:, JITTER] > 0
    orders = params[:, ORDER : ORDER + 4].long()
    found = torch.unique(orders[jittered], dim=0).tolist() if jittered.any() else []
    return [(tuple(o), (jittered & (orders == orders.new_tensor(o)).all(1)).nonzero()[:, 0]) for o in found]


def blur_rows(x: Tensor, idx: Tensor, sigma: Tensor) -> None:
    """Blur rows `idx` of x in place (`augment.gaussian_blur`, kernel +-3 sigma of the largest sigma). On
    the CPU in chunks of 8 or 16 rows, the last one padded with a repeated row: oneDNN builds a convolution
    kernel per input shape, and a new number of blurred rows in every batch would rebuild it every time
    (~3x slower); chunks also stay in cache."""
    n, k = len(idx), blur_kernel(x.shape[-1])
    if n == 0:
        return
    chunk = (8 if x.shape[-1] > 128 else 16) if x.device.type == "cpu" else n  # fastest on a 2-core box
    pad = -n % chunk  # the last row again (it is in the last chunk, so it is read before it is written)
    idx, sigma = torch.cat([idx, idx[-1:].expand(pad)]), torch.cat([sigma, sigma[-1:].expand(pad)])
    for i in range(0, n + pad, chunk):
        rows = idx[i : i + chunk]
        x.index_copy_(0, rows, gaussian_blur(x[rows], sigma[i : i + chunk], k))


def colour(crops: Tensor, params: Tensor, dtype=torch.float32, ops: tuple = JITTER_OPS) -> Tensor:
    """uint8 crops (N, 3, s, s) and their parameter rows (N, N_PARAMS) -> normalised crops in `dtype`;
    `ops`: the jitter's operations (JITTER_OPS, or `compiled_jitter_ops()`).

    The rows each operation applies to are found on `params`, which stays on the host (they come from the
    workers), so the device never waits: it gathers those rows, applies the operation, puts them back.
    """
    dev = crops.device

    def rows(mask: Tensor) -> Tensor:
        return mask.nonzero()[:, 0].to(dev, non_blocking=True)

    def on_device(t: Tensor) -> Tensor:
        return t.to(dev, non_blocking=True)

    x = crops.float().div_(255)
    for order, idx in jitter_groups(params):  # colour jitter, in each row's random order
        factors = on_device(params[idx, BRIGHTNESS : HUE + 1])
        idx = on_device(idx)
        y = x[idx]
        for op in order:
            y = ops[op](y, factors[:, op])
        x.index_copy_(0, idx, y)
    idx = rows(params[:, GRAY] > 0)
    x.index_copy_(0, idx, gray(x[idx]).expand(-1, 3, -1, -1))
    blurred = params[:, SIGMA] > 0
    blur_rows(x, rows(blurred), on_device(params[blurred, SIGMA]))
    idx = rows(params[:, SOLARIZE] > 0)
    y = x[idx]
    x.index_copy_(0, idx, torch.where(y >= 128 / 255, 1 - y, y))
    mean, std = x.new_tensor(IMAGENET_MEAN)[:, None, None], x.new_tensor(IMAGENET_STD)[:, None, None]
    return x.sub_(mean).div_(std).to(dtype)  # in place: a new tensor of this size would cost page faults


def to_views(batch: dict, device: torch.device, dtype=torch.float32, compiled: bool = False) -> list[Tensor]:
    """A collated batch -> the 2 + n views on `device`, each (B, 3, s, s), normalised."""
    views, n_images = [], len(batch["global"]["params"]) // 2
    ops = compiled_jitter_ops() if compiled else JITTER_OPS
    for part in batch.values():
        x = colour(part["crops"].to(device, non_blocking=True), part["params"], dtype, ops)
        views += list(x.split(n_images))
    return views


# ----------------------------------------------------------------------------------------------------------
# The three ways to make the training views


class Pipeline(NamedTuple):
    per_image: Callable  # applied to each image in the DataLoader workers (loader.SeededViews)
    collate: Callable  # the workers' collate function
    on_device: Callable  # (batch, device, generator) -> the 2 + n views, each (B, 3, s, s), on the device


def pipeline(data: DataConfig, compiled: bool = False) -> Pipeline:
    """The training views of `--data.augment`:
    pil    the reference: every operation per image on PIL images in the workers (MultiCropAugmentation)
    batch  whole images to the device, cropped and coloured there per batch with one generator drawn from
           (seed, step, process) (BatchMultiCrop): for data sets of small equal-size images (shapes, CIFAR)
    crops  this file: uint8 crops of the original image from the workers, colour per batch on the device
           (with `compiled` (--run.compile), the jitter operations under torch.compile)
    """
    if data.augment == "pil":
        return Pipeline(
            MultiCropAugmentation(data),
            default_collate,
            lambda batch, device, g: [c.to(device, non_blocking=True) for c in batch],
        )
    if data.augment == "batch":
        views = BatchMultiCrop(data)
        return Pipeline(
            to_tensor_image(data.image_size),
            default_collate,
            lambda batch, device, g: views(batch.to(device, non_blocking=True), g),
        )
    return Pipeline(
        WorkerCrops(data), collate, lambda batch, device, g: to_views(batch, device, compiled=compiled)
    )
