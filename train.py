"""Train a ViT with DINO (Caron et al. 2021, arXiv 2104.14294): self-distillation with no labels.

    python train.py                                   # embedded shapes data, CPU, a few minutes
    python train.py --preset cifar10 --data.root=data/cifar10 --run.minutes=30   # sized to 30 minutes
    python train.py --preset imagenet --data.root=/data/imagenet      # one GPU
    torchrun --nproc_per_node=8 train.py --preset imagenet --data.root=/data/imagenet --parallel fsdp
    python train.py --resume runs/shapes              # continue a stopped run (a finished one does nothing)
    python train.py --highres runs/x                  # DINOv2's high-resolution phase after run x, a new run
    python train.py --run.init_from=dinov2_vits14_pretrain.pth --data.root=DIR   # from released weights
    python train.py --help                            # every option with its meaning

Three layers, as in the official main_dino.py: `main()` builds everything in the paper's order (data ->
student and teacher -> losses -> optimiser -> resume) and runs the epochs; `train_one_epoch()` is the loop
(schedules, masks, step, log, checkpoint); `train_step()` is DINO's Algorithm 1, plus DINOv2's iBOT and
KoLeo terms when they are switched on. A run folder gets config.json, log.jsonl (one JSON object per logging
step), checkpoint.pt (atomic, every epoch), curves.png and knn.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm import tqdm

from minidino import cli, parallel, seeds, time_budget
from minidino.checkpoint import RunFolder, restore_training, restore_weights, starting_point, training_state
from minidino.config import Config, ConfigError, OptimConfig
from minidino.crops import Pipeline, pipeline
from minidino.data import DataError, build_dataset
from minidino.dist import (
    all_reduce_mean,
    cleanup,
    exit_worker,
    init_distributed,
    is_main,
    print0,
    rank,
    resolve_device,
    world_size,
)
from minidino.ema import ema_update
from minidino.evaluate import knn_against_random_init, knn_eval, knn_sets
from minidino.loader import SeededViews, check_batch, micro_batches, run_loader
from minidino.losses import Losses, build_losses, entropy_stats
from minidino.masking import StepMasks
from minidino.meta_arch import build_student_teacher, distillation_teacher
from minidino.optim import (
    FiniteGuard,
    NonFiniteLoss,
    apply_schedule,
    build_optimizer,
    clip_gradients,
    drop_frozen_gradients,
    peak_lr,
)
from minidino.presets import size_for_data
from minidino.schedules import schedules


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfg, resume, wants_help = cli.parse_args(sys.argv[1:] if argv is None else argv)
    if wants_help:
        print(cli.help_text(cfg))
        return {}
    device = init_distributed(resolve_device(cfg.run.device))  # under torchrun: a process group, this GPU
    run = RunFolder(resume or cfg.run.out_dir)
    state = run.start(resume is not None)  # what a resumed run continues from (None: step 0)
    cfg, start = starting_point(cfg, state)  # the weights to start from: the run's, --run.init_from's, none
    seeds.model_init(cfg.run.seed)

    # 1. data: multi-crop views of unlabelled images, made per image in the workers or per batch on `device`
    train_set = SeededViews(build_dataset(cfg.data, "train", None, cfg.run.seed), cfg.run.seed)
    cfg, filled = size_for_data(cfg, len(train_set))  # options left at 0 follow the data size
    if filled:
        print0(f"for {len(train_set)} images: {' '.join(filled)}")
    steps_per_epoch = check_batch(cfg, world_size(), len(train_set))

    # 2. student and teacher: same architecture, same initial weights; the teacher gets no gradient and is
    #    an EMA of the student. Distillation (DINOv2 Sec. 5): the teacher is a frozen trained model, and the
    #    EMA of the student (ema_target) is kept apart as the model to keep.
    student, teacher = build_student_teacher(cfg)
    ema_target = teacher
    if cfg.run.distill_from:
        teacher = distillation_teacher(cfg)
    for model in (student, teacher, ema_target):
        model.to(device)
    if start is not None:  # full (unsharded) weights, loaded before sharding: any process count works
        restore_weights(start, student, ema_target, run.checkpoint if state else cfg.run.init_from)
    no_grad_models = [teacher] if ema_target is teacher else [teacher, ema_target]  # sharded like the student
    student = parallel.wrap(student, no_grad_models, cfg.run, device)  # DDP or FSDP2 under torchrun

    # 3. losses, holding the teacher centres: DINO on CLS tokens, iBOT on masked patches (DINOv2)
    losses = build_losses(cfg, world_size(), ema_target.backbone)  # + the Gram teacher (DINOv3), if any
    losses = parallel.compile_losses(losses.to(device), cfg.run)
    if start is not None and "losses" in start:  # a minidino checkpoint: its centres
        losses.load_centers(start["losses"])
    # 4. optimiser: AdamW, lr and weight decay set every step from the schedules
    optimizer = build_optimizer(parallel.unwrap(student), cfg.optim)
    t = Training(
        cfg, student, teacher, ema_target, losses, optimizer, train_set, run, device, steps_per_epoch
    )

    # 5. resume: optimiser, step and RNG states (the weights and centres are loaded above)
    if state is not None and resume_training(t, state):  # a finished run: nothing to do
        cleanup()
        return {"step": t.step}
    if cfg.run.minutes:  # a new run fits its length to the budget; a resumed one keeps its plan
        cfg = time_budget.fit_run(t, state is not None, started, run_batches, advance)
    run.begin(cfg, t.step)  # config.json, and the log cut back to the checkpoint's step
    first_step = t.step

    # 6. the loop
    t.knn_sets = knn_sets(cfg) if cfg.run.knn_every else None
    views, batches, epochs = run_batches(t)
    print0(
        f"training {cfg.model.arch}/{cfg.model.patch_size} with {cfg.method} on {cfg.data.dataset} "
        f"({len(train_set)} images, {t.steps_per_epoch} steps/epoch, {t.last_step} steps) on {device}"
    )
    with tqdm(
        total=t.last_step, initial=t.step, desc="train", dynamic_ncols=True, disable=not is_main()
    ) as bar:
        for epoch in epochs:
            train_one_epoch(t, epoch, bar, batches, views)
    skipped = f"; skipped {t.skipped_images} unreadable images" if t.skipped_images else ""
    if t.step > first_step:
        print0(f"saved {run.checkpoint} (step {t.saved_step}) and {run.curves}{skipped}")
    else:
        print0(f"no training step to run (--optim.epochs={cfg.optim.epochs}): nothing was saved")

    # 7. evaluation: weighted k-NN of the teacher's CLS features, next to the same ViT at random init
    result = {"step": t.step}
    if cfg.run.eval_at_end:
        result.update(knn_against_random_init(cfg, ema_target.backbone, device, t.knn_sets))
        run.write_knn(result)
    cleanup()
    return result


@dataclasses.dataclass
class Training:
    """What the loop works on, built once by `main()`; `step` and `skipped_images` advance as it runs."""

    cfg: Config
    student: nn.Module  # trained by the optimiser (a DDP wrapper, or FSDP-sharded, with several processes)
    teacher: nn.Module  # gives the targets; no gradient
    ema_target: nn.Module  # follows the student by EMA: the teacher itself, except in distillation
    losses: Losses
    optimizer: torch.optim.Optimizer
    train_set: SeededViews
    run: RunFolder
    device: torch.device
    steps_per_epoch: int
    step: int = 0
    skipped_images: int = 0
    knn_sets: tuple | None = None
    saved_step: int | None = None  # the step of the checkpoint on disk (None: none yet)
    first_bad: Tensor | int = -1  # optim.fused: the first step with a non-finite loss (-1: none so far)
    device_scalars: dict = dataclasses.field(default_factory=dict)  # optim.fused: see `on_device`

    @property
    def networks(self) -> tuple[nn.Module, nn.Module, nn.Module]:  # train_step's first three arguments
        return self.student, self.teacher, self.ema_target

    @property
    def total_steps(self) -> int:  # the length of the schedules
        return self.cfg.optim.epochs * self.steps_per_epoch

    @property
    def last_step(self) -> int:  # where this run stops (--run.max_steps may stop it early)
        return min(self.total_steps, self.cfg.run.max_steps or self.total_steps)


def run_batches(t: Training) -> tuple[Pipeline, Iterator, range]:
    """The views (--data.augment: begun per image in the DataLoader workers, finished per batch on the
    device), an iterator over the run's batches from `t.step` on (one DataLoader, and one set of worker
    processes, for the whole run) and the epochs they span."""
    cfg = t.cfg
    if cfg.data.augment == "batch" and cfg.data.dataset in ("imagefolder", "folder"):
        print0(
            f"note: --data.augment=batch first resizes and centre-crops every image to --data.image_size="
            f"{cfg.data.image_size} px; --data.augment=crops cuts the crops from the original images"
        )
    views = pipeline(cfg.data, cfg.run.compile)
    t.train_set.transform = views.per_image
    first_epoch, end_epoch = t.step // t.steps_per_epoch, -(-t.last_step // t.steps_per_epoch)
    start = (t.step - first_epoch * t.steps_per_epoch) * cfg.optim.batch_size
    pin = t.device.type == "cuda"
    loader = run_loader(
        t.train_set, cfg, first_epoch, end_epoch, start, rank(), world_size(), pin, views.collate
    )
    return views, iter(loader), range(first_epoch, end_epoch)


def train_one_epoch(t: Training, epoch: int, bar: tqdm, batches: Iterator, views: Pipeline) -> None:
    """The steps of one epoch (from `t.step` on, when resumed mid-epoch): views, schedules, masks, the step,
    a log line every `run.log_every` steps, a checkpoint at the end of the epoch and of the run. `batches`:
    the run's DataLoader iterator, whose next batches are this epoch's."""
    cfg, world = t.cfg, world_size()
    clock, n_images = time.perf_counter(), 0
    steps = min((epoch + 1) * t.steps_per_epoch, t.last_step) - t.step
    for batch in itertools.islice(batches, steps):
        out, sched, crops, masks = advance(t, views, batch)
        n_images += crops[0].shape[0] * world
        bar.update(1)
        knn_now = bool(t.knn_sets) and t.step % (cfg.run.knn_every * t.steps_per_epoch) == 0
        log_now = t.step % cfg.run.log_every == 0 or t.step == t.last_step or knn_now
        save_now = t.step % t.steps_per_epoch == 0 or t.step == t.last_step
        if cfg.optim.fused and (log_now or save_now):
            check_finite(t)
        if log_now:
            row = log_row(t, epoch, out, sched, n_images / (time.perf_counter() - clock), knn_now)
            bar.set_postfix(
                loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", img_s=f"{row['images_per_s']:.0f}"
            )
            clock, n_images = time.perf_counter(), 0
        if save_now:
            save_checked(t, crops, masks, sched)
        if t.step >= t.last_step:
            return


def advance(t: Training, views: Pipeline, batch: tuple) -> tuple[dict, dict, list[Tensor], StepMasks]:
    """One step of the loop on a batch from the loader: the views on the device, the schedules at `t.step`,
    `train_step`, and `t.step` moved on. Returns the step's outputs, schedules, crops and masks."""
    cfg = t.cfg
    images, _, skipped, masks = batch
    crops = views.on_device(images, t.device, seeds.batch_views(cfg.run.seed, t.step, rank()))
    t.skipped_images += int(skipped.sum())
    sched = schedules(t.step, t.total_steps, t.steps_per_epoch, cfg.optim, cfg.loss, peak_lr(cfg.optim))
    apply_schedule(t.optimizer, sched["lr"], sched["wd"])
    masks = masks.to(t.device)  # the step's iBOT masks, drawn with its batch in the workers
    step_sched = on_device(sched, t.device_scalars, t.device) if cfg.optim.fused else sched
    seeds.step_draws(cfg.run.seed, t.step, rank())  # stochastic depth's stream for this step
    t.losses.gram_step(t.step, t.steps_per_epoch)  # DINOv3: the Gram teacher taken from the EMA when due
    try:
        out = train_step(*t.networks, t.losses, t.optimizer, crops, masks, step_sched, cfg.optim)
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{e} at step {t.step}: stopping; {kept_checkpoint(t)}") from None
    if cfg.optim.fused:  # the first step whose loss was not finite (-1: none), kept on the device
        t.first_bad = torch.where(out["finite"] | (t.first_bad >= 0), t.first_bad, t.step)
    t.step += 1
    return out, sched, crops, masks


def on_device(sched: dict, held: dict, device: torch.device) -> dict:
    """`sched` with the teacher momentum and temperature as 0-d tensors on `device`, kept in `held` and
    rewritten in place every step (--optim.fused, with the optimiser's lr and weight decay: `apply_schedule`):
    the step then takes no number from the host, and a recorded CUDA graph reads each step's values."""
    for key in ("momentum", "teacher_temp"):
        held.setdefault(key, torch.zeros((), device=device)).fill_(sched[key])
    return {**sched, **held}


def save_checked(t: Training, crops: list[Tensor], masks: StepMasks, sched: dict) -> None:
    """Write the checkpoint, unless the updated networks give a non-finite loss on this step's crops: an
    update can leave finite but huge weights whose next loss is NaN, and such a state must never replace
    the last good checkpoint. The check is one forward in eval mode (no stochastic depth, BatchNorm with its
    running statistics): no random number is drawn and no state changes, so the run itself is unaffected."""
    networks = (t.student, t.teacher)
    modes = [m.training for m in networks]
    try:
        for m in networks:
            m.eval()
        with torch.no_grad(), mixed_precision(crops[0].device):
            t_out = t.teacher(crops[:2], patch_index=masks.indices)
            targets = t.losses.teacher_targets(t_out, sched["teacher_temp"], masks, crops[:2])
            loss = t.losses(t.student(crops, masks.student, masks.indices), targets, masks)["loss"]
    finally:
        for m, mode in zip(networks, modes):
            m.train(mode)
    loss = all_reduce_mean(loss)  # every process takes the same branch
    if not torch.isfinite(loss):
        raise NonFiniteLoss(
            f"the update of step {t.step} gives loss {loss.item()}: stopping; {kept_checkpoint(t)}"
        )
    state = (t.student, t.ema_target, t.optimizer, t.losses)
    epochs_done = t.step // t.steps_per_epoch
    t.run.save(
        training_state(*state, t.step, epochs_done, t.cfg, t.skipped_images), last=t.step == t.last_step
    )
    t.saved_step = t.step


def check_finite(t: Training) -> None:
    """With optim.fused the loop learns of a non-finite loss here, at log and checkpoint steps (the one
    read-back of the flag); the steps since were skipped by the optimiser, so no update is kept or saved."""
    bad = int(t.first_bad)
    if bad >= 0:
        raise NonFiniteLoss(
            f"loss is not finite at step {bad} (updates skipped since): stopping; {kept_checkpoint(t)}"
        )


def kept_checkpoint(t: Training) -> str:
    if t.saved_step is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint {t.run.checkpoint} (step {t.saved_step}) is intact"


def resume_training(t: Training, state: dict) -> bool:
    """Continue from a checkpoint: the optimiser, the step and the RNG states; True if the run is finished."""
    t.step, t.skipped_images = restore_training(state, t.student, t.optimizer)
    t.saved_step = t.step
    print0(f"resumed {t.run.path} at step {t.step}/{t.last_step}")
    if t.step >= t.last_step:
        print0(f"run {t.run.path} is already finished ({t.step} steps): nothing to do")
    return t.step >= t.last_step


def log_row(t: Training, epoch: int, out: dict, sched: dict, images_per_s: float, knn_now: bool) -> dict:
    """One line of log.jsonl: losses averaged over processes, the schedules, collapse signals from this
    process's batch (teacher entropy and KL to uniform), throughput, and the k-NN curve when asked."""
    row = {
        "step": t.step,
        "epoch": epoch,
        **{k: all_reduce_mean(v).item() for k, v in out.items() if k.startswith("loss")},
        **sched,
        **entropy_stats(out["teacher_probs"]),
        "images_per_s": images_per_s,
        "skipped_images": t.skipped_images,
    }
    if knn_now:
        k = t.cfg.run.knn_k
        row["knn_top1"] = knn_eval(t.ema_target.backbone, *t.knn_sets, t.device, (k,))[k]
    t.run.append_log(row)
    return row


def train_step(
    student: nn.Module,
    teacher: nn.Module,
    ema_target: nn.Module,
    losses: Losses,
    optimizer: torch.optim.Optimizer,
    crops: list[Tensor],
    masks: StepMasks,
    sched: dict,
    optim: OptimConfig,
) -> dict:
    """One step in the order of DINO's Algorithm 1 (+ DINOv2's iBOT and KoLeo terms when enabled).

    crops: the 2 global crops, then the local ones, each (B, 3, H, W); masks: the step's iBOT masks; sched:
    the schedules at this step. With optim.accum_steps = a, the student runs on a micro-batches in turn
    (`loader.micro_batches`) while the targets, centres and EMA come from the whole batch. A non-finite loss
    raises NonFiniteLoss, or with optim.fused skips the update on the device (`optim.FiniteGuard`).
    """
    parallel.mark_step_begin(crops[0].device)  # --run.cuda_graphs: the graphs' outputs may be reused
    with torch.no_grad(), mixed_precision(crops[0].device):  # teacher: global views only, unmasked
        t_out = teacher(crops[:2], patch_index=masks.indices)
        targets = losses.teacher_targets(t_out, sched["teacher_temp"], masks, crops[:2])  # centred, sharpened
    optimizer.zero_grad(set_to_none=True)
    terms, guard = {}, FiniteGuard(optim.fused, crops[0].device)
    for crops_i, masks_i, targets_i in micro_batches(crops, masks, targets, optim.accum_steps):
        with mixed_precision(crops[0].device):
            s_out = student(crops_i, masks_i.student, masks_i.indices)  # every view; masked patches -> token
            micro = losses(s_out, targets_i, masks_i)  # H(P_t(x), P_s(x')), x != x', + iBOT, KoLeo
        guard.check(micro["loss"])
        (micro["loss"] / optim.accum_steps).backward()
        terms = {k: terms.get(k, 0) + v.detach() / optim.accum_steps for k, v in micro.items()}
    clip_gradients(student, optim.clip_grad, optim.clip_mode)
    drop_frozen_gradients(student, sched)  # the prototypes in the first epoch; a loaded backbone at first
    momentum = guard.before_update(optimizer, sched["momentum"])  # fused: a non-finite step changes nothing
    optimizer.step()
    ema_update(ema_target, student, momentum)  # theta_t <- m theta_t + (1 - m) theta_s
    losses.update_centers(t_out, masks)  # c <- m c + (1 - m) mean(g_t), over the whole batch
    return {**terms, "teacher_probs": torch.cat(targets["cls"]), "finite": guard.finite}


# ----------------------------------------------------------------------------------------------------------


def mixed_precision(device: torch.device):
    """bf16 autocast on GPUs (master weights and optimiser state stay fp32); fp32 on CPUs."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, NonFiniteLoss, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {cli.error_line(e)}")
    exit_worker()  # under torchrun: leave without the interpreter's shutdown (see minidino/dist.py)
