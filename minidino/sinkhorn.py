"""Sinkhorn-Knopp centering of the teacher (SwAV, Caron et al. 2020, arXiv 2006.09882, Sec. 3.1 and App. A;
used by DINOv2, Oquab et al. 2023, arXiv 2304.07193, Sec. 4).

DINO centres the teacher with a running mean (losses.DINOLoss). DINOv2 instead makes the teacher targets of
a batch an (approximate) equipartition: every prototype is used equally often over the batch. With
Q = exp(g_t / tau_t)^T, a K x B matrix (prototypes x samples), Sinkhorn-Knopp alternately rescales

    rows:     each prototype's total mass -> 1/K
    columns:  each sample's total mass    -> 1/B

for a few iterations (3 by default), then multiplies by B so that each column (sample) sums to 1: the
target distribution of that sample over the K prototypes. In several processes the row sums and the batch
size are all-reduced, so the equipartition holds over the global batch.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _logsumexp(x: Tensor, dim: int | None = None) -> Tensor:
    """log(sum(exp(x))) over `dim` (all dims if None), summed over all processes when distributed."""
    local = torch.logsumexp(x, dim=dim, keepdim=True) if dim is not None else torch.logsumexp(x.flatten(), 0)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    top = local.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = torch.exp(local - top)
    dist.all_reduce(total)
    return top + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor, teacher_temp: float, n_iters: int = 3, valid: Tensor | None = None
) -> Tensor:
    """Teacher logits (B, K) -> targets (B, K) whose rows sum to 1 and whose columns are balanced.

    Computed on log Q, so that a division becomes a subtraction of a log-sum-exp: no overflow or 0/0 even
    when exp(g_t / tau_t) would overflow (large logits) or underflow (prototypes nobody picks).
    valid: optional (B,) bool; rows that are False (the padding of fixed-size mask buffers) take no part
    (log Q = -inf there, B counts the valid rows) and get all-zero targets.
    """
    log_Q = (teacher_logits.float() / teacher_temp).T  # (K, B): log of Q = exp(g_t / tau_t)^T
    K = log_Q.shape[0]
    if valid is None:
        B = torch.tensor(float(log_Q.shape[1]), device=log_Q.device)
    else:
        log_Q = log_Q.masked_fill(~valid[None], float("-inf"))
        B = valid.sum().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(B)  # the global batch size
    log_K, log_B = torch.log(torch.tensor(float(K))), torch.log(B)
    log_Q = log_Q - _logsumexp(log_Q)  # Q /= sum(Q)
    for _ in range(n_iters):
        log_Q = log_Q - _logsumexp(log_Q, dim=1) - log_K  # each prototype (row) sums to 1/K
        column = torch.logsumexp(log_Q, dim=0, keepdim=True)  # -inf for a padding column: left at -inf
        column = column.masked_fill(column == float("-inf"), 0.0)
        log_Q = log_Q - column - log_B  # each sample (column) sums to 1/B
    return torch.exp(log_Q + log_B).T  # x B: each sample's column sums to 1; (B, K)
