"""Train a ViT with DINO (Caron et al. 2021, arXiv 2104.14294): self-distillation with no labels.

    python train.py                                   # embedded shapes data, CPU, a few minutes
    python train.py --preset cifar10 --data.root=data/cifar10 --run.max_steps=200
    python train.py --preset imagenet --data.root=/data/imagenet      # one GPU
    python train.py --resume runs/shapes              # continue a stopped run (a finished one does nothing)
    python train.py --help                            # every option with its meaning

`main()` reads in the paper's order: data -> student and teacher -> loss -> optimiser -> schedules ->
resume -> loop -> evaluation. `train_step()` follows DINO's Algorithm 1. A run folder gets config.json,
log.jsonl (one JSON object per logging step), checkpoint.pt (atomic, every epoch) and curves.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from minidino import config as C
from minidino import parallel
from minidino.augment import BatchMultiCrop, MultiCropAugmentation, eval_transform, to_tensor_image
from minidino.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from minidino.data import DataError, EpochSampler, SeededViews, build_dataset
from minidino.dist import all_reduce_mean, cleanup, init_distributed, is_main, local, print0, rank, world_size
from minidino.ema import ema_update
from minidino.evaluate import knn_eval
from minidino.koleo import koleo_loss
from minidino.losses import build_losses, entropy_stats
from minidino.masking import ibot_masks
from minidino.meta_arch import build_model, build_student_teacher
from minidino.schedules import schedules
from minidino.visualize import plot_training_curves
from minidino.vit import build_vit


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Optimisation helpers


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
    name = name.removeprefix("backbone.")
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: torch.nn.Module, optim: C.OptimConfig | None = None) -> list[dict]:
    """Optimiser groups, each with an lr multiplier and a weight-decay flag.

    No weight decay on biases, norms, tokens and position embeddings (DINO's get_params_groups). DINOv2 adds
    layer-wise lr decay (block i of L gets decay^(L + 1 - i)) and a smaller lr for the patch embedding.
    """
    decay = optim.layer_decay if optim else 1.0
    patch_mult = optim.patch_embed_lr_mult if optim else 1.0
    depth = len(model.backbone.blocks) if hasattr(model, "backbone") else 0
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = decay ** (depth + 1 - layer_id(name, depth))
        if "patch_embed" in name:
            mult *= patch_mult
        no_wd = p.ndim <= 1 or name.endswith("_token") or name.endswith("_tokens") or "pos_embed" in name
        groups.setdefault((mult, not no_wd), []).append(p)
    return [{"params": ps, "lr_mult": m, "apply_wd": wd} for (m, wd), ps in groups.items()]


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, clip: float) -> None:
    """DINO clips each parameter tensor's gradient norm to `clip` separately (not one global norm). Under
    FSDP each process holds a shard of every gradient: the squared norms of the shards are summed first."""
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    sq_norms = torch.stack(torch._foreach_norm(grads)) ** 2  # (P,)
    if parallel.is_sharded(model):
        torch.distributed.all_reduce(sq_norms)
    factors = (clip / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(factors.unbind()))


def train_step(
    student,
    teacher,
    losses: dict,
    optimizer,
    crops,
    sched: dict,
    cfg: C.Config,
    freeze_last_layer: bool,
    autocast,
    masks: Tensor | None = None,
    ema_model=None,
) -> dict:
    """One step, in the order of DINO's Algorithm 1 (+ DINOv2's iBOT and KoLeo terms when enabled).

    losses: {'dino': DINOLoss, 'ibot': IBOTLoss (if ibot_weight > 0)}; masks: (2B, N) bool iBOT masks of the
    two global crops (student side only) or None. Distillation (DINOv2 Sec. 5): `teacher` is a frozen larger
    model, `ema_model` the EMA of the student that is updated instead, and the student input is not masked
    (masks then only select the patches of the patch loss, all of them).
    """
    n_global, w = 2, cfg.loss
    with autocast:
        # teacher: global views only, unmasked, no gradient; centred and sharpened targets
        with torch.no_grad():
            t_out = teacher(crops[:n_global], patch_masks=masks)
            t_probs = losses["dino"].teacher_probs(t_out["logits"], sched["teacher_temp"])
            if masks is not None:
                t_patch_logits = t_out["patch_logits"]  # (M, K): the masked patches of the global crops
                t_patch_probs = losses["ibot"].teacher_probs([t_patch_logits], sched["teacher_temp"])[0]
        # student: every view; masked patches of the global views replaced by the mask token
        s_masks = list(masks.chunk(n_global)) if masks is not None and ema_model is None else None
        s_out = student(crops, s_masks + [None] * (len(crops) - n_global) if s_masks else None, masks)
        terms = {"loss_dino": losses["dino"](s_out["logits"], t_probs)}  # H(P_t(x), P_s(x')), x != x'
        if masks is not None:
            terms["loss_ibot"] = losses["ibot"](s_out["patch_logits"], t_patch_probs, masks)
        if w.koleo_weight:  # per global crop, on backbone CLS features (before the head)
            terms["loss_koleo"] = sum(koleo_loss(c) for c in s_out["cls"][:n_global]) / n_global
        weights = {"loss_dino": w.dino_weight, "loss_ibot": w.ibot_weight, "loss_koleo": w.koleo_weight}
        loss = sum(weights[k] * v for k, v in terms.items())
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.clip_grad:
        clip_gradients(student, cfg.optim.clip_grad)
    # the prototypes stay fixed in the first epoch(s): DINO finds this stabilises training
    if freeze_last_layer:
        model = parallel.unwrap(student)
        for head in (model.head, model.ibot_head):
            if head is not None:
                head.last_layer.weight.grad, head.last_layer_g.grad = None, None
    optimizer.step()
    ema_update(teacher if ema_model is None else ema_model, student, sched["momentum"])  # m t + (1-m) s
    losses["dino"].update_center(t_out["logits"])  # c <- m c + (1 - m) mean(g_t)
    if masks is not None:
        losses["ibot"].update_center([t_patch_logits])
    return {
        "loss": loss.detach(),
        **{k: v.detach() for k, v in terms.items()},
        "teacher_probs": torch.cat(t_probs),
    }


# ----------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError("option --run.device=cuda: no CUDA device is available")
    return torch.device(name)


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


def main(argv: list[str] | None = None) -> dict:
    cfg, resume, wants_help = C.parse_args(sys.argv[1:] if argv is None else argv)
    if wants_help:
        print(C.help_text(cfg))
        return {}
    device = init_distributed(resolve_device(cfg.run.device))  # under torchrun: a process group, this GPU
    world = world_size()
    if world > 1 and cfg.run.parallel == "none":
        raise C.ConfigError(
            f"launched on {world} processes: choose --run.parallel=ddp or --run.parallel=fsdp"
        )
    if cfg.optim.batch_size % world:
        raise C.ConfigError(
            f"option --optim.batch_size={cfg.optim.batch_size} (the global batch) must be "
            f"divisible by the {world} processes"
        )
    run_dir = resume or cfg.run.out_dir
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resume is None and os.path.exists(ckpt_path):
        raise C.ConfigError(
            f"run folder {run_dir} already holds a checkpoint: continue it with --resume "
            f"{run_dir}, or choose another --run.out_dir"
        )
    if is_main():
        os.makedirs(run_dir, exist_ok=True)
        C.save_json(cfg, os.path.join(run_dir, "config.json"))
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # 1. data: multi-crop views of unlabelled images, made per image in the workers or per batch on `device`
    train_set = SeededViews(build_dataset(cfg.data, "train", None, cfg.run.seed), cfg.run.seed)
    steps_per_epoch = len(train_set) // cfg.optim.batch_size
    if steps_per_epoch == 0:
        raise C.ConfigError(
            f"option --optim.batch_size={cfg.optim.batch_size} is larger than the data set "
            f"({len(train_set)} images)"
        )
    chosen = C.size_for_data(cfg, len(train_set))  # options left at 0 follow the data size
    if chosen:
        print0(f"for {len(train_set)} images: {' '.join(chosen)}")
        if is_main():
            C.save_json(cfg, os.path.join(run_dir, "config.json"))
    total_steps = cfg.optim.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.run.max_steps) if cfg.run.max_steps else total_steps

    # 2. student and teacher: same architecture, same initial weights; the teacher gets no gradient.
    #    Distillation: the teacher is a frozen trained model and an EMA of the student is kept instead.
    student, teacher = build_student_teacher(cfg)
    ema_model = None
    if cfg.run.distill_from:
        ema_model, teacher = teacher, load_distill_teacher(cfg)
    for m in (student, teacher, ema_model):
        if m is not None:
            m.to(device)
    step, skipped_images = 0, 0
    state = load_checkpoint(ckpt_path) if resume is not None and os.path.exists(ckpt_path) else None
    if state is not None:  # full (unsharded) weights, loaded before any sharding: any process count works
        load_model_state(student, state["student"], f"checkpoint {ckpt_path} (student)")
        load_model_state(ema_model or teacher, state["teacher"], f"checkpoint {ckpt_path} (teacher)")
    # several processes: DDP replicas or FSDP2 shards (minidino/parallel.py); one process: unchanged
    followers = [m for m in (teacher, ema_model) if m is not None]
    student = parallel.wrap(
        student,
        followers,
        cfg.run.parallel if world > 1 else "none",
        device,
        cfg.run.activation_checkpointing,
        cfg.run.compile,
    )
    # 3. losses, holding the teacher centres: DINO on CLS tokens, iBOT on masked patches (DINOv2)
    L = cfg.loss
    losses = {name: module.to(device) for name, module in build_losses(cfg).items()}

    # 4. optimiser: AdamW, lr and weight decay set every step from the schedules
    optimizer = torch.optim.AdamW(
        param_groups(parallel.unwrap(student), cfg.optim), lr=0.0, betas=(0.9, 0.999)
    )
    global_batch = cfg.optim.batch_size
    if cfg.optim.lr_scaling == "linear":  # DINO: lr x batch / 256
        lr_peak = cfg.optim.lr * global_batch / 256
    else:  # DINOv2: lr x sqrt(batch / 1024)
        lr_peak = cfg.optim.lr * (global_batch / 1024) ** 0.5

    # 5. resume: optimiser (the weights are loaded above), centre, step and RNG states
    if state is not None:
        parallel.load_optimizer_state(student, optimizer, state["optimizer"])
        for name, loss_module in losses.items():
            loss_module.load_state_dict(state["losses"][name])
        step, skipped_images = state["step"], state["skipped_images"]
        set_rng_state(state["rng"])
        print0(f"resumed {run_dir} at step {step}/{last_step}")
        if step >= last_step:
            print0(f"run {run_dir} is already finished ({step} steps): nothing to do")
            cleanup()
            return {"step": step}
    log_path = os.path.join(run_dir, "log.jsonl")
    if is_main():
        _truncate_log(log_path, step)

    def save() -> None:
        # every process takes part in gathering FSDP shards; only rank 0 writes (atomically)
        full = {
            "student": parallel.full_state_dict(student),
            "teacher": parallel.full_state_dict(ema_model or teacher),
            "optimizer": parallel.optimizer_state_dict(student, optimizer),
        }
        if not is_main():
            return
        save_checkpoint(
            {
                **full,
                "losses": {k: v.state_dict() for k, v in losses.items()},
                "step": step,
                "epoch": step // steps_per_epoch,
                "config": C.to_dict(cfg),
                "skipped_images": skipped_images,
                "rng": rng_state(),
            },
            ckpt_path,
        )
        if os.path.exists(log_path) and os.path.getsize(log_path):
            plot_training_curves(log_path, os.path.join(run_dir, "curves.png"))

    knn_sets = eval_sets(cfg) if cfg.run.knn_every else None

    # 6. the loop
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    print0(
        f"training {cfg.model.arch}/{cfg.model.patch_size} with {cfg.method} on {cfg.data.dataset} "
        f"({len(train_set)} images, {steps_per_epoch} steps/epoch, {last_step} steps) on {device}"
    )
    pbar = tqdm(total=last_step, initial=step, dynamic_ncols=True, desc="train", disable=not is_main())
    local_batch = cfg.optim.batch_size // world
    t_last, n_images = time.perf_counter(), 0
    while step < last_step:
        epoch = step // steps_per_epoch
        train_set.epoch = epoch
        # DINOv2's high-resolution phase: larger crops for the last epochs (position embeddings interpolate)
        data_cfg = (
            highres(cfg.data, cfg.model.patch_size)
            if epoch >= cfg.optim.epochs - cfg.data.highres_epochs
            else cfg.data
        )
        batch_augment = BatchMultiCrop.from_config(data_cfg) if data_cfg.batch_augment else None
        train_set.dataset.transform = (
            to_tensor_image(data_cfg.image_size)
            if batch_augment
            else MultiCropAugmentation.from_config(data_cfg)
        )
        start = (step - epoch * steps_per_epoch) * cfg.optim.batch_size
        loader = DataLoader(  # this process's share of each global batch (all of it in one process)
            train_set,
            batch_size=local_batch,
            drop_last=True,
            sampler=EpochSampler(
                len(train_set), cfg.run.seed, epoch, start, cfg.optim.batch_size, rank(), world
            ),
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        for crops, _, skipped in loader:
            if batch_augment:  # crops is a batch of whole images here; its views depend on (seed, step) only
                g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step + 7919 * rank())
                crops = batch_augment(crops.to(device, non_blocking=True), g)
            else:
                crops = [c.to(device, non_blocking=True) for c in crops]
            skipped_images += int(skipped.sum())
            sched = schedules(step, total_steps, steps_per_epoch, cfg.optim, cfg.loss, lr_peak)
            for group in optimizer.param_groups:
                group["lr"] = sched["lr"] * group["lr_mult"]
                group["weight_decay"] = sched["wd"] if group["apply_wd"] else 0.0
            masks = step_masks(cfg, crops[0], step, rank(), world) if L.ibot_weight else None
            try:
                freeze = epoch < cfg.optim.freeze_last_layer
                out = train_step(
                    student, teacher, losses, optimizer, crops, sched, cfg, freeze, autocast, masks, ema_model
                )
            except NonFiniteLoss as e:
                pbar.close()
                kept = (
                    f"the last good checkpoint {ckpt_path} is intact"
                    if os.path.exists(ckpt_path)
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLoss(f"{e} at step {step}: stopping; {kept}") from None
            step += 1
            n_images += crops[0].shape[0] * world
            pbar.update(1)
            knn_now = bool(knn_sets) and step % (cfg.run.knn_every * steps_per_epoch) == 0
            if step % cfg.run.log_every == 0 or step == last_step or knn_now:
                now = time.perf_counter()
                row = {  # losses averaged over processes; collapse signals from this process's batch
                    "step": step,
                    "epoch": epoch,
                    **{k: all_reduce_mean(v).item() for k, v in out.items() if k.startswith("loss")},
                    **sched,
                    **entropy_stats(out["teacher_probs"]),
                    "images_per_s": n_images / (now - t_last),
                    "skipped_images": skipped_images,
                }
                if knn_now:  # a k-NN curve, if asked
                    row["knn_top1"] = knn_eval(
                        (ema_model or teacher).backbone, *knn_sets, device, (cfg.run.knn_k,)
                    )[cfg.run.knn_k]
                t_last, n_images = time.perf_counter(), 0
                if is_main():
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                pbar.set_postfix(
                    loss=f"{row['loss']:.3f}", lr=f"{sched['lr']:.1e}", img_s=f"{row['images_per_s']:.0f}"
                )
            if step % steps_per_epoch == 0 or step == last_step:
                save()
            if step >= last_step:
                break
    pbar.close()
    print0(
        f"saved {ckpt_path} and {os.path.join(run_dir, 'curves.png')}"
        + (f"; skipped {skipped_images} unreadable images" if skipped_images else "")
    )

    # 7. evaluation: weighted k-NN of the teacher's CLS features, next to the same ViT at random init
    result = {"step": step}
    if cfg.run.eval_at_end:
        result.update(evaluate_knn(cfg, (ema_model or teacher).backbone, device, knn_sets))
        if is_main():
            with open(os.path.join(run_dir, "knn.json"), "w") as fh:
                json.dump(result, fh, indent=2)
    cleanup()
    return result


def step_masks(cfg: C.Config, global_crop: Tensor, step: int, rank: int = 0, world: int = 1) -> Tensor | None:
    """iBOT masks (2b, N) for the two global crops (b images here) of a step, seeded by the step like the
    views: drawn for the global batch, this process keeps its images' rows. In distillation every patch (no
    masking, the patch loss on all of them). None if nothing got masked."""
    b, side = global_crop.shape[0], global_crop.shape[-1] // cfg.model.patch_size
    if cfg.run.distill_from:
        return torch.ones(2 * b, side * side, dtype=torch.bool, device=global_crop.device)
    g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step + 7)
    masks = ibot_masks(2 * b * world, side, side, g, cfg.loss.mask_ratio, cfg.loss.mask_probability)
    if not masks.any():  # decided on the global batch, so every process takes the same branch
        return None
    masks = masks.view(2, world, b, -1)[:, rank].reshape(2 * b, -1)  # (crop, process, image, N) -> ours
    return masks.to(global_crop.device, non_blocking=True)  # no stream sync: see attention.packed_offsets


def load_distill_teacher(cfg: C.Config):
    """The frozen teacher of a distillation run: the EMA teacher of another minidino run (DINOv2 Sec. 5)."""
    state = load_checkpoint(cfg.run.distill_from)
    tcfg = C.from_dict(state["config"])
    if tcfg.head.out_dim != cfg.head.out_dim or tcfg.model.patch_size != cfg.model.patch_size:
        raise C.ConfigError(
            f"--run.distill_from={cfg.run.distill_from}: the student needs the teacher's "
            f"--head.out_dim={tcfg.head.out_dim} and --model.patch_size={tcfg.model.patch_size}"
        )
    teacher = build_model(tcfg, drop_path=0.0)
    load_model_state(teacher, state["teacher"], f"checkpoint {cfg.run.distill_from} (teacher)")
    return teacher.requires_grad_(False)


def highres(data: C.DataConfig, patch: int) -> C.DataConfig:
    """The data config of the high-resolution phase: crop sides x highres_scale, in whole patches."""

    def up(size: int) -> int:
        return max(patch, round(size * data.highres_scale / patch) * patch)

    return dataclasses.replace(
        data,
        global_crops_size=up(data.global_crops_size),
        local_crops_size=up(data.local_crops_size),
        image_size=up(data.image_size),
    )


def eval_sets(cfg: C.Config):
    """(train, held-out) datasets with the deterministic evaluation transform, or None if there is no held-out
    split."""
    try:
        tf = eval_transform(cfg.data.eval_size)
        return tuple(build_dataset(cfg.data, s, tf, cfg.run.seed) for s in ("train", "test"))
    except DataError as e:
        print0(f"no k-NN evaluation: {e}")
        return None


def evaluate_knn(cfg: C.Config, backbone: torch.nn.Module, device: torch.device, sets=None) -> dict:
    """k-NN of `backbone` and of the same ViT at random init; `sets` reuses the k-NN curve's datasets."""
    sets = sets or eval_sets(cfg)
    if sets is None:
        return {}
    train_set, test_set = sets
    k = cfg.run.knn_k
    kw = dict(ks=(k,), device=device, num_workers=cfg.data.num_workers)
    trained = knn_eval(backbone, train_set, test_set, **kw)[k]
    torch.manual_seed(cfg.run.seed)  # the student's initial weights
    random_init = knn_eval(build_vit(cfg.model).to(device), train_set, test_set, **kw)[k]
    print0(
        f"k-NN top-1 (k={k}, {len(test_set)} held-out images): trained {trained:.1f}% | "
        f"random init {random_init:.1f}% | gain {trained - random_init:+.1f} points"
    )
    return {"knn_k": k, "knn_top1": trained, "knn_top1_random_init": random_init}


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (a crashed run may have logged past it)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        rows = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as fh:
        fh.writelines(rows)


if __name__ == "__main__":
    try:
        main()
    except (C.ConfigError, DataError, NonFiniteLoss, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
