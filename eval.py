"""Evaluate a trained minidino backbone: what its frozen features can do, as numbers and pictures.

    python eval.py runs/shapes --all                    # everything below, into runs/shapes/eval/
    python eval.py runs/shapes                          # k-NN only (the default)
    python eval.py runs/shapes --linear --seg           # DINO's linear evaluation and the segmentation score
    python eval.py runs/shapes --all --random-init      # the architecture untrained (eval_random_init/)
    python eval.py runs/cifar10/checkpoint.pt --data data/cifar10 --knn
    python eval.py dinov2_vits14_pretrain.pth --data data/cifar10 --knn  # an official file (no download)
    python eval.py runs/shapes --export backbone.pth --layout timm       # weights out: dinov2, timm, dinov3

  --knn        weighted k-NN on L2-normalised CLS features, k = 10, 20, 100, 200, T = 0.07 (DINO Sec. 4.1)
  --linear     DINO's linear evaluation (eval_linear.py): CLS of the last 4 blocks (--avgpool adds the mean
               patch token), one classifier per lr trained 100 epochs on augmented views of the whole
               training split, the best validation top-1 over epochs and lrs (the paper's number)
  --linear-heldout  the same, lr chosen on a held-out tenth of the training split, the test split read once
  --linear-fast  a quick probe on cached features (CLS, and CLS + mean patch token), lr chosen on a tenth
  --attention  last-block CLS attention of every head over a grid of held-out images, DINO's 60%-mass masks
  --pca        DINOv2's PCA of patch features: first component thresholded, next three as RGB (one class)
  --seg        emergent segmentation on shapes (which has ground-truth masks): Jaccard of the attention masks
               (per head, best head, mean of heads) and of the PCA foreground, averaged over held-out images
  --all        all of the above (but --linear-heldout), plus the training curves from the run's log.jsonl

`--data` is `shapes` or a folder with train/<class>/ and test/<class>/ (or val/) sub-folders (default: the
run's own data). The teacher's backbone is evaluated (DINO reports the teacher). The report folder gets
report.json (every number, and under "protocols" how each was measured), report.md (numbers and figures)
and PNGs; features are cached there, so a second call with the same checkpoint and data is quick. Evaluation
images are centre crops of data.eval_size after resizing to eval_size / data.eval_crop_ratio (DINO: 256 ->
224; the 32 px presets keep the whole image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from minidino import cli
from minidino.augment import eval_transform, linear_train_transform
from minidino.checkpoint import backbone_and_config
from minidino.config import Config, ConfigError, DataConfig
from minidino.data import DataError, ShapesDataset, build_dataset
from minidino.dist import DEVICES, resolve_device
from minidino.evaluate import (
    attention_threshold_masks,
    cached,
    cls_attention,
    extract_tokens,
    knn_classify,
    pca_foreground,
    segmentation_scores,
    upsample_masks,
)
from minidino.linear_eval import dino_linear_eval, fast_linear_probe
from minidino.visualize import plot_attention_maps, plot_pca, plot_training_curves
from minidino.weights import SOURCES, export_backbone, load_checkpoint

TASKS = ("knn", "linear", "linear_heldout", "linear_fast", "attention", "pca", "seg")


def data_config(cfg: Config, data: str | None, size: int | None) -> DataConfig:
    d = cfg.data
    if data and data != "shapes":
        d.dataset, d.root = "imagefolder", data
    elif data == "shapes":
        d.dataset = "shapes"
    if size:
        d.eval_size = size
    return d


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("checkpoint", help="run folder, checkpoint.pt, or a backbone file (DINO, DINOv2, timm)")
    p.add_argument("--data", help="'shapes' or a folder with train/ and test/ (default: the run's data set)")
    for task in TASKS:
        p.add_argument(f"--{task.replace('_', '-')}", action="store_true", help=f"run the {task} evaluation")
    p.add_argument("--all", action="store_true", help="every evaluation but --linear-heldout, and the curves")
    p.add_argument("--ks", default="10,20,100,200", help="k values of the k-NN (default 10,20,100,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature T (default 0.07)")
    p.add_argument("--size", type=int, help="evaluation image size (default: the run's data.eval_size)")
    p.add_argument("--random-init", action="store_true", help="evaluate the architecture at random init")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seg-images", type=int, default=256, help="held-out images scored by --seg")
    p.add_argument("--linear-epochs", type=int, default=100, help="epochs of --linear (DINO: 100)")
    p.add_argument(
        "--n-last-blocks", type=int, default=4, help="CLS tokens of the last n blocks (DINO ViT-S: 4)"
    )
    p.add_argument(
        "--avgpool", action="store_true", help="--linear also reads the mean patch token (DINO ViT-B)"
    )
    p.add_argument(
        "--source",
        choices=SOURCES,
        help="where a backbone file comes from, when its keys do not tell it (a timm ViT without registers,\n"
        "LayerScale or head reads as DINO's): sets how positions are resized at other sizes",
    )
    p.add_argument("--out", help="report folder (default: <run>/eval or <run>/eval_random_init)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--export", help="write the teacher backbone to this file instead (a plain state dict)")
    p.add_argument(
        "--layout",
        choices=("dinov2", "timm", "dinov3"),
        help="key layout of --export (default: dinov3 for a RoPE ViT, else dinov2)",
    )
    return p.parse_args(argv)


def cached_tokens(backbone, dataset, split: str, key: dict, out: str, device, args) -> tuple:
    """extract_tokens, stored in the report folder under a key of (checkpoint, its mtime, data, size)."""

    def compute() -> dict:
        desc = f"{split} features"
        cls, avg, labels = extract_tokens(backbone, dataset, device, args.batch_size, args.num_workers, desc)
        return {"cls": cls, "avg": avg, "labels": labels}

    saved = cached(os.path.join(out, f"features_{split}.pt"), key, compute)
    return saved["cls"], saved["avg"], saved["labels"]


def first_of_class(dataset, label: int, n: int) -> list[int]:
    targets = getattr(dataset, "targets", None) or [dataset[i][1] for i in range(len(dataset))]
    return [i for i, t in enumerate(targets) if t == label][:n]


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    tasks = [t for t in TASKS if (args.all and t != "linear_heldout") or getattr(args, t)] or ["knn"]
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise ConfigError(f"--ks: expected comma-separated integers, got {args.ks!r}") from None
    device = resolve_device(args.device)
    if args.export:  # the teacher backbone as a plain file, then nothing else
        note = export_backbone(load_checkpoint(args.checkpoint), args.export, args.layout)
        layout = args.layout or "the run's"
        print(f"wrote {args.export} ({layout} layout)" + (f"\n{note}" if note else ""))
        return {"export": args.export}
    backbone, cfg = backbone_and_config(args.checkpoint, args.random_init, args.source)
    if args.data is None and not cfg.data.dataset:
        raise ConfigError(f"--data: {args.checkpoint} is a backbone file without a run config: name the data")
    backbone.to(device)
    data = data_config(cfg, args.data, args.size)
    tf = eval_transform(data.eval_size, data.eval_crop_ratio)
    train_set, test_set = (build_dataset(data, split, tf, cfg.run.seed) for split in ("train", "test"))
    run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
    out = args.out or os.path.join(run_dir, "eval" + ("_random_init" if args.random_init else ""))
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(run_dir, "checkpoint.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    key = {  # what the cached features depend on
        "checkpoint": os.path.abspath(ckpt),
        "mtime": os.path.getmtime(ckpt),
        "random_init": args.random_init,
        "data": data.root or data.dataset,
        "size": data.eval_size,
        "n": [len(train_set), len(test_set)],
    }
    report = {
        "checkpoint": args.checkpoint,
        "random_init": args.random_init,
        "data": key["data"],
        "n_train": len(train_set),
        "n_test": len(test_set),
        "protocols": {},
        "figures": {},
    }
    crops = f"{data.eval_size} px centre crops of images resized to {round(data.eval_size / data.eval_crop_ratio)}"
    if "knn" in tasks or "linear_fast" in tasks:
        tr = cached_tokens(backbone, train_set, "train", key, out, device, args)
        te = cached_tokens(backbone, test_set, "test", key, out, device, args)
    if "knn" in tasks:
        report["knn_top1"] = knn_report(tr, te, ks, args.temperature)
        report["protocols"]["knn_top1"] = f"DINO weighted k-NN, T = {args.temperature}, teacher CLS, {crops}"
    for task, protocol in (("linear", "dino"), ("linear_heldout", "heldout")):
        if task in tasks:
            views = build_dataset(data, "train", linear_train_transform(data.eval_size), cfg.run.seed)
            report[task] = dino_linear_report(backbone, (views, train_set, test_set), device, args, protocol)
            report["protocols"][task] = report[task].pop("protocol")
    if "linear_fast" in tasks:
        report["linear_fast"] = fast_linear_report(tr, te, device)
        report["protocols"]["linear_fast"] = report["linear_fast"].pop("protocol") + f"; {crops}"
    if "attention" in tasks:
        report["figures"]["attention"] = attention_figure(backbone, test_set, device, out)
    if "pca" in tasks:
        report["figures"]["pca"] = pca_figure(backbone, test_set, device, out)
    if "seg" in tasks:
        report["segmentation"] = segmentation_report(backbone, test_set, device, args.seg_images)
        report["protocols"]["segmentation"] = "Jaccard with the object masks: DINO's 60%-mass attention masks"
    log = os.path.join(run_dir, "log.jsonl")
    if args.all and os.path.exists(log) and os.path.getsize(log):
        curves = plot_training_curves(log, os.path.join(out, "curves.png"))
        report["figures"]["curves"] = os.path.basename(curves)
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    write_markdown(report, os.path.join(out, "report.md"))
    print(f"report: {os.path.join(out, 'report.md')}")
    return report


# ----------------------------------------------------------------------------------------------------------
# One function per evaluation: numbers for the report, figures written to the report folder


def knn_report(tr: tuple, te: tuple, ks: tuple[int, ...], temperature: float) -> dict:
    """Weighted k-NN on the L2-normalised CLS tokens of (cls, mean patch, labels) feature tuples."""
    norm = torch.nn.functional.normalize
    acc = knn_classify(norm(tr[0], dim=-1), tr[2], norm(te[0], dim=-1), te[2], ks, temperature)
    print("k-NN top-1 " + " | ".join(f"k={k}: {v:.2f}%" for k, v in acc.items()))
    clipped = [k for k in ks if k > len(tr[2])]
    if clipped:  # each of them votes with every training image, so they all give the same number
        print(
            f"note: k = {', '.join(map(str, clipped))} exceed the {len(tr[2])} training images: all of them vote"
        )
    return {str(k): v for k, v in acc.items()}


def dino_linear_report(backbone, sets: tuple, device, args, protocol: str) -> dict:
    """DINO's linear evaluation ('dino') or its held-out variant; sets: (training split with training views,
    the same with centre crops, test)."""
    train_views, train_plain, test_set = sets
    n_classes = max(train_plain.targets + list(getattr(test_set, "targets", []))) + 1
    res = dino_linear_eval(
        backbone, train_views, train_plain, test_set, n_classes, device, args.n_last_blocks, args.avgpool,
        args.linear_epochs, args.batch_size, num_workers=args.num_workers, protocol=protocol,
    )  # fmt: skip
    name = "DINO protocol" if protocol == "dino" else "DINO protocol, lr chosen on a held-out tenth"
    print(f"linear evaluation ({name}) top-1 {res['top1']:.2f}% (lr {res['best_lr']:g})")
    return res


def fast_linear_report(tr: tuple, te: tuple, device) -> dict:
    """Quick probes on cached CLS features, and on CLS + mean patch token (DINOv2's linear features)."""
    report = {}
    for name, (x_tr, x_te) in {
        "cls": (tr[0], te[0]),
        "cls+avgpool": (torch.cat(tr[:2], 1), torch.cat(te[:2], 1)),
    }.items():
        res = fast_linear_probe(x_tr, tr[2], x_te, te[2], device)
        report["protocol"] = res.pop("protocol")
        report[name] = res
        print(f"fast linear probe ({name}) top-1 {res['top1']:.2f}% (lr {res['best_lr']:g})")
    return report


def attention_figure(backbone, test_set, device, out: str) -> str:
    grid = torch.stack([test_set[i][0] for i in range(min(8, len(test_set)))]).to(device)
    attn = cls_attention(backbone, grid)  # (B, heads, h, w)
    B, H, h, w = attn.shape
    masks = attention_threshold_masks(attn.mean(1).flatten(1)).reshape(B, h, w)
    return os.path.basename(plot_attention_maps(grid, attn, masks, os.path.join(out, "attention.png")))


def pca_figure(backbone, test_set, device, out: str) -> str:
    idx = first_of_class(test_set, test_set[0][1], 8)
    images = torch.stack([test_set[i][0] for i in idx]).to(device)
    with torch.no_grad():
        patches = backbone.forward_features(images)["patch"]
    hw = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
    fg, rgb = pca_foreground(patches.cpu(), hw)
    return os.path.basename(plot_pca(images, fg, rgb, os.path.join(out, "pca.png")))


def segmentation_report(backbone, test_set, device, n_images: int) -> dict | str:
    if not isinstance(test_set, ShapesDataset):
        return "skipped: needs ground-truth masks (the shapes data set)"
    n = min(n_images, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(n)]).to(device)
    gt = torch.stack([torch.from_numpy(test_set.sample(i)[2]) for i in range(n)])
    gt = upsample_masks(gt, tuple(images.shape[-2:]))  # to the evaluation size
    s = segmentation_scores(backbone, images, gt.to(device))
    print(
        f"segmentation Jaccard ({n} images): best head {s['jaccard_best_head']:.3f} (head "
        f"{s['best_head']}) | mean of heads {s['jaccard_mean_of_heads']:.3f} | PCA foreground "
        f"{s['jaccard_pca_foreground']:.3f}"
    )
    return s


def write_markdown(report: dict, path: str) -> None:
    """A short human-readable page next to report.json, with the figures inline."""
    lines = [
        f"# Evaluation of `{report['checkpoint']}`" + (" (random init)" if report["random_init"] else ""),
        "",
        f"Data: {report['data']} ({report['n_train']} train / {report['n_test']} held-out images).",
        "",
    ]
    if "knn_top1" in report:
        lines += ["## k-NN (weighted, T = 0.07)", "", "| k | top-1 |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}% |" for k, v in report["knn_top1"].items()] + [""]
    for task, title in (
        ("linear", "DINO's protocol"),
        ("linear_heldout", "DINO's, lr chosen on a held-out tenth"),
    ):
        if task in report:
            r = report[task]
            lines += [
                f"## Linear evaluation ({title})",
                "",
                f"top-1 **{r['top1']:.2f}%** (lr {r['best_lr']:g})",
            ]
            lines += ["", f"Protocol: {report['protocols'][task]}", ""]
    if "linear_fast" in report:
        lines += ["## Fast linear probe (cached features)", "", "| features | top-1 | lr |", "|---|---|---|"]
        fast = report["linear_fast"].items()
        lines += [f"| {k} | {v['top1']:.2f}% | {v['best_lr']:g} |" for k, v in fast]
        lines.append("")
    if report["protocols"]:
        lines += ["## How each number was measured", ""]
        lines += [f"- {k}: {v}" for k, v in report["protocols"].items()] + [""]
    if isinstance(report.get("segmentation"), dict):
        s = report["segmentation"]
        lines += [
            "## Emergent segmentation (Jaccard with the ground-truth masks)",
            "",
            f"- best head: {s['jaccard_best_head']:.3f} (head {s['best_head']})",
            f"- per head: {s['jaccard_per_head']}",
            f"- mean-of-heads attention, 60% mass: {s['jaccard_mean_of_heads']:.3f}",
            f"- PCA foreground: {s['jaccard_pca_foreground']:.3f}",
            "",
        ]
    elif "segmentation" in report:
        lines += ["## Emergent segmentation", "", report["segmentation"], ""]
    titles = {
        "attention": "Attention of the CLS token, last block",
        "pca": "PCA of patch features",
        "curves": "Training curves",
    }
    for name, file in report["figures"].items():
        lines += [f"## {titles[name]}", "", f"![{name}]({file})", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {cli.error_line(e)}")
