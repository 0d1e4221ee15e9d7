"""Evaluate a trained minidino backbone: weighted k-NN on frozen features (DINO, arXiv 2104.14294, Sec. 4.1).

    python eval.py runs/shapes                          # k-NN on the run's own data set (held-out split)
    python eval.py runs/shapes --random-init            # the same architecture at random initialisation
    python eval.py runs/cifar10/checkpoint.pt --data data/cifar10 --knn
    python eval.py runs/shapes --data shapes --ks 10,20,100,200

`--data` is `shapes` or a folder with train/<class>/ and test/<class>/ (or val/) sub-folders. The teacher's
backbone is evaluated (DINO reports the teacher: it is the better model throughout training). Results are
printed and written to <run>/eval/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from minidino import config as C
from minidino.augment import eval_transform
from minidino.checkpoint import backbone_state_dict, load_checkpoint, load_model_state
from minidino.data import DataError, build_dataset
from minidino.evaluate import knn_eval
from minidino.vit import build_vit


def load_backbone(path: str, random_init: bool = False) -> tuple[torch.nn.Module, C.Config]:
    """The teacher backbone of a run folder or checkpoint file, and the run's config."""
    state = load_checkpoint(path)
    cfg = C.from_dict(state["config"])
    torch.manual_seed(cfg.run.seed)
    backbone = build_vit(cfg.model)
    if not random_init:
        load_model_state(backbone, backbone_state_dict(state["teacher"]), f"checkpoint {path}")
    return backbone.eval(), cfg


def data_config(cfg: C.Config, data: str | None, size: int | None) -> C.DataConfig:
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
    p.add_argument("checkpoint", help="run folder or checkpoint.pt")
    p.add_argument("--data", help="'shapes' or a folder with train/ and test/ (default: the run's data set)")
    p.add_argument(
        "--knn", action="store_true", help="weighted k-NN (the default when nothing else is asked)"
    )
    p.add_argument("--ks", default="10,20,100,200", help="k values of the k-NN (default 10,20,100,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature T (default 0.07)")
    p.add_argument("--size", type=int, help="evaluation image size (default: the run's data.eval_size)")
    p.add_argument("--random-init", action="store_true", help="evaluate the architecture at random init")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", help="report folder (default: <run>/eval)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise C.ConfigError(f"--ks: expected comma-separated integers, got {args.ks!r}") from None
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    backbone, cfg = load_backbone(args.checkpoint, args.random_init)
    backbone.to(device)
    data = data_config(cfg, args.data, args.size)
    tf = eval_transform(data.eval_size)
    train_set, test_set = (build_dataset(data, split, tf, cfg.run.seed) for split in ("train", "test"))
    report = {
        "checkpoint": args.checkpoint,
        "random_init": args.random_init,
        "data": data.root or data.dataset,
        "n_train": len(train_set),
        "n_test": len(test_set),
    }
    acc = knn_eval(
        backbone, train_set, test_set, device, ks, args.temperature, args.num_workers, args.batch_size
    )
    report["knn_top1"] = {str(k): v for k, v in acc.items()}
    print(
        "k-NN top-1 "
        + " | ".join(f"k={k}: {v:.2f}%" for k, v in acc.items())
        + f"  ({len(test_set)} test images{', random init' if args.random_init else ''})"
    )
    run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
    out = args.out or os.path.join(run_dir, "eval" + ("_random_init" if args.random_init else ""))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    try:
        main()
    except (C.ConfigError, DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
