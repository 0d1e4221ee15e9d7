"""Evaluation of frozen features: extraction and DINO's weighted k-NN classifier.

Weighted k-NN (Wu et al. 2018, arXiv 1805.01978; DINO arXiv 2104.14294, Sec. 4.1): features are
L2-normalised, the k training features most similar (cosine) to a test feature vote for their class with
weight exp(sim / T), T = 0.07, and the class with the largest total wins. No training, no hyper-parameters
to tune beyond k, which is why DINO reports it next to the linear probe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .dist import all_gather_cat, rank, world_size


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """CLS features (N, C), L2-normalised, and labels (N,) of a dataset of (image, label, skipped) items."""
    was_training = backbone.training
    backbone.eval()
    # several processes: each takes every world-th image (padded to equal counts), then all gather
    world, n = world_size(), len(dataset)
    per = -(-n // world)
    ids = torch.arange(world)[:, None] + world * torch.arange(per)[None, :]  # (P, per) image index by rank
    mine = ids[rank()].where(ids[rank()] < n, 0)
    loader = DataLoader(
        Subset(dataset, mine.tolist()) if world > 1 else dataset, batch_size, num_workers=num_workers
    )
    feats, labels = [], []
    for images, y, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=rank() > 0):
        out = backbone(images.to(device, non_blocking=True))[0]["cls"]
        feats.append(F.normalize(out.float(), dim=-1))
        labels.append(y.to(out.device))
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:  # rank-major (P * per) rows back to dataset order, padding dropped
        flat, valid = ids.flatten(), ids.flatten() < n
        everyone = (
            all_gather_cat(feats)[valid.to(feats.device)],
            all_gather_cat(labels)[valid.to(feats.device)],
        )
        feats, labels = torch.empty_like(everyone[0]), torch.empty_like(everyone[1])
        feats[flat[valid]], labels[flat[valid]] = everyone
    return feats.cpu(), labels.cpu()


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 512,
) -> dict[int, float]:
    """Top-1 accuracy (in %) of weighted k-NN for each k; features must be L2-normalised.

    Test features are processed in chunks so the (chunk, N_train) similarity matrix stays small.
    """
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), train_features.shape[0])
    correct = {k: 0 for k in ks}
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start : start + chunk] @ train_features.T  # (b, N_train) cosine similarities
        top_sim, top_idx = sim.topk(k_max, dim=1)  # (b, k_max), sorted
        weights = (top_sim / temperature).exp()
        votes = F.one_hot(train_labels[top_idx], n_classes).float() * weights.unsqueeze(
            -1
        )  # (b, k_max, classes)
        truth = test_labels[start : start + chunk]
        for k in ks:
            pred = votes[:, : min(k, k_max)].sum(1).argmax(1)
            correct[k] += (pred == truth).sum().item()
    return {k: 100.0 * c / test_features.shape[0] for k, c in correct.items()}


def knn_eval(
    backbone: torch.nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    device="cpu",
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_workers: int = 0,
    batch_size: int = 256,
) -> dict[int, float]:
    """Extract features of both splits and run the weighted k-NN."""
    train_f, train_y = extract_features(
        backbone, train_set, device, batch_size, num_workers, "train features"
    )
    test_f, test_y = extract_features(backbone, test_set, device, batch_size, num_workers, "test features")
    return knn_classify(train_f, train_y, test_f, test_y, ks, temperature)
