"""Throughput of the multi-crop data pipeline (decode/draw + augment + collate), apart from the model.

    python benchmarks/data.py --preset shapes
    python benchmarks/data.py --preset cifar10 --data.root=data/cifar10 --workers=0,1,2

Prints one JSON line per worker count: images/s and images/s per worker. Compare with
`benchmarks/step.py` to see whether the data pipeline or the model limits a run.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch.utils.data import DataLoader

from minidino import cli
from minidino.augment import BatchMultiCrop, MultiCropAugmentation, to_tensor_image
from minidino.data import build_dataset


def main(argv: list[str]) -> list[dict]:
    workers, batches = [0, 2], 10
    rest = []
    for a in argv:
        if a.startswith("--workers="):
            workers = [int(w) for w in a.split("=", 1)[1].split(",")]
        elif a.startswith("--batches="):
            batches = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    cfg, _, _ = cli.parse_args(rest)
    # per-image path: PIL augmentations in the workers; batched path: whole images in the workers, then
    # BatchMultiCrop on the batch in the main process (what train.py does with --data.batch_augment=true)
    batch_aug = BatchMultiCrop(cfg.data) if cfg.data.batch_augment else None
    per_image = to_tensor_image(cfg.data.image_size) if batch_aug else MultiCropAugmentation(cfg.data)
    ds = build_dataset(cfg.data, "train", per_image, cfg.run.seed)
    results, d = [], cfg.data
    for w in workers:
        loader = DataLoader(ds, batch_size=cfg.optim.batch_size, shuffle=True, num_workers=w, drop_last=True)
        it = iter(loader)
        next(it)  # worker start-up is not part of the throughput
        t0, n = time.perf_counter(), 0
        for _ in range(batches):
            crops, _, _ = next(it)
            if batch_aug:
                crops = batch_aug(crops, torch.Generator().manual_seed(n))
            n += crops[0].shape[0]
        dt = time.perf_counter() - t0
        r = {
            "benchmark": "data",
            "dataset": cfg.data.dataset,
            "batch_augment": cfg.data.batch_augment,
            "num_workers": w,
            "batch_size": cfg.optim.batch_size,
            "crops": f"2x{d.global_crops_size}+{d.local_crops_number}x{d.local_crops_size}",
            "images_per_s": round(n / dt, 1),
            "images_per_s_per_worker": round(n / dt / max(w, 1), 1),
        }
        print(json.dumps(r))
        results.append(r)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
