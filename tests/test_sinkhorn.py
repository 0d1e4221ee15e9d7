import torch

from minidino.sinkhorn import sinkhorn_knopp


def _dense_reference(logits, temp, n_iters):
    """Sinkhorn-Knopp written the textbook way with explicit diagonal scalings, in float64."""
    Q = torch.exp(logits.double() / temp).T  # (K, B)
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iters):
        Q = torch.diag(1.0 / (K * Q.sum(1))) @ Q
        Q = Q @ torch.diag(1.0 / (B * Q.sum(0)))
    return (Q * B).T


def test_marginals_odd_shapes():
    torch.manual_seed(0)
    B, K = 37, 97
    logits = torch.randn(B, K)
    # many iterations: both marginals converge
    P = sinkhorn_knopp(logits, 0.1, n_iters=200)
    torch.testing.assert_close(P.sum(1), torch.ones(B))  # each sample is a distribution
    torch.testing.assert_close(P.sum(0), torch.full((K,), B / K), rtol=1e-3, atol=1e-3)  # prototypes balanced
    # after 3 iterations the last normalisation (columns of Q = samples) is exact
    P3 = sinkhorn_knopp(logits, 0.1, n_iters=3)
    torch.testing.assert_close(P3.sum(1), torch.ones(B))


def test_matches_dense_reference():
    torch.manual_seed(1)
    for B, K in [(5, 13), (19, 7), (64, 257)]:
        logits = torch.randn(B, K) * 3
        torch.testing.assert_close(
            sinkhorn_knopp(logits, 0.07, 3).double(), _dense_reference(logits, 0.07, 3), rtol=1e-4, atol=1e-6
        )


def test_stable_with_large_logits():
    logits = torch.randn(16, 33) * 1000.0  # exp(logits / temp) overflows without the max shift
    P = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P.sum(1), torch.ones(16))


def test_balances_a_collapsed_teacher():
    # every sample prefers prototype 0: softmax would give one mode; Sinkhorn spreads the batch
    logits = torch.zeros(8, 8)
    logits[:, 0] = 1.0
    logits += 0.01 * torch.arange(64.0).reshape(8, 8).sin()
    P = sinkhorn_knopp(logits, 0.1, n_iters=50)
    assert P.sum(0).max() < 1.5  # no prototype takes much more than its 1/K share of 8 samples
