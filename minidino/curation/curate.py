"""DINOv2's data curation at small scale: embed a pool of images, remove near-duplicates and copies of the
evaluation sets, optionally retrieve what is close to curated data, balance the concepts, write a file list.

    python -m minidino.curation POOL [POOL ...] --backbone runs/shapes --out runs/curated
        [--eval-sets DIR ...]            remove pool images that near-duplicate these (test-set decontamination)
        [--curated DIR ... --retrieve samples|clusters]   keep only the pool images near curated data
        [--balance N --levels 64,8]      N images sampled evenly over a hierarchical k-means of the pool
    python train.py --data.dataset=folder --data.root=runs/curated/files.txt

The steps, as the papers describe them:
1. Embed (DINOv2 Sec. 3 / App. A): every image through a self-supervised ViT (here any backbone eval.py loads:
   a minidino run or an official file): the CLS tokens of the image and of its mirror image, summed (so a
   mirrored copy is an exact match), minus the pool's mean feature (what all images share: without it a weakly
   trained backbone puts every pair near cosine 1), L2-normalised, so a dot product is a cosine similarity.
   These features serve retrieval and balancing (steps 4-5). Embeddings are cached (minidino/curation/embedding.py).
2. Deduplicate: pairs of pool images with cosine similarity >= threshold are joined, the connected components
   are the duplicate groups, and one image per group is kept (the one with most pixels; the first listed on
   a tie). The similarity is that of a copy descriptor, as DINOv2 uses a copy-detection network (SSCD, Pizzi
   et al. 2022) here rather than its semantic features: minidino/curation/copy_detection.py fine-tunes the same
   backbone on edited pairs of the pool's own images for `--copy-steps` steps and describes each image by
   ten views of it, mirrored and shifted by 1/32 of the side (`--copy-steps 0` compares the CLS features
   instead, which find exact, mirrored and recoloured copies but miss crops and shifts). The threshold was
   chosen on held-out injected duplicates (DEFAULT_THRESHOLD). A threshold too low for a pool chains images
   that are not copies into large components; the sign is a large share of removed images less similar than
   the threshold to the image kept for them (`weakly_linked`), which report.md gives for thresholds around
   the one used (with threshold.png) and which prints a warning above CHAIN_WARNING.
3. Decontaminate: a pool image whose nearest evaluation image is at >= threshold (same descriptor) is
   removed, so the evaluation sets stay unseen during pre-training.
4. Retrieve (DINOv2 App. A): sample-based, the k nearest pool images of each curated image; or cluster-based,
   k-means of the pool, and the clusters that are the nearest cluster of some curated image are kept.
5. Balance (Vo et al. 2024, arXiv 2405.15613): k-means of the pool, k-means of those centroids, and so on
   (`--levels`, finest first); N images are then drawn top-down, each cluster's share split evenly among its
   sub-clusters (a cluster smaller than its share gives all it has, the rest goes to the others), so a dominant
   mode is capped at its share instead of filling the data set. (Vo et al. also re-sample each level's
   k-means to move centroids off dense modes; plain k-means++ and Lloyd iterations here.)

Similarity search is exact (minidino/curation/similarity.py): blocks of queries against all keys with a matmul and
top-k, memory bounded by the block size (~64 MB of scores at a time). That is fine to ~10^5 images on a CPU
and ~10^6 on a GPU; beyond, an approximate index (faiss IVF/HNSW) is the right tool, as the papers use.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import backbone_and_config
from ..config import ConfigError
from ..data import DataError
from ..dist import DEVICES, resolve_device
from .embedding import cached_descriptor, checkpoint_key, embed_sources
from .report import CHAIN_WARNING, write_links, write_report
from .similarity import balanced_sample, components, hierarchical_kmeans, kmeans, nearest

# Cosine similarity at and above which two images count as copies, chosen on held-out injected duplicates of
# shapes images (`benchmarks/curation.py duplicates --seed 5`, the default run's backbone) and checked on
# another pool (--seed 6); the numbers are in benchmarks/README.md. The copy descriptor (the default): the
# threshold with the highest min(precision, recall) on --seed 5, where it gives pair precision 0.967 and recall
# 0.953 (exact copies, mirror images, colour and 1-2 px shifts 1.0, 90 % crops 0.97, JPEG 0.76). The CLS of
# the backbone itself (--copy-steps 0): the lowest threshold with precision >= 0.95, where it gives 0.97;
# recall 1.0 for exact copies, mirror images and colour shifts, 0.6 for JPEG, ~0 for shifts and crops, which
# move the CLS token of this 4 x 4-patch ViT more than the step to another image does.
DEFAULT_THRESHOLD = 0.915
CLS_THRESHOLD = 0.92
COPY_STEPS = 600  # copy descriptor training steps of 128 pairs


# ----------------------------------------------------------------------------------------------------------
# 2.-4. Duplicates, contamination, retrieval (on the search and k-means of minidino/curation/similarity.py)


def duplicate_groups(
    features: Tensor, pixels: Tensor, threshold: float, k: int = 32, neighbours=None
) -> list[list[int]]:
    """Groups (of >= 2 images) whose members are joined by similarities >= threshold, each listed with the
    image to keep first (most pixels, then the lowest index). Each image links to its k most similar others;
    larger groups are still found whole, through chains of links. `neighbours`: what `nearest` gives for
    (features, features, k) without self-matches, when it is already computed."""
    if len(features) < 2:
        return []
    sims, ids = neighbours or nearest(features, features, k, exclude_self=True)
    linked = sims >= threshold
    rows = torch.arange(len(features))[:, None].expand_as(ids)
    root = components(len(features), torch.stack([rows[linked], ids[linked]], 1))
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(root.tolist()):
        groups.setdefault(r, []).append(i)
    return [sorted(g, key=lambda i: (-int(pixels[i]), i)) for g in groups.values() if len(g) > 1]


def weakly_linked(features: Tensor, groups: list[list[int]], threshold: float) -> int:
    """How many removed images of `groups` (kept image first) are less similar than `threshold` to the image
    kept for their group: joined to it only through a chain of other images. Some are normal where an image
    has several copies (two edits of one original can match each other better than the original); when they
    are a large share of the removed images, the components chain images that are not copies of each other."""
    return sum(int((features[g[1:]] @ features[g[0]] < threshold).sum()) for g in groups)


def pool_neighbours(features: Tensor, k: int = 32):
    """The k nearest other images of each image (`nearest`), as `duplicate_groups` takes them; None for < 2."""
    return nearest(features, features, k, exclude_self=True) if len(features) > 1 else None


def threshold_sweep(features: Tensor, pixels: Tensor, thresholds, neighbours=None) -> list[dict]:
    """Deduplication at each threshold, from one neighbour search: per threshold the images removed, the
    groups, the largest group and the share of the removed images that are weakly linked (`weakly_linked`)."""
    neighbours = neighbours or pool_neighbours(features)
    rows = []
    for t in thresholds:
        groups = duplicate_groups(features, pixels, t, neighbours=neighbours)
        removed = sum(len(g) - 1 for g in groups)
        weak = weakly_linked(features, groups, t)
        largest = max(map(len, groups), default=0)
        rows.append({"threshold": t, "removed": removed, "groups": len(groups), "largest": largest,
                     "weakly_linked": weak, "weak_share": weak / removed if removed else 0.0})  # fmt: skip
    return rows


def chaining_warning(sweep: list[dict], threshold: float) -> str | None:
    """A one-line warning when, at `threshold` (a row of the sweep), over CHAIN_WARNING of the removed images
    are weakly linked, with that share at the sweep's higher thresholds; else None."""
    (row,) = [r for r in sweep if r["threshold"] == threshold]
    if row["removed"] < 20 or row["weak_share"] <= CHAIN_WARNING:
        return None
    shares = ", ".join(
        f"{r['weak_share']:.0%} at {r['threshold']:g}" for r in sweep if r["threshold"] >= threshold
    )
    return (
        f"warning: {row['weakly_linked']} of the {row['removed']} images removed as duplicates at --threshold "
        f"{threshold:g} are less similar than that to the image kept for their group (joined only through "
        f"chains; the largest group has {row['largest']} images): the threshold is probably too low for this "
        f"pool. That share is {shares}; a few to ~10% is usual where images have several copies. See report.md "
        "and duplicates.png, and run again with a higher --threshold (the embeddings are cached)"
    )


def sweep_thresholds(threshold: float) -> list[float]:
    """The chosen threshold with three below and four above it in steps of 0.01, those in (0, 1)."""
    around = [round(threshold + 0.01 * i, 4) for i in (-3, -2, -1, 1, 2, 3, 4)]
    return sorted({threshold, *(t for t in around if 0 < t < 1)})


def contaminated(pool: Tensor, evaluation: Tensor, threshold: float) -> Tensor:
    """(N,) bool: pool images whose most similar evaluation image is at >= threshold."""
    return nearest(pool, evaluation, 1)[0][:, 0] >= threshold


def retrieve_by_samples(pool: Tensor, curated: Tensor, k: int) -> Tensor:
    """(N,) bool: the k nearest pool images of each curated image (DINOv2's sample-based retrieval)."""
    keep = torch.zeros(len(pool), dtype=torch.bool)
    keep[nearest(curated, pool, k)[1].flatten()] = True
    return keep


def retrieve_by_clusters(pool: Tensor, curated: Tensor, n_clusters: int, seed: int) -> Tensor:
    """(N,) bool: the pool images of every k-means cluster that is the nearest cluster of a curated image
    (DINOv2's cluster-based retrieval, for curated sets too small for sample-based retrieval)."""
    centroids, assign = kmeans(pool, n_clusters, seed)
    wanted = nearest(curated, centroids, 1)[1][:, 0].unique()
    return torch.isin(assign, wanted)


# ----------------------------------------------------------------------------------------------------------
# The pipeline on features, then the command line around it


def auto_levels(n: int) -> tuple[int, ...]:
    """Default hierarchy for n images: clusters of ~25 images, grouped in turn by ~10 (at least 2 each)."""
    fine = max(2, n // 25)
    return (fine, max(2, fine // 10))


def select(
    features: Tensor,
    pixels: Tensor,
    readable: Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    evaluation: Tensor | None = None,
    curated: Tensor | None = None,
    retrieve: str = "samples",
    retrieve_k: int = 4,
    retrieve_clusters: int = 0,
    balance: int = 0,
    levels: tuple[int, ...] = (),
    seed: int = 0,
    copy_features: Tensor | None = None,
) -> dict:
    """Steps 2-5 on the pool's features (N, C) (and those of the curated sets, same space). Duplicates and
    contamination are found on `copy_features` (N, D) when given (a copy descriptor's; `evaluation` is then in
    that space too), else on `features`. Returns {'kept': (N,) bool, 'stages': [(name, images left)],
    'groups': duplicate groups (pool indices, kept image first), 'sweep': `threshold_sweep` around
    `threshold` (`sweep_thresholds`), 'contaminated': pool indices, 'levels':
    cluster labels per level of the images left before balancing, 'candidates': their pool indices}."""
    copies = features if copy_features is None else copy_features
    keep = readable.clone()
    stages = [("pool", len(keep)), ("readable", int(keep.sum()))]
    idx = keep.nonzero()[:, 0]
    neighbours = pool_neighbours(copies[idx])  # one search for the groups and the sweep
    sweep = threshold_sweep(copies[idx], pixels[idx], sweep_thresholds(threshold), neighbours)
    found = duplicate_groups(copies[idx], pixels[idx], threshold, neighbours=neighbours)
    groups = [idx[g].tolist() for g in found]
    for g in groups:
        keep[g[1:]] = False
    stages.append(("deduplicated", int(keep.sum())))
    bad = torch.zeros_like(keep)
    if evaluation is not None and len(evaluation):
        bad = contaminated(copies, evaluation, threshold) & keep
        keep &= ~bad
        stages.append(("decontaminated", int(keep.sum())))
    if curated is not None and len(curated):
        idx = keep.nonzero()[:, 0]
        if retrieve == "samples":
            near = retrieve_by_samples(features[idx], curated, retrieve_k)
        else:
            near = retrieve_by_clusters(
                features[idx], curated, retrieve_clusters or max(2, len(idx) // 25), seed
            )
        keep[idx[~near]] = False
        stages.append((f"retrieved ({retrieve})", int(keep.sum())))
    candidates = keep.nonzero()[:, 0]
    if not len(candidates):
        raise DataError(f"no image of the pool is left after the step '{stages[-1][0]}'")
    labels = hierarchical_kmeans(features[candidates], levels or auto_levels(len(candidates)), seed)
    if balance:
        keep[:] = False
        keep[candidates[balanced_sample(labels, balance, seed)]] = True
        stages.append(("balanced", int(keep.sum())))
    return {
        "kept": keep,
        "stages": stages,
        "groups": groups,
        "sweep": sweep,
        "contaminated": bad.nonzero()[:, 0].tolist(),
        "levels": labels,
        "candidates": candidates,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minidino.curation", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "pool", nargs="+", help="folders (searched recursively) or file lists of the uncurated pool"
    )
    p.add_argument(
        "--backbone", required=True, help="a minidino run or checkpoint, or a backbone file eval.py reads"
    )
    p.add_argument(
        "--out", required=True, help="output folder: files.txt, report.md / report.json, PNGs, cache/"
    )
    p.add_argument(
        "--copy-steps",
        type=int,
        default=COPY_STEPS,
        help=f"training steps of the copy descriptor (default {COPY_STEPS}; 0: compare the backbone's CLS)",
    )
    p.add_argument("--copy-batch-size", type=int, default=128, help="pairs per copy descriptor step")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"cosine similarity of copies (default {DEFAULT_THRESHOLD} for the copy descriptor, "
        f"{CLS_THRESHOLD} for the CLS: chosen on shapes, README)",
    )
    p.add_argument("--eval-sets", nargs="*", default=[], help="evaluation images to keep out of the pool")
    p.add_argument(
        "--curated", nargs="*", default=[], help="curated images to retrieve the pool's neighbours of"
    )
    p.add_argument("--retrieve", default="samples", choices=("samples", "clusters"))
    p.add_argument("--retrieve-k", type=int, default=4, help="pool neighbours per curated image (DINOv2: 4)")
    p.add_argument("--retrieve-clusters", type=int, default=0, help="k-means clusters (0: images / 25)")
    p.add_argument("--balance", type=int, default=0, help="sample this many images evenly over the clusters")
    p.add_argument("--levels", default="", help="clusters per k-means level, finest first (default: auto)")
    p.add_argument("--links", action="store_true", help="also a folder of symbolic links to the kept images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=DEVICES)
    args = p.parse_args(argv)
    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLD if args.copy_steps else CLS_THRESHOLD
    if not 0 < args.threshold <= 1:
        raise ConfigError(f"--threshold: expected a cosine similarity in (0, 1], got {args.threshold}")
    for name in (
        "copy_steps",
        "copy_batch_size",
        "retrieve_k",
        "retrieve_clusters",
        "balance",
        "batch_size",
        "num_workers",
    ):
        lowest = 1 if name in ("copy_batch_size", "retrieve_k", "batch_size") else 0
        if getattr(args, name) < lowest:
            raise ConfigError(
                f"--{name.replace('_', '-')}: expected at least {lowest}, got {getattr(args, name)}"
            )
    try:
        args.levels = tuple(int(k) for k in args.levels.split(",")) if args.levels else ()
    except ValueError:
        raise ConfigError(f"--levels: expected comma-separated integers, got {args.levels!r}") from None
    if any(k < 2 for k in args.levels):
        raise ConfigError(f"--levels: every level needs at least 2 clusters, got {args.levels}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    backbone, cfg = backbone_and_config(args.backbone)
    backbone.to(device)
    os.makedirs(os.path.join(args.out, "cache"), exist_ok=True)
    size, ratio = cfg.data.eval_size, cfg.data.eval_crop_ratio
    key = {**checkpoint_key(args.backbone), "feature": "cls + mirrored cls"}
    paths, pool = embed_sources(args.pool, "pool", backbone, key, size, ratio, device, args)
    mean = pool["features"][pool["readable"]].mean(0)  # what every image shares: removed before comparing
    feats = F.normalize(pool["features"] - mean, dim=-1)
    curated = None
    if args.curated:
        emb = embed_sources(args.curated, "curated", backbone, key, size, ratio, device, args)[1]
        curated = F.normalize(emb["features"][emb["readable"]] - mean, dim=-1)
    # duplicates and contamination: on a copy descriptor trained on this pool, or on the CLS features
    copies, evaluation = None, None
    if args.copy_steps:
        readable = [p for p, ok in zip(paths, pool["readable"].tolist()) if ok]
        describe, dkey, dsize = cached_descriptor(backbone, readable, cfg, device, args)
        copies = embed_sources(args.pool, "pool_copies", describe, dkey, dsize, 1.0, device, args)[1]
        copies = copies["features"]
        if args.eval_sets:
            emb = embed_sources(args.eval_sets, "eval_copies", describe, dkey, dsize, 1.0, device, args)[1]
            evaluation = emb["features"][emb["readable"]]
    elif args.eval_sets:
        emb = embed_sources(args.eval_sets, "eval", backbone, key, size, ratio, device, args)[1]
        evaluation = F.normalize(emb["features"][emb["readable"]] - mean, dim=-1)
    result = select(
        feats,
        pool["pixels"],
        pool["readable"],
        args.threshold,
        evaluation,
        curated,
        args.retrieve,
        args.retrieve_k,
        args.retrieve_clusters,
        args.balance,
        args.levels,
        args.seed,
        copies,
    )
    kept = [p for p, k in zip(paths, result["kept"].tolist()) if k]
    with open(os.path.join(args.out, "files.txt.tmp"), "w") as fh:
        fh.write("".join(os.path.abspath(p) + "\n" for p in kept))
    os.replace(os.path.join(args.out, "files.txt.tmp"), os.path.join(args.out, "files.txt"))
    if args.links:
        write_links(kept, os.path.join(args.out, "images"))
    report = write_report(paths, pool, result, args)
    for name, n in result["stages"]:
        print(f"{name:>24}: {n} images")
    warning = chaining_warning(result["sweep"], args.threshold)
    if warning:
        print(warning)
    print(
        f"wrote {os.path.join(args.out, 'files.txt')}: train with --data.dataset=folder --data.root=<that file>"
    )
    return report
