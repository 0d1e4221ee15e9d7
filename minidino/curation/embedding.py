"""Step 1 of minidino/curation/curate.py: a pool's image files described by a backbone (its CLS tokens) or by a copy
descriptor (copy_detection.CopyDescriptor), each embedding and the trained descriptor cached under
<out>/cache/ with a key of the files (paths, sizes, mtimes), the backbone file and the settings, so that a
second curation of the same pool (another threshold, say) embeds nothing again."""

from __future__ import annotations

import copy
import hashlib
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..augment import eval_transform
from ..data import UNREADABLE, DataError, file_list, flat_folder, load_rgb
from ..evaluate import cached
from .copy_detection import CopyDescriptor, descriptor_size, train_descriptor


class _Files(Dataset):
    """(tensor, readable, pixels) for each path; an unreadable file gives zeros and readable=False (it is then
    dropped and counted, never replaced by a neighbour as training data does)."""

    def __init__(self, paths: list[str], size: int, crop_ratio: float):
        self.paths, self.size, self.transform = paths, size, eval_transform(size, crop_ratio)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.paths[i])
        except UNREADABLE:
            return torch.zeros(3, self.size, self.size), False, 0
        return self.transform(img), True, img.width * img.height


def image_paths(source: str) -> list[str]:
    """The images of a folder (recursively, in sorted order) or of a file list."""
    if os.path.isfile(source):
        return [p for p, _ in file_list(source).samples]
    return [p for p, _ in flat_folder(source).samples]


def _files_key(paths: list[str]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def embed(
    describe,
    paths: list[str],
    size: int,
    crop_ratio: float,
    device,
    batch_size=256,
    num_workers=0,
    desc="embed",
) -> dict:
    """{'features': (N, C), 'readable': (N,) bool, 'pixels': (N,) int64}, the features L2-normalised.
    `describe`: a backbone, whose feature is its CLS token of the image plus that of the mirror image (so a
    mirrored copy has exactly the same feature), or a copy_detection.CopyDescriptor (its `search` views)."""
    if isinstance(describe, CopyDescriptor):
        feature = describe.search
    else:
        backbone = describe
        feature = lambda x: backbone(x)[0]["cls"].float() + backbone(x.flip(-1))[0]["cls"].float()  # noqa: E731
    loader = DataLoader(_Files(paths, size, crop_ratio), batch_size, num_workers=num_workers)
    feats, readable, pixels = [], [], []
    for images, ok, px in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        feats.append(F.normalize(feature(images.to(device)), dim=-1).cpu())
        readable.append(ok)
        pixels.append(px)
    return {"features": torch.cat(feats), "readable": torch.cat(readable), "pixels": torch.cat(pixels)}


def checkpoint_key(backbone_path: str) -> dict:
    ckpt = os.path.join(backbone_path, "checkpoint.pt") if os.path.isdir(backbone_path) else backbone_path
    return {"backbone": os.path.abspath(ckpt), "mtime": os.path.getmtime(ckpt)}


def cached_embedding(
    describe, key: dict, paths: list[str], size: int, ratio: float, cache: str, device, args
):
    """`embed`, stored under `cache` with a key of (`key`: what describes the images, the files and their
    sizes and mtimes, the image size): a second curation of the same pool with the same backbone does not
    embed again."""
    key = {**key, "files": _files_key(paths), "size": size, "crop_ratio": ratio}
    name = os.path.basename(cache).removesuffix(".pt")
    return cached(
        cache,
        key,
        lambda: embed(
            describe, paths, size, ratio, device, args.batch_size, args.num_workers, f"embedding {name}"
        ),
    )


def cached_descriptor(backbone, paths: list[str], cfg, device, args) -> tuple[CopyDescriptor, dict, int]:
    """copy_detection.train_descriptor on the readable pool `paths`, stored as <out>/cache/copy_descriptor.pt
    with a key of the backbone file, the pool's files and the training settings. Returns the descriptor, that
    key (for the caches of what it embeds) and the image size it reads."""
    size = descriptor_size(cfg.data.eval_size, cfg.model.patch_size)
    key = {
        **checkpoint_key(args.backbone),
        "files": _files_key(paths),
        "size": size,
        "steps": args.copy_steps,
        "batch_size": args.copy_batch_size,
        "seed": args.seed,
    }

    def train() -> dict:
        return train_descriptor(
            backbone,
            paths,
            size,
            args.copy_steps,
            args.copy_batch_size,
            seed=args.seed,
            device=device,
            num_workers=args.num_workers,
        ).state_dict()

    state = cached(os.path.join(args.out, "cache", "copy_descriptor.pt"), key, train)
    model = CopyDescriptor(copy.deepcopy(backbone))
    model.load_state_dict(state)
    return model.to(device).eval(), {"feature": "copy descriptor, mirror and shifted views", **key}, size


def embed_sources(sources: list[str], what: str, describe, key: dict, size: int, ratio: float, device, args):
    """Paths and embeddings of several folders / file lists, each cached under <out>/cache/."""
    paths, parts = [], []
    for src in sources:
        src_paths = image_paths(src)
        tag = hashlib.sha1(os.path.abspath(src).encode()).hexdigest()[:8]
        cache = os.path.join(args.out, "cache", f"{what}_{os.path.basename(os.path.normpath(src))}_{tag}.pt")
        parts.append(cached_embedding(describe, key, src_paths, size, ratio, cache, device, args))
        paths += src_paths
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if not emb["readable"].any():
        raise DataError(f"none of the {len(paths)} images of {what} {', '.join(sources)} could be read")
    return paths, emb
