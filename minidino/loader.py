"""The training set as the loop sees it: every random draw of an image's views from (seed, epoch, index),
the data order from (seed, epoch), and one DataLoader for a whole run whose workers also draw each step's
iBOT masks. With these, a resumed run computes exactly the steps of an uninterrupted one, with any number of
DataLoader workers or processes (`minidino/seeds.py` has the streams). Also how a global batch is shared:
the steps per epoch and the checks that the batch fits the processes (`check_batch`), and a step's batch cut
into micro-batches for gradient accumulation (`micro_batches`).

Layer: the run (README, "Read the code")."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from . import seeds
from .config import ConfigError
from .data import ImageFiles, load_rgb
from .dist import print0
from .losses import koleo_groups
from .masking import StepMasks, step_masks
from .optim import small_batch_advice


class SeededViews(Dataset):
    """The training set as the loop sees it: item (epoch, i) is `transform(image i)` with the global RNG
    seeded from (seed, epoch, i) (seeds.image_views), so the crops of a step depend neither on the number of
    DataLoader workers nor on where a run was resumed. The global RNG is restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int, transform=None):
        self.dataset, self.seed, self.transform, self.epoch = dataset, seed, transform, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int, int]):
        """A plain index i: (x, label, skipped) of (self.epoch, i). An (epoch, i, step) of `RunSampler`: the
        same for (epoch, i), and the step its batch is for as a fourth item."""
        if isinstance(index, tuple):
            epoch, index, step = index
            return *self.item(epoch, index), step
        return self.item(self.epoch, index)

    def item(self, epoch: int, index: int):
        if isinstance(self.dataset, ImageFiles):  # a transform may decode files itself (crops.WorkerCrops)
            self.dataset.decode = getattr(self.transform, "decode", load_rgb)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (torch.manual_seed would also seed every GPU, ~1 ms per image)
            torch.default_generator.manual_seed(seeds.image_views(self.seed, epoch, index))
            image, label, skipped = self.dataset[index]
            return (self.transform(image) if self.transform else image), label, skipped


class EpochSampler(Sampler):
    """A permutation seeded by (seed, epoch); skips the first `start` samples when resuming mid-epoch. With
    `length` (samples per epoch) above n, the next permutations of the epoch follow (seeds.data_order parts).

    Several processes: the permutation is cut into global batches of `batch` samples and process `rank` takes
    its consecutive `batch / world` of each, so the union over processes of step t's batches is exactly the
    one-process batch of step t (same data order for any process count, which is what makes resuming on
    another number of processes exact)."""

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int,
        start: int = 0,
        batch: int = 1,
        rank: int = 0,
        world: int = 1,
        length: int | None = None,
    ):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.batch, self.rank, self.world, self.length = batch, rank, world, length or n

    def __iter__(self):
        parts = -(-self.length // self.n)
        order = torch.cat(
            [
                torch.randperm(self.n, generator=seeds.data_order(self.seed, self.epoch, k))
                for k in range(parts)
            ]
        )
        order = order[self.start : self.length]
        if self.world > 1:
            local = self.batch // self.world
            steps = len(order) // self.batch
            whole = order[: steps * self.batch].view(steps, self.world, local)  # (steps, P, b)
            order = whole[:, self.rank].flatten()
        return iter(order.tolist())

    def __len__(self) -> int:
        if self.world == 1:
            return self.length - self.start
        return (self.length - self.start) // self.batch * (self.batch // self.world)


class RunSampler(Sampler):
    """The (epoch, index, step) of every sample of a whole run, epoch after epoch from `first_epoch`
    (skipping its first `start` samples when resumed mid-epoch) up to `end_epoch`, each epoch's order from
    `EpochSampler` and cut to whole batches of `batch / world`; `step` is the training step the sample's
    batch is for. One DataLoader, and one set of worker processes, serves the whole run instead of new
    workers every epoch, and its collate function can draw the step's iBOT masks."""

    def __init__(self, n, seed, first_epoch, end_epoch, start, batch, rank, world, length=None):
        self.epochs = [
            EpochSampler(n, seed, e, start if e == first_epoch else 0, batch, rank, world, length)
            for e in range(first_epoch, end_epoch)
        ]
        self.local, self.batch, self.steps_per_epoch = batch // world, batch, (length or n) // batch

    def __iter__(self):
        for epoch in self.epochs:
            order = list(epoch)
            first_step = epoch.epoch * self.steps_per_epoch + epoch.start // self.batch
            whole = order[: len(order) // self.local * self.local]
            yield from ((epoch.epoch, i, first_step + k // self.local) for k, i in enumerate(whole))

    def __len__(self) -> int:
        return sum(len(e) // self.local * self.local for e in self.epochs)


def run_loader(
    train_set: SeededViews, cfg, first_epoch, end_epoch, start, rank, world, pin, collate=default_collate
) -> DataLoader:
    """This process's share of each global batch from sample `start` of `first_epoch` (a run resumed
    mid-epoch) to the end of epoch `end_epoch - 1`, as (views, labels, skipped, step masks): `collate` makes
    the first three, and the step's iBOT masks (`masking.step_masks`) are drawn with them, in the workers."""
    batch = cfg.optim.batch_size
    n_crops = 2 + cfg.data.local_crops_number

    def collate_with_masks(items):
        step = items[0][3]
        masks = step_masks(cfg, len(items), step, rank, world, n_crops)
        return (*collate([item[:3] for item in items]), masks)

    sampler = RunSampler(
        len(train_set), cfg.run.seed, first_epoch, end_epoch, start, batch, rank, world,
        cfg.optim.epoch_steps * batch,
    )  # fmt: skip
    return DataLoader(
        train_set,
        batch_size=batch // world,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=pin,
        collate_fn=collate_with_masks,
    )


def check_batch(cfg, world: int, n_images: int) -> int:
    """The steps per epoch (a pass over the data, or --optim.epoch_steps); one-line errors when the global
    batch does not fit the processes or the data."""
    if world > 1 and cfg.run.parallel == "none":
        raise ConfigError(f"launched on {world} processes: choose --run.parallel=ddp or --run.parallel=fsdp")
    batch = cfg.optim.batch_size
    if batch % world:
        raise ConfigError(
            f"option --optim.batch_size={batch} (the global batch) must be divisible by the {world} processes"
        )
    if batch % (world * cfg.optim.accum_steps):
        raise ConfigError(
            f"option --optim.batch_size={batch} must be divisible by the {world} processes x "
            f"--optim.accum_steps={cfg.optim.accum_steps} micro-batches"
        )
    if n_images < batch:
        raise ConfigError(
            f"option --optim.batch_size={batch} is larger than the data set ({n_images} images)"
        )
    koleo_groups(cfg, world)  # KoLeo's groups fit the processes and micro-batches
    if advice := small_batch_advice(cfg.optim):
        print0(advice)
    return cfg.optim.epoch_steps or n_images // batch


def micro_batches(crops: list[Tensor], masks: StepMasks, targets: dict, n: int):
    """The step's batch cut into n equal micro-batches: (crops, masks, teacher targets) of each. The patch
    targets (M, K) follow masks.indices, row by row (global crop 1's images, then crop 2's). The host
    counts each micro-batch's masked patches here (a read-back per step that the whole batch at once
    does not make)."""
    if n == 1:
        yield crops, masks, targets
        return
    b = crops[0].shape[0] // n
    if masks.patches is not None:  # each masked row's patch targets, then regrouped by micro-batch
        counts = masks.patches.sum(1).tolist()
        per_row = list(targets["patch"].split([*counts, len(targets["patch"]) - sum(counts)]))  # + padding
    for i in range(n):
        rows = [*range(i * b, (i + 1) * b), *range(n * b + i * b, n * b + (i + 1) * b)]  # both global crops
        mine = {"cls": [t[i * b : (i + 1) * b] for t in targets["cls"]]}
        if "gram" in targets:  # the Gram teacher's patch features, (2B, N, D) in the same row order
            mine["gram"] = targets["gram"][rows]
        patches = None
        if masks.patches is not None:
            mine["patch"], patches = torch.cat([per_row[r] for r in rows]), masks.patches[rows]
        mask_i = StepMasks.of(patches, student=masks.student is not None, n_crops=len(crops))
        yield [c[i * b : (i + 1) * b] for c in crops], mask_i, mine
