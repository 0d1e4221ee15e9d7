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
The blur's kernel and sigma (0.1-2.0 at 224 px) scale with the crop size so 32 px crops are not smeared.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blur(size: int, p: float) -> v2.Transform:
    s = size / 224  # sigma range and kernel follow the crop size
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, ~10% of the side (23 at 224 px)
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1 * s, 2.0 * s))], p=p)


def _to_tensor() -> v2.Transform:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class MultiCropAugmentation:
    """PIL image -> list of tensors: [global 1, global 2, local 1, ..., local n], each (3, size, size)."""

    def __init__(self, global_crops_size: int = 224, global_crops_scale: tuple[float, float] = (0.4, 1.0),
                 local_crops_number: int = 10, local_crops_size: int = 96,
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), hue: float = 0.1):
        flip_and_jitter = v2.Compose([
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=hue)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])
        bicubic = v2.InterpolationMode.BICUBIC

        def crop(size, scale):
            return v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True)

        self.global_1 = v2.Compose([crop(global_crops_size, global_crops_scale), flip_and_jitter,
                                    _blur(global_crops_size, 1.0), _to_tensor()])
        self.global_2 = v2.Compose([crop(global_crops_size, global_crops_scale), flip_and_jitter,
                                    _blur(global_crops_size, 0.1), v2.RandomSolarize(128, p=0.2), _to_tensor()])
        self.local = v2.Compose([crop(local_crops_size, local_crops_scale), flip_and_jitter,
                                 _blur(local_crops_size, 0.5), _to_tensor()])
        self.local_crops_number = local_crops_number

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.global_1(image), self.global_2(image)] + [self.local(image)
                                                              for _ in range(self.local_crops_number)]

    @classmethod
    def from_config(cls, data) -> "MultiCropAugmentation":
        return cls(data.global_crops_size, data.global_crops_scale, data.local_crops_number,
                   data.local_crops_size, data.local_crops_scale, data.hue)


def eval_transform(size: int) -> v2.Transform:
    """Deterministic view for evaluation: resize the short side to `size`, centre crop, normalise."""
    return v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), _to_tensor()])
