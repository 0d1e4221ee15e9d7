"""Throughput of the multi-crop data pipelines (decode, crops, colour, collate, transfer), apart from the model.

    python benchmarks/data.py --make-jpegs data/jpegs 2000          # ImageNet-sized JPEGs, made locally
    python benchmarks/data.py --preset imagenet --data.root=data/jpegs --optim.batch_size=32 \\
        --pipelines=pil,crops --workers=0 --threads=1              # one core, end to end
    python benchmarks/data.py --preset imagenet --data.root=data/jpegs --workers=0,4,14
    python benchmarks/data.py --preset shapes --pipelines=batch,crops,pil

Prints one JSON line per pipeline (`--data.augment`: pil, batch, crops) and worker count, the fastest of
`--repeats` rounds that measure the pipelines in turn: images/s (views
on the training device, photometrics included) and images/s per worker. With `--workers=0` everything runs
in this process, so the line also has the milliseconds per image of each stage: decode (file -> RGB),
per_image (the rest of what a worker does per image: the PIL path's crops and colour, or the crops path's
boxes, resizes and parameter draws), collate, transfer and photometrics (the device half), the worker
part (decode + per_image + collate) and the whole. A last line gives the ratios of each pipeline to `pil`
at the same worker count. Compare the images/s with `benchmarks/step.py` on the same preset to see which
of data and model limits a run.

`--make-jpegs DIR N` writes N JPEGs of 500 x 375 px (quality 90, ImageFolder layout DIR/<shape>/) made by
upscaling shapes images and adding texture at two scales, so that anyone can reproduce the numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import minidino.crops
from minidino import cli, seeds
from minidino.data import SHAPES, build_dataset, draw_shape, load_rgb
from minidino.loader import EpochSampler, SeededViews

JPEG_SIZE = (500, 375)  # about the mean ImageNet image


def make_jpegs(out: str, n: int, seed: int = 0) -> list[str]:
    """N textured, upscaled shapes images as JPEG (quality 90) under out/<shape>/; returns the paths."""
    paths = []
    for i in range(n):
        img, label, _ = draw_shape(i, 64, seed)
        rng = np.random.default_rng([seed, i])
        arr = np.asarray(img.resize(JPEG_SIZE, Image.BICUBIC), dtype=np.float32)
        coarse = rng.normal(0, 20, (JPEG_SIZE[1] // 8, JPEG_SIZE[0] // 8, 3)) + 128
        coarse = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize(JPEG_SIZE, Image.BICUBIC)
        arr += np.asarray(coarse, dtype=np.float32) - 128 + rng.normal(0, 6, arr.shape)  # two scales
        folder = os.path.join(out, SHAPES[label])
        os.makedirs(folder, exist_ok=True)
        paths.append(os.path.join(folder, f"{i:06d}.jpg"))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


class StageClock:
    """Seconds spent in named functions, by wrapping them (used with --workers=0 only, one process)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out

        return timed


class TimedTransform:
    """A per-image transform and the decode it brings (or `load_rgb`), each timed apart."""

    def __init__(self, transform, clock: StageClock):
        self.transform, self.clock = transform, clock
        self.decode = clock.wrap("decode", getattr(transform, "decode", load_rgb))

    def __call__(self, image):
        return self.clock.wrap("per_image", self.transform)(image)


def measure(cfg, augment: str, workers: int, batches: int, device: torch.device) -> dict:
    cfg.data.augment = augment
    views = minidino.crops.pipeline(cfg.data, cfg.run.compile)
    dataset = build_dataset(cfg.data, "train", None, cfg.run.seed)
    train_set = SeededViews(dataset, cfg.run.seed, views.per_image)
    clock = StageClock()
    per_image, collate, on_device = views.per_image, views.collate, views.on_device
    if workers == 0:  # time each stage in this process
        train_set.transform = TimedTransform(per_image, clock)
        collate = clock.wrap("collate", collate)
        minidino.crops.colour = clock.wrap("photometrics", colour_of_crops)
        on_device = clock.wrap("device", on_device)
    batch = cfg.optim.batch_size
    n_batches = batches + 2
    loader = DataLoader(
        train_set,
        batch_size=batch,
        sampler=EpochSampler(len(train_set), cfg.run.seed, 0, length=n_batches * batch),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    it, n = iter(loader), 0
    for step in range(n_batches):
        if step == 2:  # start-up (workers, first kernels) is not part of the throughput
            t0, n = time.perf_counter(), 0
            clock.seconds.clear()
        images, _, _ = next(it)
        crops = on_device(images, device, seeds.batch_views(cfg.run.seed, step, 0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        n += crops[0].shape[0]
    dt = time.perf_counter() - t0
    d = cfg.data
    row = {
        "benchmark": "data",
        "dataset": d.dataset,
        "augment": augment,
        "num_workers": workers,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "compile": cfg.run.compile,
        "batch_size": batch,
        "crops": f"2x{d.global_crops_size}+{d.local_crops_number}x{d.local_crops_size}",
        "images_per_s": round(n / dt, 1),
        "images_per_s_per_worker": round(n / dt / max(workers, 1), 1),
    }
    if workers == 0:
        ms = {k: 1e3 * v / n for k, v in clock.seconds.items()}
        stages = {
            "decode": ms.get("decode", 0.0),
            "per_image": ms.get("per_image", 0.0),
            "collate": ms.get("collate", 0.0),
            "photometrics": ms.get("photometrics", 0.0),
            "transfer": ms.get("device", 0.0) - ms.get("photometrics", 0.0),
        }
        row["ms_per_image"] = {k: round(v, 3) for k, v in stages.items()}
        row["worker_ms_per_image"] = round(stages["decode"] + stages["per_image"] + stages["collate"], 3)
        row["total_ms_per_image"] = round(sum(stages.values()), 3)
    minidino.crops.colour = colour_of_crops
    return row


colour_of_crops = minidino.crops.colour


def main(argv: list[str]) -> list[dict]:
    if argv[:1] == ["--make-jpegs"]:
        if len(argv) != 3 or not argv[2].isdigit():
            raise SystemExit("usage: python benchmarks/data.py --make-jpegs DIR N")
        paths = make_jpegs(argv[1], int(argv[2]))
        print(
            json.dumps({"benchmark": "data", "made_jpegs": len(paths), "folder": argv[1], "size": JPEG_SIZE})
        )
        return []
    workers, batches, pipelines, threads, repeats, rest = [0, 2], 10, None, 0, 1, []
    for a in argv:
        key, _, value = a.partition("=")
        if key == "--workers":
            workers = [int(w) for w in value.split(",")]
        elif key == "--batches":
            batches = int(value)
        elif key == "--pipelines":
            pipelines = value.split(",")
        elif key == "--threads":
            threads = int(value)
        elif key == "--repeats":
            repeats = int(value)
        else:
            rest.append(a)
    if threads:
        torch.set_num_threads(threads)
    cfg, _, _ = cli.parse_args(rest)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    pipelines = pipelines or ([cfg.data.augment, "pil"] if cfg.data.augment != "pil" else ["pil"])
    results = []
    for w in workers:
        # pipelines measured in turn, `repeats` rounds: the fastest round of each is kept (a noisy machine
        # only ever slows a round down), and slow drifts hit all pipelines alike
        rounds = [[measure(cfg, p, w, batches, device) for p in pipelines] for _ in range(repeats)]
        for i in range(len(pipelines)):
            best = max((r[i] for r in rounds), key=lambda row: row["images_per_s"])
            results.append({**best, "repeats": repeats})
            print(json.dumps(results[-1]), flush=True)
    ratios = {}
    for r in results:
        base = next(
            (b for b in results if b["augment"] == "pil" and b["num_workers"] == r["num_workers"]), None
        )
        if base and r["augment"] != "pil":
            key = f"{r['augment']}_vs_pil_workers{r['num_workers']}"
            ratios[key] = {"images_per_s": round(r["images_per_s"] / base["images_per_s"], 2)}
            if "worker_ms_per_image" in r:
                ratios[key]["worker_part"] = round(base["worker_ms_per_image"] / r["worker_ms_per_image"], 2)
    if ratios:
        print(json.dumps({"benchmark": "data", "ratios": ratios}))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
