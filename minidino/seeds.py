"""Every random stream of a training run, each made by one named function from the run's seed.

    stream        depends on                 drawn by
    model init    seed                       the student's initial weights (and the random-init baseline)
    data order    seed, epoch                the permutation of the training set (loader.EpochSampler)
    image views   seed, epoch, image index   per-image crops (and with --data.augment=crops their colour
                                             parameters) in the DataLoader workers (loader.SeededViews)
    batch views   seed, step, process        multi-crop of a whole batch on the device (augment.BatchMultiCrop)
    masks         seed, step                 iBOT block masks for the global batch, in the workers with the
                                             step's batch (masking.step_masks, loader.run_loader)
    step draws    seed, step, process        what the step itself draws from torch's global generators:
                                             stochastic depth's masks and kept subsets (vit.Block)

Each stream's seed is a hash of (run seed, stream name, indices), so two streams never start from the same
seed (with a formula such as `seed * 1_000_003 + step`, the data order of epoch e and the views of step e
would be one stream). None of them depends on the number of DataLoader workers or on where a run was
resumed, which is what makes a resumed run compute exactly the steps of an uninterrupted one.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import hashlib
import random

import torch


def stream_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed for one stream at one place (epoch, step, image, process): a hash of all of them."""
    text = ",".join(map(str, (seed, stream, *indices)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_init(seed: int) -> None:
    """Seed the global RNGs: the weights built next are the run's initial student."""
    torch.manual_seed(seed)
    random.seed(seed)


def data_order(seed: int, epoch: int, part: int = 0) -> torch.Generator:
    """The permutation of the data set in `epoch`; `part` k > 0: the k-th further one, when an epoch of the
    schedules is longer than one pass (--optim.epoch_steps)."""
    return generator(stream_seed(seed, "data order", epoch, *([part] if part else [])))


def image_views(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's crops in one epoch (set as the global seed around its transform)."""
    return stream_seed(seed, "image views", epoch, index)


def batch_views(seed: int, step: int, rank: int) -> torch.Generator:
    return generator(stream_seed(seed, "batch views", step, rank))


def masks(seed: int, step: int) -> torch.Generator:
    return generator(stream_seed(seed, "masks", step))


def step_draws(seed: int, step: int, rank: int) -> None:
    """Seed torch's global generators (CPU and every GPU) for one training step. Stochastic depth draws its
    masks and kept subsets inside the backbone, on the device, from the global generator; seeded here per
    (step, process), those draws do not depend on what ran before the step (a DataLoader started on resume,
    an evaluation, a forward that drew nothing), so a resumed run draws exactly what the uninterrupted one
    drew. The micro-batches of a step draw one after the other from the step's stream."""
    torch.manual_seed(stream_seed(seed, "step draws", step, rank))


# ----------------------------------------------------------------------------------------------------------
# The global RNG state, saved in checkpoints (whatever draws from it outside the step)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
