"""DINOv2's data curation at small scale: embed a pool of images, remove near-duplicates and copies of the
evaluation sets, optionally retrieve what is close to curated data, balance the concepts, write a file list.

    python -m minidino.curate POOL [POOL ...] --backbone runs/shapes --out runs/curated
        [--eval-sets DIR ...]            remove pool images that near-duplicate these (test-set decontamination)
        [--curated DIR ... --retrieve samples|clusters]   keep only the pool images near curated data
        [--balance N --levels 64,8]      N images sampled evenly over a hierarchical k-means of the pool
    python train.py --data.dataset=folder --data.root=runs/curated/files.txt

The steps, as the papers describe them:
1. Embed (DINOv2 Sec. 3 / App. A): every image through a self-supervised ViT (here any backbone eval.py loads:
   a minidino run or an official file): the CLS tokens of the image and of its mirror image, summed (so a
   mirrored copy is an exact match), minus the pool's mean feature (what all images share: without it a weakly
   trained backbone puts every pair near cosine 1), L2-normalised, so a dot product is a cosine similarity.
2. Deduplicate: pairs of pool images with cosine similarity >= threshold are joined, the connected components
   are the duplicate groups, and one image per group is kept (the one with most pixels; the first listed on
   a tie). DINOv2 uses a copy-detection network (SSCD, Pizzi et al. 2022) for this; minidino uses the same
   backbone for every step, and its threshold was chosen on held-out injected duplicates (DEFAULT_THRESHOLD;
   what it finds and misses is measured there: a copy-detection model is the better tool for crops).
3. Decontaminate: a pool image whose nearest evaluation image is at >= threshold is removed, so the
   evaluation sets stay unseen during pre-training.
4. Retrieve (DINOv2 App. A): sample-based, the k nearest pool images of each curated image; or cluster-based,
   k-means of the pool, and the clusters that are the nearest cluster of some curated image are kept.
5. Balance (Vo et al. 2024, arXiv 2405.15613): k-means of the pool, k-means of those centroids, and so on
   (`--levels`, finest first); N images are then drawn top-down, each cluster's share split evenly among its
   sub-clusters (a cluster smaller than its share gives all it has, the rest goes to the others), so a dominant
   mode is capped at its share instead of filling the data set. (Vo et al. also re-sample each level's
   k-means to move centroids off dense modes; plain k-means++ and Lloyd iterations here.)

Similarity search is exact: blocks of queries against all keys with a matmul and top-k, memory bounded by the
block size (~64 MB of scores at a time). That is fine to ~10^5 images on a CPU and ~10^6 on a GPU; beyond, an
approximate index (faiss IVF/HNSW) is the right tool, as the papers use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .augment import eval_transform
from .checkpoint import backbone_and_config
from .cli import error_line
from .config import ConfigError
from .data import UNREADABLE, DataError, file_list, flat_folder, load_rgb
from .dist import DEVICES, resolve_device
from .evaluate import cached
from .visualize import plot_cluster_sizes, plot_image_rows

# Cosine similarity at and above which two images count as copies, chosen on held-out injected duplicates of
# shapes images (`benchmarks/curation.py duplicates --seed 5`, the default run's backbone): the lowest threshold
# with pair precision >= 0.95. Checked on another pool (--seed 6): precision 0.97; recall 1.0 for exact copies,
# mirror images and colour shifts, 0.6 for JPEG re-encodes, ~0 for 1-2 px shifts and 90 % crops, which move
# the CLS token of this 4 x 4-patch ViT more than the step from one image to another does (README, Curation).
DEFAULT_THRESHOLD = 0.92
SCORE_BLOCK = 2**24  # similarity scores computed at once (queries x keys): 64 MB of float32


# ----------------------------------------------------------------------------------------------------------
# 1. Embedding


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
    backbone,
    paths: list[str],
    size: int,
    crop_ratio: float,
    device,
    batch_size=256,
    num_workers=0,
    desc="embed",
) -> dict:
    """{'features': (N, C), 'readable': (N,) bool, 'pixels': (N,) int64}. A feature is the sum of the CLS tokens
    of the image and of its mirror image, L2-normalised: a mirrored copy has exactly the same feature."""
    loader = DataLoader(_Files(paths, size, crop_ratio), batch_size, num_workers=num_workers)
    feats, readable, pixels = [], [], []
    for images, ok, px in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        x = images.to(device)
        cls = backbone(x)[0]["cls"].float() + backbone(x.flip(-1))[0]["cls"].float()  # mirror-invariant
        feats.append(F.normalize(cls, dim=-1).cpu())
        readable.append(ok)
        pixels.append(px)
    return {"features": torch.cat(feats), "readable": torch.cat(readable), "pixels": torch.cat(pixels)}


def cached_embedding(backbone, backbone_path: str, paths: list[str], cfg, cache: str, device, args) -> dict:
    """`embed`, stored under `cache` with a key of (backbone file and its mtime, the files and their sizes and
    mtimes, the image size): a second curation of the same pool with the same backbone does not embed again."""
    ckpt = os.path.join(backbone_path, "checkpoint.pt") if os.path.isdir(backbone_path) else backbone_path
    size, ratio = cfg.data.eval_size, cfg.data.eval_crop_ratio
    key = {
        "backbone": os.path.abspath(ckpt),
        "mtime": os.path.getmtime(ckpt),
        "files": _files_key(paths),
        "size": size,
        "crop_ratio": ratio,
        "feature": "cls + mirrored cls",
    }
    name = os.path.basename(cache).removesuffix(".pt")
    return cached(
        cache,
        key,
        lambda: embed(
            backbone, paths, size, ratio, device, args.batch_size, args.num_workers, f"embedding {name}"
        ),
    )


# ----------------------------------------------------------------------------------------------------------
# 2.-4. Similarity search, duplicates, contamination, retrieval


def nearest(queries: Tensor, keys: Tensor, k: int, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """The k most similar keys of each query: (similarities, indices), both (Q, k), computed in blocks of
    queries so that at most SCORE_BLOCK scores exist at once. `exclude_self` (queries == keys): no self-match."""
    k = min(k, len(keys) - exclude_self)
    block = max(1, SCORE_BLOCK // max(len(keys), 1))
    sims, ids = [], []
    for start in range(0, len(queries), block):
        s = queries[start : start + block] @ keys.T
        if exclude_self:
            rows = torch.arange(len(s))
            s[rows, rows + start] = -math.inf
        top = s.topk(k, dim=1)
        sims.append(top.values)
        ids.append(top.indices)
    return torch.cat(sims), torch.cat(ids)


def components(n: int, pairs: Tensor) -> Tensor:
    """Connected components of the graph on n nodes with edges `pairs` (E, 2): a root id per node
    (union-find with path halving)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return torch.tensor([root(i) for i in range(n)])


def duplicate_groups(features: Tensor, pixels: Tensor, threshold: float, k: int = 32) -> list[list[int]]:
    """Groups (of >= 2 images) whose members are joined by similarities >= threshold, each listed with the
    image to keep first (most pixels, then the lowest index). Each image links to its k most similar others;
    larger groups are still found whole, through chains of links."""
    if len(features) < 2:
        return []
    sims, ids = nearest(features, features, k, exclude_self=True)
    linked = sims >= threshold
    rows = torch.arange(len(features))[:, None].expand_as(ids)
    root = components(len(features), torch.stack([rows[linked], ids[linked]], 1))
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(root.tolist()):
        groups.setdefault(r, []).append(i)
    return [sorted(g, key=lambda i: (-int(pixels[i]), i)) for g in groups.values() if len(g) > 1]


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
# 5. Balance: hierarchical k-means and balanced sampling


def kmeans(x: Tensor, k: int, seed: int, iters: int = 20) -> tuple[Tensor, Tensor]:
    """Spherical k-means of L2-normalised rows: (k, C) unit centroids and (N,) assignments. k-means++ seeding
    (each next centroid drawn with probability proportional to its squared distance to the chosen ones), then
    Lloyd iterations; an emptied cluster is re-seeded with the point farthest from its centroid."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    chosen = [int(torch.randint(len(x), (1,), generator=g))]
    dist = (2 - 2 * x @ x[chosen[0]]).clamp_min(0)  # squared distance of unit vectors
    for _ in range(k - 1):
        nxt = int(torch.multinomial(dist + 1e-12, 1, generator=g))
        chosen.append(nxt)
        dist = torch.minimum(dist, (2 - 2 * x @ x[nxt]).clamp_min(0))
    centroids = x[chosen].clone()
    for _ in range(iters):
        sims, assign = nearest(x, centroids, 1)
        sums = torch.zeros_like(centroids).index_add_(0, assign[:, 0], x)
        counts = torch.bincount(assign[:, 0], minlength=k)
        for c in (counts == 0).nonzero().flatten().tolist():  # re-seed empty clusters
            far = int(sims[:, 0].argmin())
            sums[c], sims[far, 0] = x[far], math.inf
        centroids = F.normalize(sums, dim=-1)
    return centroids, nearest(x, centroids, 1)[1][:, 0]


def hierarchical_kmeans(x: Tensor, levels: tuple[int, ...], seed: int) -> list[Tensor]:
    """Vo et al.'s hierarchy: k-means of the points into levels[0] clusters, of those centroids into levels[1],
    ... Returns, per level, the cluster of every point (N,) at that level (finest first)."""
    labels, points = [], x
    for depth, k in enumerate(levels):
        centroids, assign = kmeans(points, k, seed + depth)
        labels.append(assign if depth == 0 else assign[labels[-1]])
        points = centroids
    return labels


def split_evenly(n: int, sizes: list[int]) -> list[int]:
    """How many to take from each group: as equal as possible, never more than a group has, min(n, total) in
    all (water-filling: small groups give everything, what they cannot give goes to the others)."""
    take, left = [0] * len(sizes), min(n, sum(sizes))
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))  # smallest first
    for pos, i in enumerate(order):  # floor shares: the rounding rolls on to the larger groups
        take[i] = min(sizes[i], left // (len(order) - pos))
        left -= take[i]
    return take


def balanced_sample(labels: list[Tensor], n: int, seed: int, among: Tensor | None = None) -> Tensor:
    """n point indices (sorted) drawn top-down over the hierarchy `labels` (from `hierarchical_kmeans`): the top
    level's clusters share n evenly, each splits its share evenly among its sub-clusters, and the finest
    clusters give random members. `among`: the candidate points (default all)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.arange(len(labels[0])) if among is None else among

    def draw(points: Tensor, depth: int, n: int) -> list[Tensor]:
        if depth < 0 or n >= len(points):
            return [points[torch.randperm(len(points), generator=g)[:n]]]
        groups = [points[labels[depth][points] == c] for c in labels[depth][points].unique().tolist()]
        takes = split_evenly(n, [len(p) for p in groups])
        return [part for p, t in zip(groups, takes) if t for part in draw(p, depth - 1, t)]

    return torch.cat(draw(points, len(labels) - 1, n)).sort().values


def pair_scores(found: list[list[int]], truth: list[list[int]]) -> tuple[float, float]:
    """Precision and recall of the image pairs that share a group: found groups against true ones (a chain
    that wrongly merges two groups costs every pair it adds)."""

    def pairs(groups):
        return {(a, b) for g in groups for a in g for b in g if a < b}

    got, want = pairs(found), pairs(truth)
    hits = len(got & want)
    return hits / max(len(got), 1), hits / max(len(want), 1)


def entropy(counts: Tensor) -> float:
    """Shannon entropy (nats) of a histogram: ln(number of bins) when balanced, 0 when one bin holds all."""
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


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
) -> dict:
    """Steps 2-5 on the pool's features (N, C) (and those of the evaluation / curated sets, same space):
    returns {'kept': (N,) bool, 'stages': [(name, images left)], 'groups': duplicate groups (pool indices,
    kept image first), 'contaminated': pool indices, 'levels': cluster labels per level of the images left
    before balancing, 'candidates': their pool indices}."""
    keep = readable.clone()
    stages = [("pool", len(keep)), ("readable", int(keep.sum()))]
    idx = keep.nonzero()[:, 0]
    groups = [idx[g].tolist() for g in duplicate_groups(features[idx], pixels[idx], threshold)]
    for g in groups:
        keep[g[1:]] = False
    stages.append(("deduplicated", int(keep.sum())))
    bad = torch.zeros_like(keep)
    if evaluation is not None and len(evaluation):
        bad = contaminated(features, evaluation, threshold) & keep
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
        "contaminated": bad.nonzero()[:, 0].tolist(),
        "levels": labels,
        "candidates": candidates,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minidino.curate", description=__doc__.split("\n\n")[0])
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
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"cosine similarity of copies (default {DEFAULT_THRESHOLD}, chosen on shapes: README)",
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
    if not 0 < args.threshold <= 1:
        raise ConfigError(f"--threshold: expected a cosine similarity in (0, 1], got {args.threshold}")
    for name in ("retrieve_k", "retrieve_clusters", "balance", "batch_size", "num_workers"):
        lowest = 1 if name in ("retrieve_k", "batch_size") else 0
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


def embed_sources(sources: list[str], what: str, backbone, cfg, device, args) -> tuple[list[str], dict]:
    """Paths and embeddings of several folders / file lists, each cached under <out>/cache/."""
    paths, parts = [], []
    for src in sources:
        src_paths = image_paths(src)
        tag = hashlib.sha1(os.path.abspath(src).encode()).hexdigest()[:8]
        cache = os.path.join(args.out, "cache", f"{what}_{os.path.basename(os.path.normpath(src))}_{tag}.pt")
        parts.append(cached_embedding(backbone, args.backbone, src_paths, cfg, cache, device, args))
        paths += src_paths
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if not emb["readable"].any():
        raise DataError(f"none of the {len(paths)} images of {what} {', '.join(sources)} could be read")
    return paths, emb


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    backbone, cfg = backbone_and_config(args.backbone)
    backbone.to(device)
    os.makedirs(os.path.join(args.out, "cache"), exist_ok=True)
    paths, pool = embed_sources(args.pool, "pool", backbone, cfg, device, args)
    mean = pool["features"][pool["readable"]].mean(0)  # what every image shares: removed before comparing

    def centred(emb: dict) -> Tensor:
        return F.normalize(emb["features"][emb["readable"]] - mean, dim=-1)

    feats = F.normalize(pool["features"] - mean, dim=-1)
    others = {}
    for what, sources in (("eval", args.eval_sets), ("curated", args.curated)):
        others[what] = (
            centred(embed_sources(sources, what, backbone, cfg, device, args)[1]) if sources else None
        )
    result = select(
        feats,
        pool["pixels"],
        pool["readable"],
        args.threshold,
        others["eval"],
        others["curated"],
        args.retrieve,
        args.retrieve_k,
        args.retrieve_clusters,
        args.balance,
        args.levels,
        args.seed,
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
    print(
        f"wrote {os.path.join(args.out, 'files.txt')}: train with --data.dataset=folder --data.root=<that file>"
    )
    return report


def write_links(kept: list[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # a second run replaces the links of the first
        os.remove(os.path.join(folder, name))
    for i, p in enumerate(kept):
        os.symlink(os.path.abspath(p), os.path.join(folder, f"{i:06d}_{os.path.basename(p)}"))


def write_report(paths: list[str], pool: dict, result: dict, args) -> dict:
    """report.json (counts and settings), report.md with the figures: duplicate groups, samples of the
    top-level clusters, cluster sizes before and after balancing."""
    top = result["levels"][-1]
    sizes = torch.bincount(top)
    in_sample = result["kept"][result["candidates"]]
    after = torch.bincount(top[in_sample], minlength=len(sizes))
    report = {
        "stages": dict(result["stages"]),
        "unreadable": [p for p, ok in zip(paths, pool["readable"].tolist()) if not ok],
        "duplicate_groups": len(result["groups"]),
        "contaminated": [paths[i] for i in result["contaminated"]],
        "threshold": args.threshold,
        "levels": [int(lab.max()) + 1 for lab in result["levels"]],
        "top_cluster_sizes": sizes.tolist(),
        "top_cluster_sizes_after": after.tolist(),
        "top_cluster_entropy": [entropy(sizes), entropy(after)],
        "figures": {},
    }
    g = torch.Generator().manual_seed(args.seed)
    if result["groups"]:
        groups = sorted(result["groups"], key=len, reverse=True)[:8]
        rows = [[paths[i] for i in grp[:10]] for grp in groups]
        titles = [["kept"] + ["removed"] * (len(r) - 1) for r in rows]
        labels = [f"{len(grp)} images" for grp in groups]
        report["figures"]["duplicates"] = plot_image_rows(
            rows, labels, os.path.join(args.out, "duplicates.png"), titles
        )
    clusters = sizes.argsort(descending=True)[:10].tolist()
    rows = []
    for c in clusters:
        members = result["candidates"][top == c]
        rows.append([paths[i] for i in members[torch.randperm(len(members), generator=g)[:8]].tolist()])
    labels = [f"cluster {c}\n{int(sizes[c])} images" for c in clusters]
    report["figures"]["clusters"] = plot_image_rows(rows, labels, os.path.join(args.out, "clusters.png"))
    report["figures"]["cluster_sizes"] = plot_cluster_sizes(
        sizes.tolist(), after.tolist(), os.path.join(args.out, "cluster_sizes.png")
    )
    report["figures"] = {k: os.path.basename(v) for k, v in report["figures"].items()}
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    lines = ["# Curation report", "", "| stage | images |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in result["stages"]]
    lines += [
        "",
        f"Duplicate groups: {len(result['groups'])} (cosine >= {args.threshold}); unreadable files: "
        f"{len(report['unreadable'])}; contaminated: {len(report['contaminated'])}.",
        f"Entropy of the top-level cluster sizes: {report['top_cluster_entropy'][0]:.3f} nats in the pool, "
        f"{report['top_cluster_entropy'][1]:.3f} in the output (ln {len(sizes)} = {math.log(len(sizes)):.3f}: "
        "balanced).",
        "",
    ]
    lines += [f"![{k}]({v})\n" for k, v in report["figures"].items()]
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(lines))
    return report


# ----------------------------------------------------------------------------------------------------------
# A messy pool of shapes images, for the tests, the tutorial and the README's measurement

NEAR_DUPLICATES = ("jpeg", "crop", "shift", "flip", "colour", "exact")


def near_duplicate(img, kind: str, rng):
    """A copy of a PIL image as a web pool would hold it: re-encoded as JPEG, slightly cropped and resized
    back, shifted by 1-2 px, mirrored, colour-shifted, or an exact copy. `rng`: a numpy Generator."""
    import io

    import numpy as np
    from PIL import Image, ImageEnhance

    w, h = img.size
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop":
        side = rng.uniform(0.88, 0.95)
        cw, ch = round(w * side), round(h * side)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    if kind == "shift":
        dy, dx = (int(rng.choice([-2, -1, 1, 2])) for _ in range(2))
        return Image.fromarray(np.roll(np.asarray(img), (dy, dx), axis=(0, 1)))
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
    import numpy as np

    from .data import draw_shape

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


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {error_line(e)}")
