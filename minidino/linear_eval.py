"""Linear evaluation of frozen features: a linear classifier trained on top of a backbone that does not change.

Three protocols; every learning rate of the sweep trains its own classifier on the same batches, so the
sweep costs one pass of the backbone per step, as DINOv2's linear evaluation does:

  dino     DINO's eval_linear.py (Caron et al. 2021, arXiv 2104.14294, Sec. 4.1 and App. B), the number to
           compare with the paper: features are the CLS tokens of the last n blocks concatenated (n = 4 for
           ViT-S), plus the mean patch token of the last block for ViT-B (`avgpool`, with n = 1); each lr
           trains for 100 epochs with SGD (momentum 0.9, no weight decay, lr x batch / 256, cosine decay) on
           random-resized-crop + flip views of the *whole* training split, features computed anew every
           step; the validation split (centre crops) is scored after every epoch, and the best accuracy over
           epochs and learning rates is reported (eval_linear.py keeps `max(best_acc, acc1)`).
  heldout  the same training on 90% of the training split, the lr chosen on the other 10% (centre crops),
           the test split read once, for that one classifier: a number that chose nothing on the test split.
  fast     a quick probe on cached features of centre crops (CLS, or CLS + mean patch token), standardised:
           seconds instead of a pass of the backbone per epoch; lr chosen on a held-out tenth; not a number
           to compare with papers.

Layer: the tools (README, "Read the code").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # base learning rates, for a batch of 256


def held_out_split(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded `fraction` of the training split, at least one image, kept apart."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(n * fraction))
    return sorted(order[k:]), sorted(order[:k])


class LinearHeads(nn.Module):
    """One linear classifier per learning rate, trained together on the same features (DINO's init)."""

    def __init__(self, dim: int, n_classes: int, n_heads: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, n_classes) for _ in range(n_heads))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([head(x) for head in self.heads])  # (n_heads, B, n_classes)


def train_heads(
    batches, dim: int, n_classes: int, lrs, batch_size: int, epochs: int, steps: int, device, after_epoch=None
):
    """SGD (momentum 0.9, no weight decay, lr x batch / 256, cosine over all steps) of one head per lr;
    `batches(epoch)` yields (features (B, dim), labels (B,)) on `device`, `steps` of them per epoch;
    `after_epoch(heads, epoch)`, if given, is called after each epoch."""
    heads = LinearHeads(dim, n_classes, len(lrs)).to(device)
    groups = [{"params": h.parameters(), "lr": lr * batch_size / 256} for h, lr in zip(heads.heads, lrs)]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    total = max(1, epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )
    for epoch in tqdm(range(epochs), desc="linear", leave=False, dynamic_ncols=True):
        for x, y in batches(epoch):
            logits = heads(x)  # (n_heads, B, n_classes): the summed loss trains each head on its own
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(lrs)), reduction="sum") / len(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if after_epoch is not None:
            after_epoch(heads, epoch)
    return heads


@torch.no_grad()
def top1(heads: LinearHeads, x: Tensor, y: Tensor) -> list[float]:
    """Top-1 (%) of every head on features x (N, dim), labels y (N,)."""
    return [100.0 * (h(x).argmax(1) == y).float().mean().item() for h in heads.heads]


def choose_and_test(
    heads: LinearHeads, lrs, held: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> dict:
    """The lr whose head is best on the held-out part, and that head's test accuracy."""
    held_acc = top1(heads, *held)
    best = max(range(len(lrs)), key=held_acc.__getitem__)
    return {
        "held_out_top1": {str(lr): acc for lr, acc in zip(lrs, held_acc)},
        "best_lr": lrs[best],
        "top1": top1(heads, *test)[best],
    }


def linear_features(
    backbone: nn.Module, images: Tensor, n_last_blocks: int = 4, avgpool: bool = False
) -> Tensor:
    """DINO's linear-evaluation features: CLS of the last n blocks concatenated (+ the last block's mean
    patch token with avgpool), (B, C * (n + avgpool))."""
    layers = backbone.get_intermediate_layers(images, n_last_blocks)
    feats = [x[:, 0] for x in layers]
    if avgpool:
        feats.append(layers[-1][:, 1 + backbone.n_registers :].mean(1))
    return torch.cat(feats, dim=-1)


@torch.no_grad()
def _features(backbone, dataset: Dataset, device, n_last_blocks, avgpool, batch_size, num_workers):
    xs, ys = [], []
    for images, labels, _ in DataLoader(dataset, batch_size, num_workers=num_workers):
        xs.append(linear_features(backbone, images.to(device), n_last_blocks, avgpool).float())
        ys.append(labels.to(device))
    return torch.cat(xs), torch.cat(ys)


def dino_linear_eval(
    backbone: nn.Module,
    train_views: Dataset,
    train_plain: Dataset,
    test_set: Dataset,
    n_classes: int,
    device,
    n_last_blocks: int = 4,
    avgpool: bool = False,
    epochs: int = 100,
    batch_size: int = 256,
    lrs: tuple[float, ...] = LRS,
    seed: int = 0,
    num_workers: int = 0,
    protocol: str = "dino",
) -> dict:
    """DINO's protocol ('dino') or its held-out variant ('heldout'), see the module docstring. train_views:
    the training split with `augment.linear_train_transform`; train_plain and test_set: centre crops
    (`augment.eval_transform`, 0.875 at 224 px)."""
    backbone.eval()
    if protocol not in ("dino", "heldout"):
        raise ValueError(f"linear protocol {protocol!r}: expected dino or heldout")
    train_idx, held_idx = held_out_split(len(train_views), seed=seed)
    train = Subset(train_views, train_idx) if protocol == "heldout" else train_views
    steps = -(-len(train) // batch_size)
    args = (device, n_last_blocks, avgpool, batch_size, num_workers)

    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)  # the order of this epoch
        loader = DataLoader(train, batch_size, shuffle=True, generator=g, num_workers=num_workers)
        for images, labels, _ in loader:
            with torch.no_grad():
                x = linear_features(backbone, images.to(device), n_last_blocks, avgpool).float()
            yield x, labels.to(device)

    dim = backbone.embed_dim * (n_last_blocks + avgpool)
    features = f"CLS of the last {n_last_blocks} blocks" + (" + mean patch token" if avgpool else "")
    if protocol == "heldout":
        heads = train_heads(batches, dim, n_classes, lrs, batch_size, epochs, steps, device)
        held = _features(backbone, Subset(train_plain, held_idx), *args)
        result = choose_and_test(heads, lrs, held, _features(backbone, test_set, *args))
        how = "90% of the training split; lr chosen on the other 10% (centre crops); test split read once"
        return {
            "protocol": f"DINO eval_linear, held-out lr: {features}; {epochs} epochs of SGD on {how}",
            **result,
        }
    test = _features(backbone, test_set, *args)  # centre crops: the same features every epoch
    curves = []  # (epochs, lrs) top-1 on the validation split after each epoch

    def score(heads, epoch):
        curves.append(top1(heads, *test))

    train_heads(batches, dim, n_classes, lrs, batch_size, epochs, steps, device, score)
    acc = torch.tensor(curves)  # (epochs, lrs)
    epoch, best = divmod(int(acc.argmax()), len(lrs))
    return {
        "protocol": f"DINO eval_linear: {features}; {epochs} epochs of SGD on random-resized-crop + flip views "
        "of the whole training split, one classifier per lr; best validation top-1 over epochs and lrs",
        "top1": acc.max().item(),
        "best_lr": lrs[best],
        "best_epoch": epoch + 1,
        "top1_per_lr": {str(lr): acc[:, i].max().item() for i, lr in enumerate(lrs)},
    }


def fast_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    device,
    epochs: int = 100,
    batch_size: int = 256,
    lrs: tuple[float, ...] = LRS,
    seed: int = 0,
) -> dict:
    """The quick probe on cached, standardised features (N, dim); lr chosen on a held-out tenth of the
    training split."""
    train_idx, held_idx = held_out_split(len(train_x), seed=seed)
    mean, std = train_x[train_idx].mean(0), train_x[train_idx].std(0).clamp(min=1e-6)
    tx, ty = ((train_x - mean) / std).to(device), train_y.to(device)
    fit_x, fit_y = tx[train_idx], ty[train_idx]
    steps = -(-len(fit_x) // batch_size)

    def batches(epoch: int):
        order = torch.randperm(len(fit_x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for idx in order.to(device).split(batch_size):
            yield fit_x[idx], fit_y[idx]

    n_classes = int(max(train_y.max(), test_y.max())) + 1
    heads = train_heads(batches, tx.shape[1], n_classes, lrs, batch_size, epochs, steps, device)
    test = (((test_x - mean) / std).to(device), test_y.to(device))
    result = choose_and_test(heads, lrs, (tx[held_idx], ty[held_idx]), test)
    protocol = "fast probe: cached centre-crop features, standardised; lr chosen on a held-out 10% of train"
    return {"protocol": protocol, **result}
