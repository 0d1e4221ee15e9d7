"""Pictures: training curves from a run's log.jsonl (loss, schedules and DINO's collapse signals), attention
maps, PCA of patch features, and the curation report's image grids, cluster sizes and threshold sweep.

Layer: the tools (README, "Read the code")."""

from __future__ import annotations

import json

from matplotlib.figure import Figure


def _subplots(rows: int, cols: int, figsize: tuple, **kwargs):
    """A figure of its own, outside pyplot: it draws to a file on any machine (no display, no backend to
    choose), and a notebook that imports minidino keeps its inline figures."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kwargs)


def read_log(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_training_curves(log_path: str, out_path: str) -> str:
    """Loss terms, learning rate / teacher temperature, and collapse signals against the step, one PNG.

    The collapse panel shows the teacher's mean entropy and the KL of its batch-mean distribution from
    uniform next to ln K: entropy at ln K is uniform collapse, KL at ln K is one-prototype collapse.
    """
    rows = read_log(log_path)
    steps = [r["step"] for r in rows]
    knn = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    fig, axes = _subplots(1, 4 if knn else 3, figsize=(20 if knn else 15, 4))
    for key in sorted({k for r in rows for k in r if k.startswith("loss")}):
        axes[0].plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), label=key)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows], label="lr", color="tab:blue")
    axes[1].set(title="schedules", xlabel="step", ylabel="lr")
    twin = axes[1].twinx()
    twin.plot(steps, [r["teacher_temp"] for r in rows], label="teacher temp", color="tab:red")
    twin.set_ylabel("teacher temperature")
    axes[1].legend(loc="upper left")
    twin.legend(loc="upper right")
    axes[2].plot(steps, [r["teacher_entropy"] for r in rows], label="teacher entropy")
    axes[2].plot(steps, [r["teacher_kl_uniform"] for r in rows], label="KL(mean teacher || uniform)")
    axes[2].axhline(rows[-1]["ln_K"], color="gray", linestyle="--", label="ln K")
    axes[2].set(title="collapse signals (nats)", xlabel="step")
    axes[2].legend()
    if knn:
        axes[3].plot(*zip(*knn), marker="o")
        axes[3].set(title="k-NN top-1 of the teacher (%)", xlabel="step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def _show_image(ax, img) -> None:
    """img: (3, H, W) tensor normalised with the ImageNet statistics (eval_transform), or uint8 HWC."""
    import torch

    from .augment import IMAGENET_MEAN, IMAGENET_STD

    if isinstance(img, torch.Tensor) and img.dim() == 3 and img.shape[0] == 3:
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        img = (img.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(img)
    ax.axis("off")


def plot_attention_maps(images, attn, masks, out_path: str, jaccard=None) -> str:
    """DINO Fig. 3 style: per image, the image, each head's last-block CLS attention, and the mask keeping
    60% of the mean-of-heads attention mass. images (B, 3, H, W); attn (B, heads, h, w); masks (B, h, w)."""
    B, H = attn.shape[:2]
    fig, axes = _subplots(B, H + 2, figsize=(1.6 * (H + 2), 1.6 * B), squeeze=False)
    for i in range(B):
        _show_image(axes[i, 0], images[i])
        for j in range(H):
            axes[i, j + 1].imshow(attn[i, j].detach().cpu().numpy(), cmap="inferno")
            axes[i, j + 1].axis("off")
        axes[i, -1].imshow(masks[i].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i, -1].axis("off")
    for j in range(H):
        axes[0, j + 1].set_title(
            f"head {j}" + (f"\nJ={jaccard[j]:.2f}" if jaccard is not None else ""), fontsize=8
        )
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, -1].set_title("60% mass\n(mean of heads)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def plot_pca(images, foreground, rgb, out_path: str) -> str:
    """DINOv2 Fig. 1 style: images, the first principal component thresholded (foreground), and the next
    three components of a second PCA over the foreground patches as RGB.
    foreground (B, h, w) bool, rgb (B, h, w, 3)."""
    B = len(images)
    fig, axes = _subplots(3, B, figsize=(1.6 * B, 5), squeeze=False)
    for i in range(B):
        _show_image(axes[0, i], images[i])
        axes[1, i].imshow(foreground[i].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2, i].imshow(rgb[i].cpu().numpy())
        axes[1, i].axis("off")
        axes[2, i].axis("off")
    axes[0, 0].set_title("image", fontsize=8, loc="left")
    axes[1, 0].set_title("1st component > 0", fontsize=8, loc="left")
    axes[2, 0].set_title("PCA of foreground patches", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def plot_image_rows(
    rows: list[list], labels: list[str], out_path: str, titles: list[list[str]] | None = None
):
    """A grid of image files, one row per list of paths (rows may differ in length), each row labelled on the
    left; `titles`: a caption per image (e.g. 'kept' / 'removed'). Used for duplicate groups and clusters."""
    from PIL import Image

    cols = max((len(r) for r in rows), default=1)
    fig, axes = _subplots(len(rows), cols, figsize=(1.2 * cols + 1, 1.3 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(Image.open(row[j]).convert("RGB"))
                if titles:
                    ax.set_title(titles[i][j], fontsize=7)
        axes[i, 0].text(
            -0.1, 0.5, labels[i], transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=7
        )
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def plot_cluster_sizes(before, after, out_path: str, xlabel: str = "top-level cluster") -> str:
    """Images per cluster before and after balanced sampling, as two bar series sorted by the size before."""
    import numpy as np

    order = np.argsort(-np.asarray(before), kind="stable")
    x = np.arange(len(order))
    fig, ax = _subplots(1, 1, figsize=(max(5, 0.25 * len(order) + 2), 3.2))
    ax.bar(x - 0.2, np.asarray(before)[order], width=0.4, label="pool")
    ax.bar(x + 0.2, np.asarray(after)[order], width=0.4, label="balanced sample")
    ax.set(xlabel=f"{xlabel} (largest first)", ylabel="images", title="cluster sizes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def plot_threshold_sweep(sweep: list[dict], used: float, warn_share: float, out_path: str) -> str:
    """Deduplication against the threshold (rows of curate.threshold_sweep): images removed, and the share
    of them joined to their group's kept image only through chains, with the threshold used and the share
    that warns."""
    t = [r["threshold"] for r in sweep]
    fig, (left, right) = _subplots(1, 2, figsize=(8, 3))
    left.plot(t, [r["removed"] for r in sweep], marker="o")
    left.set(xlabel="threshold (cosine)", ylabel="images", title="removed as duplicates")
    right.plot(t, [100 * r["weak_share"] for r in sweep], marker="o")
    right.axhline(100 * warn_share, color="grey", linestyle="--", label="warning above")
    right.set(
        xlabel="threshold (cosine)", ylabel="% of removed", title="linked to the kept image only via others"
    )
    for ax in (left, right):
        ax.axvline(used, color="tab:red", linewidth=0.8, label="the threshold used")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path
