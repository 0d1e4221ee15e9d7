import torch
import torch.nn.functional as F

from minidino.koleo import koleo_loss


def test_equals_brute_force_nearest_neighbour_formula():
    torch.manual_seed(0)
    x = torch.randn(37, 11)
    xn = F.normalize(x, dim=-1)
    ref = 0.0
    for i in range(37):
        d = min((xn[i] - xn[j]).norm().item() for j in range(37) if j != i)
        ref += -torch.log(torch.tensor(d)).item()
    assert abs(koleo_loss(x).item() - ref / 37) < 1e-4


def test_finite_value_and_gradient_with_duplicates():
    x = torch.randn(5, 8)
    x = torch.cat([x, x[:2]]).requires_grad_(True)  # two exact duplicates
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_tiny_batches():
    assert koleo_loss(torch.randn(1, 4)).item() == 0.0
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert abs(koleo_loss(two).item() + torch.log(torch.tensor(2.0).sqrt()).item()) < 1e-6


def test_spread_points_have_lower_loss():
    torch.manual_seed(0)
    clumped = torch.randn(64, 16) * 0.01 + torch.ones(16)
    spread = torch.randn(64, 16)
    assert koleo_loss(spread) < koleo_loss(clumped)
