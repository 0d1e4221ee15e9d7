"""The feature-space tools of curation (minidino/curation/curate.py), on L2-normalised rows where a dot product is a
cosine similarity: exact nearest-neighbour search in blocks, connected components, spherical k-means, Vo et
al.'s hierarchical k-means (arXiv 2405.15613) and balanced sampling over it, and two scores.

The search is exact: blocks of queries against all keys with a matmul and top-k, at most SCORE_BLOCK scores at
a time, so memory stays bounded for any pool; an approximate index (faiss) is the tool beyond ~10^6 images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SCORE_BLOCK = 2**24  # similarity scores computed at once (queries x keys): 64 MB of float32


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
