"""KoLeo regulariser (Sablayrolles et al. 2018, arXiv 1806.03198; DINOv2, arXiv 2304.07193, Sec. 4).

Derived from the Kozachenko-Leonenko differential entropy estimator: on a batch of L2-normalised features
x_1..x_n,

    L_koleo = -(1/n) sum_i log( min_{j != i} ||x_i - x_j|| )

Pushing every point away from its nearest neighbour spreads the features uniformly over the sphere. DINOv2
applies it to the student's CLS features (before the head) of each global crop and sums the two terms, weight
0.1 (minidino.losses.Losses), with the neighbours searched within each GPU's batch: 64 images in
ssl_default_config.yaml, 32 in vitl14.yaml (DINOv3 names that group: koleo_distributed_loss_group_size).
`koleo_loss_grouped` makes the group a number of images, `--loss.koleo_group`: consecutive images of the
global batch, whatever the number of processes and micro-batches that carry them.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dist import gather_rows, rank


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """x: (n, D) features (normalised here). Finite value and gradient even with duplicate points.

    Duplicates have distance 0: the distance is computed as sqrt(||d||^2 + eps), whose gradient at d = 0 is 0
    (plain ||d|| has an undefined gradient there), and log never sees 0. With fewer than 2 points there is
    no neighbour and the loss is 0.
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    return -torch.log(_nn_distance(x, eps)).mean()


def koleo_loss_grouped(x: Tensor, group: int, spans_processes: bool = False) -> Tensor:
    """KoLeo with each image's neighbour searched within its group of `group` consecutive images of the
    global batch: the mean over all images of -log(distance to the nearest other image of its group).

    x: (n, D), this process's images of one crop. `group` divides n: the groups lie within x. Otherwise
    (`spans_processes`) a group is several processes' consecutive rows: every process gathers the rows
    (with their gradients, `dist.gather_rows`), takes its own rows' groups and averages over its own rows,
    so the mean over processes (what DDP's gradient averaging computes) is the mean over all images.
    """
    n = x.shape[0]
    if not spans_processes:  # groups of equal size: the mean over the groups is the mean over the images
        return _per_image(x, group).mean()
    first = rank() * n // group * group  # the first row of this process's group
    mine = gather_rows(x)[first : first + group]  # (group, D): this group, several processes' rows
    return _per_image(mine, group)[rank() * n - first :][:n].mean()


def _per_image(x: Tensor, group: int, eps: float = 1e-8) -> Tensor:
    """-log(distance to the nearest neighbour within its group) of every row of x (m, D), m a multiple of
    group, as `koleo_loss` computes it."""
    return torch.cat([-torch.log(_nn_distance(g, eps)) for g in x.split(group)])


def _nn_distance(x: Tensor, eps: float) -> Tensor:
    """Each row's distance to its nearest other row, (n,), on the L2-normalised rows of x (n, D)."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():  # the neighbour search needs no gradient
        sims = x @ x.T  # (n, n) cosine similarity; the most similar is the nearest on the sphere
        sims.fill_diagonal_(-2.0)  # never pick yourself
        nn_idx = sims.argmax(dim=1)  # (n,)
    return torch.sqrt(((x - x[nn_idx]) ** 2).sum(dim=-1) + eps)
