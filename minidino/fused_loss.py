"""DINO's loss in closed form, `--loss.fused_dino_loss` (an optimisation; the plain form is losses.dino_loss).

For a student crop j compared with n_j teacher crops, the n_j cross-entropies add up to one term,
n_j LSE(s_j / tau) - <T_j, s_j> / tau, with T_j the sum of those teachers' targets: 2 + n terms per step
instead of 2 (2 + n - 1) pair products, and no fp32 log-probabilities kept for the backward.

Layer: the method (README, "Read the code"; read after losses.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def fp32_at_least(x: Tensor) -> Tensor:  # bf16/fp16 logits are upcast; fp64 stays fp64 (the tests)
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _CrossEntropyToTargets(torch.autograd.Function):
    """sum over rows of n * LSE(s / tau) - <T, s> / tau for logits s (B, K) and summed targets T (B, K):
    the cross-entropies of one student crop against the n teacher crops whose targets add up to T (each a
    distribution, so the n log-partition terms add up to n * LSE). Saves only s (in its own dtype) and the
    B log-partitions for the backward; the fp32 copy of s lives one crop at a time."""

    @staticmethod
    def forward(ctx, s: Tensor, targets: Tensor, n: float, tau: float) -> Tensor:
        z = fp32_at_least(s) / tau
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(s, targets, lse)
        ctx.n, ctx.tau = n, tau
        return (n * lse - (targets * z).sum(-1)).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        s, targets, lse = ctx.saved_tensors
        probs = torch.exp(fp32_at_least(s) / ctx.tau - lse[:, None])  # the student's softmax, recomputed
        grad_s = (ctx.n * probs - targets) * (grad / ctx.tau)
        return grad_s.to(s.dtype), None, None, None


def dino_loss_fused(
    student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float, local_weight: float = 1.0
) -> Tensor:
    """`dino_loss` in closed form: per student crop j one term, n_j LSE(s_j / tau_s) - <T_j, s_j> / tau_s,
    with T_j the sum of the targets of the n_j teacher crops it is compared with (all but its own view):
    2 + n terms instead of the 2 (2 + n - 1) pair products, and no fp32 log-probabilities kept for the
    backward. Equal to `dino_loss` as far as each target sums to 1 (in fp32, to ~1e-7; tests: fp64,
    gradcheck); `--loss.fused_dino_loss`."""
    total_targets = torch.stack(teacher_probs).sum(0)  # (B, K)
    n_teacher, batch = len(teacher_probs), student_logits[0].shape[0]
    total, n_pairs = 0.0, 0
    for j, s in enumerate(student_logits):
        own = j < n_teacher  # a global crop: its own view is not a target
        targets = total_targets - teacher_probs[j] if own else total_targets
        n = n_teacher - own
        if n:
            term = _CrossEntropyToTargets.apply(s, targets, float(n), student_temp)
            total = total + (term if own else local_weight * term)
            n_pairs += n
    return total / (n_pairs * batch)
