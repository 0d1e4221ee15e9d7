"""KoLeo regulariser (Sablayrolles et al. 2018, arXiv 1806.03198; DINOv2, arXiv 2304.07193, Sec. 4).

Derived from the Kozachenko-Leonenko differential entropy estimator: on a batch of L2-normalised features
x_1..x_n,

    L_koleo = -(1/n) sum_i log( min_{j != i} ||x_i - x_j|| )

Pushing every point away from its nearest neighbour spreads the features uniformly over the sphere. DINOv2
applies it to the student's CLS features (before the head) of each global crop and sums the two terms, per
process, weight 0.1 (minidino.losses.Losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """x: (n, D) features (normalised here). Finite value and gradient even with duplicate points.

    Duplicates have distance 0: the distance is computed as sqrt(||d||^2 + eps), whose gradient at d = 0 is 0
    (plain ||d|| has an undefined gradient there), and log never sees 0. With fewer than 2 points there is
    no neighbour and the loss is 0.
    """
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():  # the neighbour search needs no gradient
        sims = x @ x.T  # (n, n) cosine similarity; the most similar is the nearest on the sphere
        sims.fill_diagonal_(-2.0)  # never pick yourself
        nn_idx = sims.argmax(dim=1)  # (n,)
    dist = torch.sqrt(((x - x[nn_idx]) ** 2).sum(dim=-1) + eps)  # (n,)
    return -torch.log(dist).mean()
