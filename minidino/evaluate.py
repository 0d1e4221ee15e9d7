"""Evaluation of frozen features: extraction, DINO's weighted k-NN classifier, and emergent segmentation
(the linear evaluations are minidino/linear_eval.py).

Weighted k-NN (Wu et al. 2018, arXiv 1805.01978; DINO arXiv 2104.14294, Sec. 4.1): features are
L2-normalised, the k training features most similar (cosine) to a test feature vote for their class with
weight exp(sim / T), T = 0.07, and the class with the largest total wins. No training, no hyper-parameters
to tune beyond k, which is why DINO reports it next to the linear probe.

Layer: the tools (README, "Read the code").
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import seeds
from .augment import eval_transform
from .data import DataError, build_dataset
from .dist import all_gather_cat, print0, rank, world_size
from .vit import VisionTransformer


@torch.no_grad()
def extract_tokens(
    backbone: torch.nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[Tensor, Tensor, Tensor]:
    """Raw CLS tokens (N, C), mean patch tokens (N, C) and labels (N,) of a dataset of (image, label, skipped)
    items, on CPU. Several processes split the images and gather the results (same order as one process)."""
    was_training = backbone.training
    backbone.eval()
    # several processes: each takes every world-th image (padded to equal counts), then all gather
    world, n = world_size(), len(dataset)
    per_rank = -(-n // world)
    ids = torch.arange(world)[:, None] + world * torch.arange(per_rank)[None, :]  # (P, per_rank) by rank
    my_ids = ids[rank()].where(ids[rank()] < n, 0)  # padding repeats image 0
    data = Subset(dataset, my_ids.tolist()) if world > 1 else dataset
    loader = DataLoader(data, batch_size, num_workers=num_workers)
    cls, avg, labels = [], [], []
    for images, y, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=rank() > 0):
        out = backbone(images.to(device, non_blocking=True))[0]
        cls.append(out["cls"].float())
        avg.append(out["patch"].float().mean(1))
        labels.append(y.to(out["cls"].device))
    backbone.train(was_training)
    parts = [torch.cat(t) for t in (cls, avg, labels)]
    if world > 1:  # rank-major (P * per_rank) rows back to dataset order, padding dropped
        flat, valid = ids.flatten(), ids.flatten() < n
        for i, t in enumerate(parts):
            everyone = all_gather_cat(t)[valid.to(t.device)]
            parts[i] = torch.empty_like(everyone)
            parts[i][flat[valid]] = everyone
    return tuple(t.cpu() for t in parts)


def extract_features(backbone: torch.nn.Module, dataset: Dataset, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """CLS features (N, C), L2-normalised (what the k-NN compares), and labels (N,); the arguments of
    `extract_tokens`."""
    cls, _, labels = extract_tokens(backbone, dataset, *args, **kwargs)
    return F.normalize(cls, dim=-1), labels


def cached(path: str, key: dict, compute) -> dict:
    """`compute()` (a dict of tensors), or what an earlier call with the same `key` stored at `path`. The file
    is written to a temporary name and renamed (a killed run leaves no half file); one that cannot be read (not
    a torch file, or from an older interrupted run) is recomputed, with a warning."""
    want = json.dumps(key, sort_keys=True)
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
            if saved.pop("key") == want:
                return saved
        except Exception as e:  # truncated, unsafe or not a cache at all: never trusted, recomputed
            print(f"warning: feature cache {path} is unreadable ({type(e).__name__}); computing it again")
    result = compute()
    torch.save({"key": want, **result}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    return result


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
        # (b, k_max, classes)
        votes = F.one_hot(train_labels[top_idx], n_classes).float() * weights.unsqueeze(-1)
        truth = test_labels[start : start + chunk]
        for k in ks:
            pred = votes[:, : min(k, k_max)].sum(1).argmax(1)
            correct[k] += (pred == truth).sum().item()
    return {k: 100.0 * c / test_features.shape[0] for k, c in correct.items()}


def knn_sets(cfg) -> tuple[Dataset, Dataset] | None:
    """The (train, held-out) splits of a `Config`'s data set with the deterministic evaluation transform, or
    None (and a line saying why) when the data set has no held-out split."""
    try:
        tf = eval_transform(cfg.data.eval_size, cfg.data.eval_crop_ratio)
        return tuple(build_dataset(cfg.data, split, tf, cfg.run.seed) for split in ("train", "test"))
    except DataError as e:
        print0(f"no k-NN evaluation: {e}")
        return None


def knn_against_random_init(cfg, backbone: torch.nn.Module, device, sets=None) -> dict:
    """k-NN (k = run.knn_k) of a trained `backbone` and of the same ViT at the run's random init, printed side
    by side; `sets` reuses the datasets of the k-NN curve. The random-init number depends only on the model,
    the seed and the evaluation data, so it is kept (`random_init_cache`) and reused by later runs."""
    sets = sets or knn_sets(cfg)
    if sets is None:
        return {}
    k, (train_set, test_set) = cfg.run.knn_k, sets
    kw = dict(ks=(k,), device=device, num_workers=cfg.data.num_workers)
    trained = knn_eval(backbone, train_set, test_set, **kw)[k]

    def random_init_knn() -> dict:
        seeds.model_init(cfg.run.seed)  # the student's initial weights
        return {"top1": torch.tensor(knn_eval(VisionTransformer(cfg.model).to(device), *sets, **kw)[k])}

    path, key = random_init_cache(cfg, sets)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    random_init = (cached(path, key, random_init_knn) if path else random_init_knn())["top1"].item()
    print0(
        f"k-NN top-1 (k={k}, {len(test_set)} held-out images): trained {trained:.1f}% | "
        f"random init {random_init:.1f}% | gain {trained - random_init:+.1f} points"
    )
    return {"knn_k": k, "knn_top1": trained, "knn_top1_random_init": random_init}


def random_init_cache(cfg, sets) -> tuple[str | None, dict]:
    """Where the random-init k-NN of this model, seed and evaluation data is kept (next to the run folder,
    in .random_init/), and its key; no file (None) with several processes, which would all write it."""
    data = {f: getattr(cfg.data, f) for f in ("dataset", "image_size", "n_train", "n_test", "eval_size")}
    data["root"] = os.path.abspath(cfg.data.root) if cfg.data.root else ""
    data["eval_crop_ratio"], data["sizes"] = cfg.data.eval_crop_ratio, [len(s) for s in sets]
    key = {"model": vars(cfg.model), "seed": cfg.run.seed, "k": cfg.run.knn_k, "data": data}
    if world_size() > 1:
        return None, key
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    folder = os.path.join(os.path.dirname(os.path.abspath(cfg.run.out_dir)), ".random_init")
    return os.path.join(folder, f"{name}.pt"), key


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


# ----------------------------------------------------------------------------------------------------------
# Emergent segmentation (DINO Sec. 4.2.1 and Fig. 3; DINOv2 Fig. 1): masks from attention and from PCA.


def jaccard(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union of bool masks (..., H, W) -> (...,); two empty masks score 1."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def attention_threshold_masks(attn: Tensor, mass: float = 0.6) -> Tensor:
    """DINO's attention masks: per map, the smallest set of patches holding `mass` of the attention.

    attn: (..., N) non-negative weights (the CLS row of the last block, one map per head) -> bool (..., N).
    """
    attn = attn / attn.sum(-1, keepdim=True)
    val, idx = attn.sort(dim=-1)  # ascending
    keep_sorted = val.cumsum(-1) > (1 - mass)  # drop the low tail that holds 1 - mass of the weight
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def cls_attention(backbone: torch.nn.Module, images: Tensor) -> Tensor:
    """Last-block attention of the CLS token to every patch, (B, heads, h, w) (registers dropped)."""
    attn = backbone.get_last_selfattention(images)  # (B, heads, T, T)
    B, H = attn.shape[:2]
    h, w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
    return attn[:, :, 0, 1 + backbone.n_registers :].reshape(B, H, h, w)


def pca_foreground(patch: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """DINOv2's PCA picture: patch features (B, N, C) of a batch -> (foreground (B, h, w) bool, first three
    components of the foreground patches as RGB (B, h, w, 3) in [0, 1], background black).

    The first principal component over all patches of the batch is thresholded at 0; its sign is chosen so
    that the image border is mostly background (objects sit inside the frame). A second PCA over the
    foreground patches gives the colours.
    """
    B, N, C = patch.shape
    x = patch.reshape(B * N, C).float()
    x = x - x.mean(0)
    first = torch.linalg.svd(x, full_matrices=False)[2][0]  # (C,)
    score = (x @ first).reshape(B, *hw)
    border = torch.ones(hw, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    if (score[:, border] > 0).float().mean() > 0.5:
        score = -score
    fg = score > 0
    rgb = torch.zeros(B, *hw, 3)
    fx = patch.reshape(B, *hw, C)[fg].float()
    if len(fx) >= 3:
        fx = fx - fx.mean(0)
        comps = fx @ torch.linalg.svd(fx, full_matrices=False)[2][:3].T  # (M, 3)
        lo, hi = comps.min(0).values, comps.max(0).values
        rgb[fg] = (comps - lo) / (hi - lo).clamp(min=1e-6)
    return fg, rgb


def upsample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Patch-grid bool masks (..., h, w) -> pixel masks (..., H, W) by nearest neighbour."""
    lead = masks.shape[:-2]
    up = F.interpolate(masks.reshape(-1, 1, *masks.shape[-2:]).float(), size=size, mode="nearest")
    return up.reshape(*lead, *size) > 0.5


@torch.no_grad()
def segmentation_scores(backbone: torch.nn.Module, images: Tensor, gt: Tensor, mass: float = 0.6) -> dict:
    """Jaccard of emergent masks against ground-truth foreground masks gt (B, H, W), averaged over images:
    each head's attention mask, the best head, the mean-of-heads attention mask, and the PCA foreground."""
    backbone.eval()
    attn = cls_attention(backbone, images)  # (B, heads, h, w)
    B, H, h, w = attn.shape
    size = tuple(images.shape[-2:])
    per_head_masks = attention_threshold_masks(attn.flatten(2), mass).reshape(B, H, h, w)
    per_head = jaccard(upsample_masks(per_head_masks, size), gt[:, None]).mean(0)  # (heads,)
    mean_mask = attention_threshold_masks(attn.mean(1).flatten(1), mass).reshape(B, h, w)
    mean_heads = jaccard(upsample_masks(mean_mask, size), gt).mean()
    patches = backbone.forward_features(images)["patch"]  # (B, N, C)
    fg, _ = pca_foreground(patches, (h, w))
    pca = jaccard(upsample_masks(fg, size), gt).mean()
    return {
        "jaccard_per_head": [round(v, 4) for v in per_head.tolist()],
        "jaccard_best_head": per_head.max().item(),
        "best_head": int(per_head.argmax()),
        "jaccard_mean_of_heads": mean_heads.item(),
        "jaccard_pca_foreground": pca.item(),
        "n_images": B,
    }
