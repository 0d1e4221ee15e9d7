import torch
import torch.nn.functional as F

from minidino.evaluate import knn_classify


def _brute_force(train_f, train_y, test_f, k, T, n_classes):
    preds = []
    for x in test_f:
        sims = [(float(x @ f), int(y)) for f, y in zip(train_f, train_y)]
        sims.sort(key=lambda s: -s[0])
        score = [0.0] * n_classes
        for s, y in sims[:k]:
            score[y] += torch.exp(torch.tensor(s / T)).item()
        preds.append(max(range(n_classes), key=lambda c: score[c]))
    return torch.tensor(preds)


def test_knn_perfect_on_separated_clusters():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(7, 33), dim=1) * 10
    train_y, test_y = torch.arange(7).repeat(20), torch.arange(7).repeat(5)
    train_f = F.normalize(centers[train_y] + torch.randn(140, 33), dim=1)
    test_f = F.normalize(centers[test_y] + torch.randn(35, 33), dim=1)
    acc = knn_classify(train_f, train_y, test_f, test_y, ks=(1, 10, 20), chunk=8)
    assert acc == {1: 100.0, 10: 100.0, 20: 100.0}


def test_knn_matches_brute_force_on_noisy_data():
    torch.manual_seed(1)
    train_f, test_f = F.normalize(torch.randn(97, 16), dim=1), F.normalize(torch.randn(41, 16), dim=1)
    train_y, test_y = torch.randint(0, 5, (97,)), torch.randint(0, 5, (41,))
    for k in (3, 20):
        pred = _brute_force(train_f, train_y, test_f, k, 0.07, 5)
        expected = 100.0 * (pred == test_y).float().mean().item()
        got = knn_classify(train_f, train_y, test_f, test_y, ks=(k,), chunk=10)[k]
        assert abs(got - expected) < 1e-6


def test_k_larger_than_train_set_is_clipped():
    f = F.normalize(torch.randn(6, 4), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    acc = knn_classify(f, y, f, y, ks=(200,))
    assert set(acc) == {200} and 0 <= acc[200] <= 100
