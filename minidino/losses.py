"""DINO's self-distillation loss with centering and sharpening (Caron et al. 2021, arXiv 2104.14294), and
iBOT's masked-patch loss (Zhou et al. 2021, arXiv 2111.07832) as used by DINOv2 (arXiv 2304.07193, Sec. 4).

Paper Eq. (1)-(2): for teacher global views x in {x1_g, x2_g} and every student view x' != x,

    loss = sum_x sum_{x' != x} H(P_t(x), P_s(x')),     H(a, b) = -sum_k a_k log b_k
    P_s(x') = softmax(g_s(x') / tau_s)                  (student, tau_s = 0.1)
    P_t(x)  = softmax((g_t(x) - c) / tau_t)             (teacher: centred by c, sharpened by tau_t < tau_s)
    c <- m c + (1 - m) mean_batch g_t                   (Eq. 4, m = 0.9, after each step)

Centering alone pushes the teacher towards the uniform distribution and sharpening alone towards one
prototype; together they balance (Sec. 5.3). The loss is averaged over the n_pairs view pairs (as the
official code does) so its scale does not depend on the crop count. DINOv2's large /14 runs replace the
running centre by Sinkhorn-Knopp (`centering="sinkhorn"`, see sinkhorn.py); its ImageNet-1k recipe keeps it.

iBOT: the student sees global crops with some patches replaced by a mask token; for each masked patch it
predicts the teacher's prototype distribution of that patch in the *unmasked* crop. Cross-entropies are
averaged within an image (weight 1 / number of masked patches), then over the masked images.

Layer: the method (README, "Read the code").
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError, LossConfig
from .fused_loss import dino_loss_fused, fp32_at_least
from .gram import GramAnchor
from .koleo import koleo_loss, koleo_loss_grouped
from .masking import StepMasks
from .sinkhorn import sinkhorn_knopp


def dino_loss(
    student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float, local_weight: float = 1.0
) -> Tensor:
    """Mean over pairs (teacher global view i, student view j != i) of the batch-mean cross-entropy.

    student_logits: one (B, K) tensor per student crop, the global crops first in the teacher's order.
    teacher_probs:  one (B, K) distribution per teacher (global) crop, already centred and sharpened.
    local_weight: the pairs of local student crops count this much (DINOv3's reweight_dino_local_loss: its
    global and local terms, each a mean, weighted by their pair counts, the local one times this weight).
    """
    student_logp = [F.log_softmax(fp32_at_least(s) / student_temp, dim=-1) for s in student_logits]
    total, n_pairs = 0.0, 0
    for i, t in enumerate(teacher_probs):
        for j, s in enumerate(student_logp):
            if i == j:  # the same view seen by both: skipped, otherwise predicting it is trivial
                continue
            w = local_weight if j >= len(teacher_probs) else 1.0
            total = total + w * torch.sum(-t * s, dim=-1).mean()
            n_pairs += 1
    return total / n_pairs


def entropy_stats(probs: Tensor) -> dict[str, float]:
    """Collapse signals of the teacher distribution (B, K) (DINO Sec. 5.3, Fig. 7).

    entropy: mean per-sample entropy; near ln K means uniform collapse, near 0 means confident.
    kl_uniform: KL(mean_batch P || uniform) = ln K - H(mean P); near ln K means one prototype wins for every
    image (mode collapse), near 0 means the batch spreads over prototypes.
    """
    probs = probs.float()
    ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
    mean = probs.mean(0)
    kl = math.log(probs.shape[-1]) + (mean * torch.log(mean.clamp_min(1e-12))).sum()
    return {"teacher_entropy": ent.item(), "teacher_kl_uniform": kl.item(), "ln_K": math.log(probs.shape[-1])}


def ibot_loss(
    student_logits: Tensor, teacher_probs: Tensor, weights: Tensor, n_images: int, student_temp: float
) -> Tensor:
    """iBOT patch loss.

    student_logits, teacher_probs: (M, K) for the M masked patches (`StepMasks.indices` order).
    weights: (M,) 1 / the number of masked patches of the patch's image (`StepMasks.weights`), so that the
    cross-entropies are averaged within each image. n_images: the global crops of the batch, masked or not.
    """
    per_patch = torch.sum(
        -teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1
    )
    # mean over the masked patches of each image, summed, divided by *all* images, masked or not (as in the
    # official code): every process divides by the same count, so averaging over processes is exact
    return (per_patch * weights).sum() / n_images


CENTERINGS = ("center", "sinkhorn", "none")


class TeacherCentering(nn.Module):
    """Base of the DINO and iBOT losses: turns teacher logits into targets, softmax((g_t - c) / tau_t)
    with the running centre c (DINO; a buffer, so it is checkpointed), Sinkhorn-Knopp (DINOv2 /14), or no
    centering (an ablation), and keeps the student temperature tau_s for the subclass's cross-entropy."""

    def __init__(self, out_dim: int, cfg: LossConfig | None = None):
        super().__init__()
        cfg = cfg or LossConfig()
        self.student_temp, self.center_momentum = cfg.student_temp, cfg.center_momentum
        self.centering, self.sinkhorn_iters = cfg.centering, cfg.sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(
        self, teacher_logits: list[Tensor], teacher_temp: float, valid: Tensor | None = None
    ) -> list[Tensor]:
        """Targets for each teacher crop (or each group of patch logits). valid: (rows,) bool over all the
        rows, False for padding (fixed-size mask buffers): Sinkhorn leaves those out."""
        if self.centering == "sinkhorn":  # one equipartition over all crops of the step
            probs = sinkhorn_knopp(torch.cat(teacher_logits), teacher_temp, self.sinkhorn_iters, valid)
            return list(probs.split([t.shape[0] for t in teacher_logits]))
        c = self.center if self.centering == "center" else 0.0
        return [F.softmax((t.float() - c) / teacher_temp, dim=-1) for t in teacher_logits]

    @torch.no_grad()
    def update_center(self, teacher_logits: list[Tensor], valid: Tensor | None = None) -> None:
        """c <- m c + (1 - m) mean of the step's teacher outputs (over all processes when distributed); the
        rows where `valid` is False (padding) are left out of the mean."""
        if self.centering != "center":
            return
        t = torch.cat(teacher_logits).float()  # (n_global * B, K)
        if valid is None:
            batch_sum, count = t.sum(0, keepdim=True), torch.tensor(float(t.shape[0]), device=t.device)
        else:
            batch_sum, count = (t * valid[:, None]).sum(0, keepdim=True), valid.sum().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


class DINOLoss(TeacherCentering):
    """DINO's CLS loss with its centre; `forward(student_logits, teacher_probs)` is Eq. (1)."""

    def __init__(self, out_dim: int, cfg: LossConfig | None = None):
        super().__init__(out_dim, cfg)
        cfg = cfg or LossConfig()
        self.fused, self.local_weight = cfg.fused_dino_loss, cfg.local_weight  # fused: `dino_loss_fused`

    def forward(self, student_logits: list[Tensor], teacher_probs: list[Tensor]) -> Tensor:
        loss = dino_loss_fused if self.fused else dino_loss
        return loss(student_logits, teacher_probs, self.student_temp, self.local_weight)


class IBOTLoss(TeacherCentering):
    """iBOT's masked-patch loss with its own centre (patch statistics differ from CLS statistics)."""

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: StepMasks) -> Tensor:
        return ibot_loss(student_logits, teacher_probs, masks.weights, len(masks.patches), self.student_temp)


class Losses(nn.Module):
    """Every loss term of a step, weighted: DINO on the CLS tokens, iBOT on the masked patches when the step
    has masks (the model outputs then hold 'patch_logits'), KoLeo on the student's CLS features of each
    global crop when its weight is not 0, Gram anchoring on their patch features once its teacher is taken
    (DINOv3, gram.py). Holds the teacher centres and the Gram teacher: what a checkpoint keeps of them."""

    def __init__(
        self,
        out_dim: int,
        cfg: LossConfig | None = None,
        koleo_group: tuple[int, bool] = (0, False),
        ibot_out_dim: int = 0,
        gram: GramAnchor | None = None,
    ):
        """koleo_group: (images per group, whether a group spans processes), `koleo_groups`; 0: each
        crop's batch as one group. ibot_out_dim: the iBOT head's K when it has its own (0: out_dim)."""
        super().__init__()
        cfg = cfg or LossConfig()
        self.koleo_group = koleo_group
        self.dino = DINOLoss(out_dim, cfg)
        self.ibot = IBOTLoss(ibot_out_dim or out_dim, cfg) if cfg.ibot_weight else None
        self.gram = gram
        self.weights = {
            "loss_dino": cfg.dino_weight,
            "loss_ibot": cfg.ibot_weight,
            "loss_koleo": cfg.koleo_weight,
            "loss_gram": gram.cfg.weight if gram is not None else 0.0,
        }

    @torch.no_grad()
    def teacher_targets(
        self,
        teacher_out: dict,
        teacher_temp: float,
        masks: StepMasks | None = None,
        global_crops: list[Tensor] | None = None,
    ) -> dict:
        """Centred, sharpened targets: 'cls', one (B, K) per global crop; 'patch', (M, K) for the M patches
        of the patch loss (`masks`: the step's, whose padding, if any, Sinkhorn leaves out); 'gram', the Gram
        teacher's patch features (2B, N, D) of the `global_crops` once it is active."""
        targets = {"cls": self.dino.teacher_probs(teacher_out["logits"], teacher_temp)}
        if "patch_logits" in teacher_out:
            valid = masks.valid if masks is not None else None
            targets["patch"] = self.ibot.teacher_probs([teacher_out["patch_logits"]], teacher_temp, valid)[0]
        if self.gram is not None and self.gram.active and global_crops is not None:
            targets["gram"] = self.gram.targets(global_crops)
        return targets

    def gram_step(self, step: int, steps_per_epoch: int) -> None:
        """Before each step: the Gram teacher taken from the EMA teacher when due (nothing without Gram)."""
        if self.gram is not None:
            self.gram.step(step, steps_per_epoch)

    def forward(self, student_out: dict, targets: dict, masks: StepMasks) -> dict[str, Tensor]:
        """{'loss_dino', 'loss_ibot', 'loss_koleo' (those that apply), 'loss': their weighted sum}."""
        n_global = len(targets["cls"])
        terms = {"loss_dino": self.dino(student_out["logits"], targets["cls"])}  # H(P_t(x), P_s(x')), x != x'
        if "patch" in targets:
            terms["loss_ibot"] = self.ibot(student_out["patch_logits"], targets["patch"], masks)
        if self.weights["loss_koleo"]:  # per global crop, summed (DINOv2's ssl_meta_arch), on backbone CLS
            terms["loss_koleo"] = sum(self.koleo(c) for c in student_out["cls"][:n_global])
        if "gram" in targets:  # the student's patch features of its (masked) global crops, as in DINOv3
            terms["loss_gram"] = self.gram(torch.cat(student_out["patch"][:n_global]), targets["gram"])
        terms["loss"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms

    def koleo(self, x: Tensor) -> Tensor:
        group, spans = self.koleo_group
        return koleo_loss_grouped(x, group, spans) if group else koleo_loss(x)

    @torch.no_grad()
    def update_centers(self, teacher_out: dict, masks: StepMasks | None = None) -> None:
        """c <- m c + (1 - m) mean(g_t) for the CLS centre (and the patch centre when there were masks, over
        their valid rows)."""
        self.dino.update_center(teacher_out["logits"])
        if "patch_logits" in teacher_out:
            self.ibot.update_center([teacher_out["patch_logits"]], masks.valid if masks is not None else None)

    def centers(self) -> dict[str, dict]:
        """The centres (and the Gram teacher) for a checkpoint, {'dino': ..., 'ibot': ..., 'gram': ...}."""
        return {name: loss.state_dict() for name, loss in self.named_children()}

    def load_centers(self, saved: dict[str, dict]) -> None:
        """Load what `centers` saved; a part the saved run had not (a Gram teacher, when a new run with Gram
        starts from one without) keeps its start."""
        for name, loss in self.named_children():
            if name in saved:
                loss.load_state_dict(saved[name])


def build_losses(cfg, world: int = 1, ema_backbone: nn.Module | None = None) -> Losses:
    """The losses of a `Config` (the prototype count K comes from its head) on `world` processes; with
    Gram anchoring, `ema_backbone` is the EMA teacher's backbone its Gram teacher copies."""
    ibot_k = cfg.head.ibot_out_dim if cfg.head.ibot_separate_head else 0
    gram = None
    if cfg.gram.weight:
        if ema_backbone is None:
            raise ConfigError(
                "--gram.weight needs the EMA teacher's backbone (build_losses(..., ema_backbone))"
            )
        gram = GramAnchor(ema_backbone, cfg.gram)
    return Losses(cfg.head.out_dim, cfg.loss, koleo_groups(cfg, world), ibot_k, gram)


def koleo_groups(cfg, world: int) -> tuple[int, bool]:
    """(images per KoLeo group, whether a group spans processes) for the global batch cut into `world`
    processes x `accum_steps` micro-batches; a one-line error when a group would span micro-batches (their
    features never meet) or does not divide the batch."""
    batch, accum = cfg.optim.batch_size, cfg.optim.accum_steps
    group, micro = cfg.loss.koleo_group or batch, batch // (world * accum)
    if not cfg.loss.koleo_weight:
        return 0, False
    if group < 2 or batch % group or (micro % group and (group % micro or accum > 1)):
        raise ConfigError(
            f"option --loss.koleo_group={cfg.loss.koleo_group} (0: the whole batch): a group must divide the "
            f"global batch of {batch}, and lie within a micro-batch of {micro} images ({world} processes x "
            f"--optim.accum_steps={accum}) unless it spans whole processes' shares; try {math.gcd(group, micro)}"
        )
    return group, group > micro
