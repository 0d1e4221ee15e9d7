import torch
import torch.nn.functional as F

from minidino.koleo import koleo_loss, koleo_loss_grouped


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


def test_grouped_koleo_searches_neighbours_within_each_group_of_consecutive_images():
    """Groups of 7 of 35 images (odd, not a power of 2): each image's nearest neighbour is looked for only in
    its own group; the value is the mean over all 35 images, so it equals the mean of the groups' KoLeo."""
    torch.manual_seed(0)
    x = torch.randn(35, 11)
    xn = F.normalize(x, dim=-1)
    ref = 0.0
    for i in range(35):
        group = range(i // 7 * 7, i // 7 * 7 + 7)
        ref += -torch.log(min((xn[i] - xn[j]).norm() for j in group if j != i)).item()
    assert abs(koleo_loss_grouped(x, 7).item() - ref / 35) < 1e-5
    by_group = torch.stack([koleo_loss(g) for g in x.split(7)]).mean()
    torch.testing.assert_close(koleo_loss_grouped(x, 7), by_group)
    assert koleo_loss_grouped(x, 35).item() == koleo_loss(x).item()  # one group: DINOv2's per-GPU KoLeo
    assert koleo_loss_grouped(x, 7) < koleo_loss(x)  # neighbours among 6 images lie farther than among 34
