"""A run sized to a wall-clock budget: `--run.minutes=M`.

    python train.py --preset cifar10 --data.root=data/cifar10 --run.minutes=30

How the length is chosen (`plan_run`, once, at step 0 of a new run):
  1. measure: the run's first steps are timed on its real batches, after a few warm-up steps (compilation,
     allocator, caches), and then undone: weights, optimiser, centres, counters and random state go back to
     what they were, so the measured steps leave no trace in the run;
  2. estimate the evaluations still to come: the final k-NN (features of both splits, for the trained ViT and,
     unless an earlier run kept its number, for the random-init baseline) and the k-NN curve points
     (--run.knn_every), from the timed feature extraction of a slice of the data; and the loop's other
     work (a checkpoint per epoch, a plot of the curves per minute);
  3. steps = (M minutes x (1 - margin) - time already spent - evaluations - other work) x steps per second;
  4. fit the schedules to those steps: every schedule of minidino is written in epochs, so the plan only
     sets how many steps an epoch has (--optim.epoch_steps = steps // epochs). The run is then exactly the
     run that option would give: warm-ups, cosine ends and the frozen prototypes all land at the same
     fractions of it. With fewer steps than epochs, the epochs become single steps and the options counted
     in epochs are scaled by the same factor.
The plan is printed in one line, written to plan.json in the run folder, and kept in config.json (the
planned epoch_steps): `--resume` continues the same plan and measures nothing.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Subset

from . import seeds
from .config import Config
from .dist import all_reduce_mean, is_main, print0
from .evaluate import extract_tokens, knn_sets, random_init_cache

# share of the budget kept free for what the measurement does not see: on the 2-core CPU of 2026-12-07 the
# loop's sustained rate was 6-12% below the rate its first steps measured (clocks, neighbours, logging)
MARGIN = 0.08
PLOT_S = 1.0  # seconds of one plot of the training curves, drawn once a minute and at the end
WARMUP_STEPS = 3  # steps run before the clock starts (compilation, first allocations)
TIMED_STEPS, TIMED_SHARE = 20, 0.02  # then up to 20 steps are timed, or 2 % of the budget (at least 3 steps)
EVAL_IMAGES = 4096  # images whose feature extraction is timed to estimate an evaluation's cost


@dataclasses.dataclass
class Plan:
    minutes: float  # the budget
    steps: int  # training steps the run takes
    epochs: int  # epochs of the schedules ...
    epoch_steps: int  # ... of this many steps each
    steps_per_s: float  # measured
    eval_s: float  # estimated: the final k-NN and the curve points together
    spent_s: float  # time already gone when the plan was made (data, model, measurement)
    images: int  # training images, for the line's passes over the data
    batch_size: int

    def line(self) -> str:
        passes = self.steps * self.batch_size / max(self.images, 1)
        return (
            f"plan for {self.minutes:g} min: about {self.steps:,} steps = {passes:.2f} passes over the "
            f"{self.images:,} images at {self.steps_per_s:.2f} steps/s ({self.epochs} epochs of "
            f"{self.epoch_steps} steps); {self.spent_s:.0f} s spent so far, evaluation about {self.eval_s:.0f} s"
        )


def steps_in_budget(
    minutes: float, spent_s: float, steps_per_s: float, eval_s: float, other_s: float, margin=MARGIN
) -> int:
    """How many training steps fit: what is left of the budget after the margin, the time already spent, the
    evaluations and the other work of the loop (`other_s`: checkpoints and plots), at the measured rate (at
    least 1: a run that cannot fit still takes one step)."""
    left = minutes * 60 * (1 - margin) - spent_s - eval_s - other_s
    return max(1, math.floor(left * steps_per_s))


def loop_seconds(cfg: Config, save_s: float, step_s: float) -> float:
    """The loop's work besides its steps: a checkpoint per epoch (the save, and the forward that checks the
    update first, at most a step's time) and a plot of the curves per minute and at the end."""
    return max(cfg.optim.epochs, 1) * (save_s + step_s) + (cfg.run.minutes + 1) * PLOT_S


def fit_schedules(cfg: Config, steps: int) -> Config:
    """`cfg` whose schedules span `steps` steps (a copy): --optim.epoch_steps = steps // epochs, so each
    schedule keeps its shape in epochs. With fewer steps than epochs, `steps` epochs of one step each, and
    the options counted in epochs scaled by steps / epochs (rounded; one that was on stays at least 1)."""
    optim, loss, run = (dataclasses.replace(x) for x in (cfg.optim, cfg.loss, cfg.run))
    epochs = max(optim.epochs, 1)
    if steps >= epochs:
        optim.epochs, optim.epoch_steps = epochs, steps // epochs
        return dataclasses.replace(cfg, optim=optim)

    def scaled(n: int) -> int:
        return max(1, round(n * steps / epochs)) if n else 0

    optim.warmup_epochs = scaled(optim.warmup_epochs)
    optim.freeze_last_layer = scaled(optim.freeze_last_layer)
    optim.freeze_backbone_epochs = scaled(optim.freeze_backbone_epochs)
    loss.warmup_teacher_temp_epochs = scaled(loss.warmup_teacher_temp_epochs)
    run.knn_every = scaled(run.knn_every)
    optim.epochs, optim.epoch_steps = steps, 1
    return dataclasses.replace(cfg, optim=optim, loss=loss, run=run)


def curve_points(cfg: Config) -> int:
    """k-NN evaluations during training (--run.knn_every), each on both splits."""
    return cfg.optim.epochs // cfg.run.knn_every if cfg.run.knn_every else 0


# ----------------------------------------------------------------------------------------------------------
# Measuring


def measure_steps(
    t, batches: Iterator, step: Callable[[tuple], None], budget_s: float
) -> tuple[float, float]:
    """Seconds per training step on the run's first batches, every change undone afterwards, and seconds
    to write the state (to memory). `t`: the run's `train.Training`; `step(batch)` runs one step on it."""
    saved = snapshot(t)
    clock = time.perf_counter()
    torch.save([state for _, state in saved["modules"]] + [saved["optimizer"]], io.BytesIO())  # a checkpoint
    save_s = time.perf_counter() - clock
    timed, clock = 0, 0.0
    for i, batch in enumerate(itertools.islice(batches, WARMUP_STEPS + TIMED_STEPS)):
        step(batch)
        if i + 1 == WARMUP_STEPS:
            synchronize(t.device)
            clock = time.perf_counter()
        elif i + 1 > WARMUP_STEPS:
            timed += 1
            if timed >= 3 and time.perf_counter() - clock > TIMED_SHARE * budget_s:
                break
    synchronize(t.device)
    seconds = (time.perf_counter() - clock) / max(timed, 1)
    restore(t, saved)
    return seconds, save_s


def snapshot(t) -> dict:
    modules = {id(m): m for m in (t.student, t.teacher, t.ema_target, t.losses)}  # teacher may be ema_target
    return {
        "modules": [
            (m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m in modules.values()
        ],
        "optimizer": clone_tree(t.optimizer.state_dict()),
        "counters": (t.step, t.skipped_images, t.first_bad),
        "rng": seeds.rng_state(),
    }


def restore(t, saved: dict) -> None:
    for module, state in saved["modules"]:
        module.load_state_dict(state)
    t.optimizer.load_state_dict(saved["optimizer"])
    t.step, t.skipped_images, t.first_bad = saved["counters"]
    seeds.set_rng_state(saved["rng"])


def clone_tree(x):
    """A copy of nested dicts and lists in which every tensor is cloned (an optimiser's state_dict)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(clone_tree(v) for v in x)
    return x


def eval_seconds(cfg: Config, backbone: torch.nn.Module, device: torch.device) -> float:
    """Estimated seconds of the evaluations still to come: the final k-NN (both splits, for the trained and,
    unless an earlier run kept its number, the random-init ViT) and the curve points (both splits each). One
    pass over both splits is timed on a slice of the training split, through the code the evaluation runs
    (worker start-up included), and scaled to all the images."""
    sets = knn_sets(cfg) if cfg.run.eval_at_end or curve_points(cfg) else None
    if sets is None:
        return 0.0
    path, _ = random_init_cache(cfg, sets)  # a random-init k-NN kept by an earlier run costs nothing
    passes = cfg.run.eval_at_end * (1 + (path is None or not os.path.exists(path))) + curve_points(cfg)
    probe = Subset(sets[0], range(min(len(sets[0]), EVAL_IMAGES)))
    clock = time.perf_counter()
    extract_tokens(backbone, probe, device, 256, cfg.data.num_workers, "timing the evaluation")
    per_image = (time.perf_counter() - clock) / len(probe)
    return passes * per_image * sum(len(s) for s in sets)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# The plan of a run


def plan_run(t, batches: Iterator, step: Callable[[tuple], None], started: float) -> Plan:
    """Measure, plan and fit the schedules of a new run with --run.minutes (see the module docstring);
    `t.cfg` and `t.steps_per_epoch` become the planned ones. `started`: time.perf_counter() at the run's
    start. Every process gets the same plan (the measured times are averaged over processes)."""
    cfg = t.cfg
    seconds_per_step, save_s = measure_steps(t, batches, step, cfg.run.minutes * 60)
    eval_s = eval_seconds(cfg, t.ema_target.backbone, t.device)
    spent = time.perf_counter() - started
    times = torch.tensor([seconds_per_step, save_s, eval_s, spent], dtype=torch.float64, device=t.device)
    seconds_per_step, save_s, eval_s, spent = all_reduce_mean(times).tolist()
    other = loop_seconds(cfg, save_s, seconds_per_step)
    steps = steps_in_budget(cfg.run.minutes, spent, 1 / seconds_per_step, eval_s, other)
    t.cfg = fit_schedules(cfg, steps)
    t.steps_per_epoch = t.cfg.optim.epoch_steps
    o = t.cfg.optim
    return Plan(cfg.run.minutes, o.epochs * o.epoch_steps, o.epochs, o.epoch_steps, 1 / seconds_per_step,
                eval_s, spent, len(t.train_set), o.batch_size)  # fmt: skip


def fit_run(t, resumed: bool, started: float, run_batches: Callable, advance: Callable) -> Config:
    """--run.minutes in train.py: a new run measures its first steps on the batches of `run_batches(t)`
    (each step is `advance(t, views, batch)`), fits its schedules to the budget, prints and saves the plan;
    a resumed run keeps the plan already in its config. Returns the run's config."""
    if resumed:
        print0(kept_plan(t.run.path))
        return t.cfg
    views, batches, _ = run_batches(t)
    plan = plan_run(t, batches, lambda batch: advance(t, views, batch), started)
    del batches  # its workers end; the run's own loader starts with the planned length
    print0(plan.line())
    save_plan(plan, t.run.path)
    return t.cfg


def save_plan(plan: Plan, run_dir: str) -> None:
    """plan.json in the run folder, written atomically by the main process."""
    if not is_main():
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "plan.json")
    with open(f"{path}.tmp", "w") as fh:
        json.dump(dataclasses.asdict(plan), fh, indent=2)
    os.replace(f"{path}.tmp", path)


def kept_plan(run_dir: str) -> str:
    """The line a resumed run prints: the plan it keeps."""
    path = os.path.join(run_dir, "plan.json")
    if not os.path.exists(path):
        return f"--run.minutes: no plan.json in {run_dir}; the run keeps the length in its config.json"
    with open(path) as fh:
        plan = Plan(**json.load(fh))
    return f"--run.minutes: keeping the run's {plan.line()} (nothing re-measured)"
