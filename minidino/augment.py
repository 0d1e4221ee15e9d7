"""DINO multi-crop augmentation (Caron et al. 2021, arXiv 2104.14294, Sec. 3.1 and App. D).

Each image gives 2 global crops (large area, e.g. 224 px, scale 0.4-1) and n local crops (small, e.g. 96 px,
scale 0.05-0.4). The teacher sees only the global crops, the student sees all: "local-to-global"
correspondence. On top of the crop, BYOL's photometric augmentations (Grill et al. 2020, arXiv 2006.07733):

                 flip  colour jitter (0.4,0.4,0.2,0.1)  grayscale  Gaussian blur  solarize
    global 1     0.5   0.8                              0.2        1.0            -
    global 2     0.5   0.8                              0.2        0.1            0.2
    local        0.5   0.8                              0.2        0.5            -

`hue` is the colour jitter's maximum hue shift (0.1 in the papers); the shapes preset raises it to 0.5 because
its colours are random by design, so views must disagree on colour for DINO to learn shape instead.
The blur's sigma is 0.1-2.0 px on crops of 96 px and more, as in the official code, and scaled down in
proportion on smaller crops (`blur_sigma`).

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from .config import DataConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blur_sigma(size: int) -> tuple[float, float]:
    """The Gaussian blur's sigma range in pixels of a crop of this side: 0.1-2.0 for crops of 96 px and more,
    as the official code blurs both 224 px and 96 px crops; scaled down in proportion below 96 px, so that
    the 16-32 px crops of small images are not smeared. (A deliberate addition: the papers use no crops that
    small.)"""
    s = min(1.0, size / 96)
    return 0.1 * s, 2.0 * s


def blur_kernel(size: int) -> int:
    """Odd kernel side that holds +-3 sigma of the largest sigma (13 px at 96 px and above)."""
    return 2 * math.ceil(3 * blur_sigma(size)[1]) + 1


def _blur(size: int, p: float) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=blur_sigma(size))], p=p)


def _to_tensor() -> v2.Transform:
    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


class MultiCropAugmentation:
    """PIL image -> list of tensors: [global 1, global 2, local 1, ..., local n], each (3, size, size); sizes,
    scales, the number of local crops and the hue range from a `DataConfig`."""

    def __init__(self, cfg: DataConfig | None = None):
        self.cfg = cfg = cfg or DataConfig()
        flip_and_jitter = v2.Compose(
            [
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply(
                    [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=cfg.hue)], p=0.8
                ),
                v2.RandomGrayscale(p=0.2),
            ]
        )
        bicubic = v2.InterpolationMode.BICUBIC

        def crop(size, scale):
            return v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True)

        gsize, lsize = cfg.global_crops_size, cfg.local_crops_size
        self.global_1 = v2.Compose(
            [crop(gsize, cfg.global_crops_scale), flip_and_jitter, _blur(gsize, 1.0), _to_tensor()]
        )
        self.global_2 = v2.Compose(
            [
                crop(gsize, cfg.global_crops_scale),
                flip_and_jitter,
                _blur(gsize, 0.1),
                v2.RandomSolarize(128, p=0.2),
                _to_tensor(),
            ]
        )
        self.local = v2.Compose(
            [crop(lsize, cfg.local_crops_scale), flip_and_jitter, _blur(lsize, 0.5), _to_tensor()]
        )

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.global_1(image), self.global_2(image)] + [
            self.local(image) for _ in range(self.cfg.local_crops_number)
        ]


def eval_transform(size: int, crop_ratio: float = 1.0) -> v2.Transform:
    """Deterministic view for evaluation: resize the short side to size / crop_ratio, centre crop `size`,
    normalise. DINO's k-NN and linear evaluations use 0.875 (256 -> 224 px); 1 keeps the whole image."""
    return v2.Compose(
        [
            v2.Resize(round(size / crop_ratio), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            _to_tensor(),
        ]
    )


def linear_train_transform(size: int) -> v2.Transform:
    """The training view of DINO's linear evaluation (eval_linear.py): random resized crop and flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            _to_tensor(),
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# The same augmentations on a whole batch at once (any device): for data sets of equal-size images (shapes,
# CIFAR), where per-image PIL work in DataLoader workers costs more than the model on a small machine.


def _uniform_table(ranges: list[tuple[float, float]], n: int, g: torch.Generator) -> torch.Tensor:
    """(len(ranges), n) on the CPU: row i uniform in ranges[i], the rows drawn from g in order (the same
    numbers as one torch.rand(n) per row)."""
    u = torch.rand(len(ranges), n, generator=g)
    return torch.stack([lo + (hi - lo) * u[i] for i, (lo, hi) in enumerate(ranges)])


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601), (B, 1, H, W)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Shift the hue by `turns` (fraction of the colour wheel) as a rotation of the chroma plane of YIQ."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = torch.cos(2 * torch.pi * turns), torch.sin(2 * torch.pi * turns)  # (B,)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack(
        [
            yiq[:, 0],
            cos[:, None, None] * i - sin[:, None, None] * q,
            sin[:, None, None] * i + cos[:, None, None] * q,
        ],
        dim=1,
    )
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Blur images (B, 3, H, W) with a k x k Gaussian of one sigma per image (B,), reflecting at the
    borders: separable (2k multiplies per pixel, where torchvision's GaussianBlur does k^2), as a grouped
    convolution over the B * 3 channels."""
    B, _, H, W = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B * 3, k)
    flat = torch.nn.functional.pad(x.reshape(1, B * 3, H, W), [k // 2] * 4, mode="reflect")
    flat = torch.nn.functional.conv2d(flat, kern[:, None, :, None], groups=B * 3)
    flat = torch.nn.functional.conv2d(flat, kern[:, None, None, :], groups=B * 3)
    return flat.reshape(B, 3, H, W)


class BatchMultiCrop:
    """Multi-crop of a batch of images (B, 3, H, W) in [0, 1], all random draws from one generator.

    Same distributions as `MultiCropAugmentation` (and the same `DataConfig` fields): random resized crop
    (area `scale`, aspect 3/4-4/3, bicubic resampling through `grid_sample`), flip, colour jitter applied in
    a fixed order (brightness, contrast, saturation, hue), grayscale, Gaussian blur with a per-image sigma,
    solarize on the second global crop.
    """

    def __init__(self, cfg: DataConfig | None = None):
        self.cfg = cfg or DataConfig()

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        c = self.cfg
        size, scale = c.global_crops_size, c.global_crops_scale
        crops = [self.view(images, size, scale, 1.0, 0.0, g), self.view(images, size, scale, 0.1, 0.2, g)]
        size, scale = c.local_crops_size, c.local_crops_scale
        return crops + [self.view(images, size, scale, 0.5, 0.0, g) for _ in range(c.local_crops_number)]

    def view(
        self,
        x: torch.Tensor,
        size: int,
        scale: tuple[float, float],
        p_blur: float,
        p_solarize: float,
        g: torch.Generator,
    ) -> torch.Tensor:
        B, dev = x.shape[0], x.device
        # every random number of the view in one (draws, B) table from the CPU generator, in the order the
        # operations below use them, then one copy to x's device (not one small blocking copy per draw)
        ranges = {
            "area": scale, "log_ratio": (math.log(3 / 4), math.log(4 / 3)), "cx": (0, 1), "cy": (0, 1),
            "flip": (0, 1), "jitter": (0, 1), "brightness": (0.6, 1.4), "contrast": (0.6, 1.4),
            "saturation": (0.8, 1.2), "hue": (-self.cfg.hue, self.cfg.hue), "gray": (0, 1),
            "sigma": blur_sigma(size), "blur": (0, 1), **({"solarize": (0, 1)} if p_solarize else {}),
        }  # fmt: skip
        d = dict(zip(ranges, _uniform_table(list(ranges.values()), B, g).to(dev, non_blocking=True)))

        # random resized crop + flip: one affine map per image from the output grid to the input
        area, log_ratio = d["area"], d["log_ratio"]
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width and height as image fractions
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx, cy = (d["cx"] * (1 - w) + w / 2) * 2 - 1, (d["cy"] * (1 - h) + h / 2) * 2 - 1
        flip = torch.where(d["flip"] < 0.5, -1.0, 1.0)
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
        grid = torch.nn.functional.affine_grid(theta, [B, 3, size, size], align_corners=False)
        x = torch.nn.functional.grid_sample(
            x, grid, mode="bicubic", padding_mode="border", align_corners=False
        ).clamp(0, 1)  # (B, 3, size, size)

        # colour jitter with probability 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue
        jitter = (d["jitter"] < 0.8)[:, None, None, None]
        y = x * d["brightness"][:, None, None, None]
        mean = gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * d["contrast"][:, None, None, None] + mean).clamp(0, 1)
        luma = gray(y)
        y = ((y - luma) * d["saturation"][:, None, None, None] + luma).clamp(0, 1)
        y = _rotate_hue(y, d["hue"]).clamp(0, 1)
        x = torch.where(jitter, y, x)
        x = torch.where((d["gray"] < 0.2)[:, None, None, None], gray(x).expand_as(x), x)  # grayscale

        blurred = gaussian_blur(x, d["sigma"], blur_kernel(size))  # Gaussian blur
        x = torch.where((d["blur"] < p_blur)[:, None, None, None], blurred, x)

        if p_solarize:
            x = torch.where((d["solarize"] < p_solarize)[:, None, None, None] & (x >= 0.5), 1 - x, x)
        mean, std = x.new_tensor(IMAGENET_MEAN)[:, None, None], x.new_tensor(IMAGENET_STD)[:, None, None]
        return (x - mean) / std


def to_tensor_image(size: int) -> v2.Transform:
    """PIL -> (3, size, size) float in [0, 1]: the per-image part of the batched path."""
    return v2.Compose(
        [
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
