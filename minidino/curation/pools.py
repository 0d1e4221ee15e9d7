"""Messy pools of shapes images for trying curation (tests, tutorial 03, benchmarks/curation.py): originals
plus near-duplicates of the kinds a web pool holds, with the ground truth of which file copies which."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageEnhance

from ..data import draw_shape
from .copy_detection import crop_resized, jpeg_reencoded, rolled

NEAR_DUPLICATES = ("jpeg", "crop", "shift", "flip", "colour", "exact")


def near_duplicate(img, kind: str, rng):
    """A copy of a PIL image as a web pool would hold it: re-encoded as JPEG, slightly cropped and resized
    back, shifted by 1-2 px, mirrored, colour-shifted, or an exact copy. `rng`: a numpy Generator."""
    if kind == "jpeg":
        return jpeg_reencoded(img, int(rng.integers(60, 91)))
    if kind == "crop":
        return crop_resized(img, rng, 0.88, 0.95)
    if kind == "shift":
        return rolled(img, *(int(rng.choice([-2, -1, 1, 2])) for _ in range(2)))
    if kind == "flip":
        return img.transpose(Image.FLIP_LEFT_RIGHT)
    if kind == "colour":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
        return ImageEnhance.Color(img).enhance(rng.uniform(0.85, 1.15))
    if kind == "exact":
        return img.copy()
    raise ValueError(f"near-duplicate kind {kind!r}: expected one of {', '.join(NEAR_DUPLICATES)}")


def write_shapes_pool(
    root: str,
    n: int,
    seed: int,
    copies: dict[int, int] | None = None,
    copy_class: int | None = None,
    n_copies: int = 0,
    kinds: tuple[str, ...] = NEAR_DUPLICATES,
) -> dict:
    """Write n shapes images (PNG, `seed` as ShapesDataset's) to root/<index>.png, plus near-duplicates as
    root/<index>_dup<j>.<png|jpg>: `copies` maps an index to its number of copies, or `n_copies` copies are
    spread over the images of `copy_class` (a pool flooded by one class); each copy is of a kind drawn from
    `kinds`. Returns {"paths", "labels", "source", "kind"}: per written file its path, class, the index of the
    image it copies (its own index for an original) and the kind of copy (None for an original)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    copies = dict(copies or {})
    if n_copies:
        pick = [i for i in range(n) if copy_class is None or i % 8 == copy_class]
        for j in range(n_copies):
            copies[pick[j % len(pick)]] = copies.get(pick[j % len(pick)], 0) + 1
    paths, labels, source, kind_of = [], [], [], []
    for i in range(n):
        img, label, _ = draw_shape(i, 32, seed)
        paths.append(os.path.join(root, f"{i:06d}.png"))
        img.save(paths[-1])
        labels.append(label)
        source.append(i)
        kind_of.append(None)
        for j in range(copies.get(i, 0)):
            kind = kinds[int(rng.integers(len(kinds)))]
            paths.append(os.path.join(root, f"{i:06d}_dup{j}.{'jpg' if kind == 'jpeg' else 'png'}"))
            near_duplicate(img, kind, rng).save(paths[-1])
            labels.append(label)
            source.append(i)
            kind_of.append(kind)
    return {"paths": paths, "labels": labels, "source": source, "kind": kind_of}
