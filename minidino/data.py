"""Datasets: the embedded synthetic "shapes" set, image folders, and torchvision's CIFAR/STL files on disk.

Every dataset item is `(x, label, skipped)`: `x` is whatever the transform makes of a PIL RGB image (a list of
crops for training, a tensor for evaluation), `label` an int (-1 when unknown) and `skipped` the number of
unreadable files passed over to produce this item. Returning the count (instead of a shared counter) makes it
correct with any number of DataLoader workers; the training loop sums and logs it.

Nothing is downloaded: a data set that is not on disk is a one-line error that says where to put it.

Shapes: 8 classes of filled shapes with random colour, size, position and rotation (within a quarter turn,
which covers every orientation of the square, cross and star), bright on a dark noisy background (a faint
gradient plus pixel noise) with a distractor stroke; each index always draws the same image (seeded by split
and index) and comes with its foreground mask, so emergent segmentation can be scored against ground truth.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

DATASETS = ("shapes", "imagefolder", "folder", "cifar10", "cifar100", "stl10")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """A missing or unusable data set; the message is one line naming the path and what was expected."""


# ----------------------------------------------------------------------------------------------------------
# Embedded shapes


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-size shape in its own rotated coordinates (u, v in about [-1, 1])."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if name == "circle":
        return r < 0.9
    if name == "square":
        return (np.abs(u) < 0.75) & (np.abs(v) < 0.75)
    if name == "triangle":  # equilateral: three half-planes at 120 degrees
        return np.all(
            [u * math.cos(a) + v * math.sin(a) < 0.5 for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)], axis=0
        )
    if name == "star":  # five points: radius a triangle wave in the angle
        phase = (theta * 5 / (2 * math.pi)) % 1.0
        return r < 0.4 + 0.6 * np.abs(2 * phase - 1)
    if name == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95))
    if name == "ring":
        return (r < 0.95) & (r > 0.55)
    if name == "crescent":
        return (r < 0.95) & (np.hypot(u - 0.5, v) > 0.75)
    if name == "arrow":
        shaft = (np.abs(v) < 0.22) & (u > -0.95) & (u < 0.15)
        head = (u >= 0.15) & (u < 0.95) & (np.abs(v) < 0.9 * (0.95 - u) / 0.8)
        return shaft | head
    raise ValueError(f"unknown shape {name!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (each in [0, 1]) as RGB in [0, 255]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return 255 * v * (1 - s * np.clip(np.minimum(k, 4 - k), 0, 1))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two dark background colours and a bright, saturated foreground of random hue.

    Only the hue is random: brightness and saturation are nearly fixed, so that once colour jitter has
    scrambled the hue, the shape is what two views of an image have most in common. (With fully random
    colours, where the shape may be darker or lighter than its background, a small ViT needs many times more
    steps to find shapes at all.)
    """
    bg0, bg1 = (_hsv(rng.uniform(), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.25)) for _ in range(2))
    return bg0, bg1, _hsv(rng.uniform(), rng.uniform(0.6, 0.9), rng.uniform(0.8, 0.95))


def draw_shape(index: int, size: int = 32, seed: int = 0) -> tuple[Image.Image, int, np.ndarray]:
    """The image, label and bool foreground mask (size, size) for one index; the same every time."""
    rng = np.random.default_rng([seed, index])
    label = index % len(SHAPES)
    ss = 2 * size  # draw at 2x and average down: anti-aliased edges
    y, x = (np.mgrid[0:ss, 0:ss] + 0.5) / ss  # pixel centres in [0, 1]
    bg0, bg1, fg = _colours(rng)

    # background: a faint linear gradient between two dark colours, plus per-pixel noise texture
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (x * math.cos(phi) + y * math.sin(phi) + 1.5) / 3.0
    img = bg0 + (bg1 - bg0) * ramp[..., None]
    img += rng.normal(0, 12, size=img.shape)

    # distractor: a thin straight stroke of a random colour across the image
    p0 = rng.uniform(0, 1, 2)
    p1 = p0 + rng.uniform(-0.4, 0.4, 2)  # a short stroke
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (d @ d + 1e-9), 0, 1)
    stroke = np.hypot(x - p0[0] - t * d[0], y - p0[1] - t * d[1]) < 0.015
    img[stroke] = _hsv(rng.uniform(), 0.5, rng.uniform(0.3, 0.6))

    # the shape: random scale, centre and rotation, kept inside the image
    scale = rng.uniform(0.3, 0.45)
    cx, cy = rng.uniform(scale, 1 - scale, 2)
    rot = rng.uniform(-math.pi / 4, math.pi / 4)
    du, dv = (x - cx) / scale, (y - cy) / scale
    u, v = du * math.cos(rot) + dv * math.sin(rot), -du * math.sin(rot) + dv * math.cos(rot)
    inside = _shape_mask(SHAPES[label], u, v)
    img[inside] = fg + rng.normal(0, 6, size=(int(inside.sum()), 3))

    img = img.clip(0, 255).reshape(size, 2, size, 2, 3).mean(axis=(1, 3))  # (size, size, 3)
    mask = inside.reshape(size, 2, size, 2).mean(axis=(1, 3)) >= 0.5
    return Image.fromarray(img.astype(np.uint8)), label, mask


class ShapesDataset(Dataset):
    """n synthetic images; `split` 'train' and 'test' draw from disjoint seeds."""

    classes = SHAPES

    def __init__(self, n: int, image_size: int = 32, split: str = "train", transform=None, seed: int = 0):
        self.n, self.image_size, self.transform = n, image_size, transform
        self.seed = seed * 2 + (0 if split == "train" else 1)
        self.targets = [i % len(SHAPES) for i in range(n)]
        self._cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> tuple[Image.Image, int, np.ndarray]:
        if index not in self._cache:  # drawing takes ~1 ms; keeping 32 px images costs ~3 kB each
            self._cache[index] = draw_shape(index, self.image_size, self.seed)
        return self._cache[index]

    def __getitem__(self, index: int):
        img, label, _ = self.sample(index)
        return (self.transform(img) if self.transform else img), label, 0


# ----------------------------------------------------------------------------------------------------------
# Files on disk


# What PIL raises for corrupt, truncated or hostile files: a decompression bomb (an image whose pixel count
# would exhaust memory) is no OSError, but is skipped and counted like the rest
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, palette, RGBA, CMYK and 16-bit images are converted."""
    return to_rgb(Image.open(path))


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image and convert it to 8-bit RGB (see `load_rgb`)."""
    img.load()  # decode now, so a truncated file fails here and not inside a transform
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit: rescale to 0-255, not clip
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageFiles(Dataset):
    """A list of (path, label) image files. An unreadable file is skipped: the next one is used instead and
    counted in `skipped`, with a warning printed once per file by each process. `decode` (path -> RGB
    image) is `load_rgb` unless a transform brings its own (`crops.WorkerCrops.decode`: reduced-size JPEG
    decoding)."""

    def __init__(self, samples: list[tuple[str, int]], transform=None, classes: tuple[str, ...] = ()):
        self.samples, self.transform, self.classes = samples, transform, classes
        self.targets = [label for _, label in samples]
        self.warned: set[str] = set()  # files already reported by this process (each worker has its own)
        self.decode = load_rgb

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for skipped in range(len(self.samples)):
            path, label = self.samples[(index + skipped) % len(self.samples)]
            try:
                img = self.decode(path)
            except UNREADABLE as e:
                if path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: skipping unreadable image {path}: {type(e).__name__}: {e}")
                continue
            return (self.transform(img) if self.transform else img), label, skipped
        raise DataError(f"none of the {len(self.samples)} images could be read (first: {self.samples[0][0]})")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_folder(root: str, transform=None) -> ImageFiles:
    """ImageFolder layout: root/<class>/<image>; classes sorted by name."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist (expected root/<class>/<image> sub-folders)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    samples = [
        (os.path.join(root, c, f), i)
        for i, c in enumerate(classes)
        for f in sorted(os.listdir(os.path.join(root, c)))
        if _is_image(f)
    ]
    if not samples:
        raise DataError(
            f"data folder {root} has no images in class sub-folders (expected root/<class>/<image>)"
        )
    return ImageFiles(samples, transform, tuple(classes))


def flat_folder(root: str, transform=None) -> ImageFiles:
    """Every image under root (recursively), unlabelled (label -1): for pre-training only."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist")
    samples = [
        (os.path.join(d, f), -1)
        for d, _, files in sorted(os.walk(root))
        for f in sorted(files)
        if _is_image(f)
    ]
    if not samples:
        raise DataError(f"data folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    return ImageFiles(samples, transform)


def file_list(path: str, transform=None) -> ImageFiles:
    """The images named in a text file, one path per line (relative paths are relative to the file's folder;
    blank lines and lines starting with # are ignored), unlabelled: what `python -m minidino.curation` writes."""
    base, samples = os.path.dirname(os.path.abspath(path)), []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            full = os.path.join(base, name)  # an absolute name stays as it is
            if not os.path.isfile(full):
                raise DataError(f"file list {path}, line {n}: {full} does not exist")
            samples.append((full, -1))
    if not samples:
        raise DataError(f"file list {path} names no images")
    return ImageFiles(samples, transform)


class _Labelled(Dataset):
    """Adapts a torchvision dataset (PIL image, label) to the (x, label, skipped) convention."""

    def __init__(self, ds, transform=None):
        self.ds, self.transform = ds, transform
        self.classes = tuple(getattr(ds, "classes", ()))
        self.targets = list(getattr(ds, "targets", getattr(ds, "labels", [])))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, label = self.ds[index]
        img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), int(label), 0


def _torchvision(name: str, root: str, split: str, transform):
    import torchvision.datasets as tvd

    train = split == "train"
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}[name]
    if not os.path.isdir(os.path.join(root, folder)):
        raise DataError(
            f"{name} not found under {root}: put the extracted '{folder}' folder there, or an "
            f"ImageFolder layout {root}/train/<class>/ and {root}/test/<class>/ (nothing is downloaded)"
        )
    try:
        if (
            name == "stl10"
        ):  # 'train+unlabeled' for pre-training would need labels -1; keep the labelled splits
            return _Labelled(tvd.STL10(root, split="train" if train else "test", download=False), transform)
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        return _Labelled(cls(root, train=train, download=False), transform)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
        # torchvision's own message suggests download=True, which minidino never does
        raise DataError(
            f"{name} files under {os.path.join(root, folder)} are incomplete or corrupt ({type(e).__name__}); "
            "extract the archive again"
        ) from None


def build_dataset(data, split: str, transform=None, seed: int = 0) -> Dataset:
    """The `split` ('train' or 'test') of the data set named by a `DataConfig`."""
    if data.dataset == "shapes":
        return ShapesDataset(
            data.n_train if split == "train" else data.n_test, data.image_size, split, transform, seed
        )
    root = data.root
    if not root:
        raise DataError(f"--data.root is empty: data set {data.dataset!r} needs a folder")
    if data.dataset == "folder" and os.path.isfile(root):  # a list of files, e.g. a curated subset
        if split != "train":
            raise DataError(f"--data.dataset=folder is unlabelled: {root} has no held-out split for k-NN")
        return file_list(root, transform)
    if not os.path.isdir(root):
        raise DataError(f"--data.root={root} does not exist")
    # A root with train/ and test/ (or val/) sub-folders is an ImageFolder pair, whatever the data set name.
    held_out = next((d for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(os.path.join(root, "train")) and held_out:
        return image_folder(os.path.join(root, "train" if split == "train" else held_out), transform)
    if data.dataset in ("cifar10", "cifar100", "stl10"):
        return _torchvision(data.dataset, root, split, transform)
    if data.dataset == "folder":
        if split != "train":
            raise DataError(f"--data.dataset=folder is unlabelled: {root} has no held-out split for k-NN")
        return flat_folder(root, transform)
    if split != "train":
        raise DataError(f"{root} has no test/ or val/ sub-folder: no held-out split for evaluation")
    return image_folder(root, transform)


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error (then skipped), never half an image
