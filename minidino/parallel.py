"""Several processes: wrap the student (and the teacher) for DDP or FSDP2, in one place.

The order is fixed and each step wraps the result of the one before:
  1. activation checkpointing, per transformer block (optional): a block's activations are recomputed in
     the backward instead of stored, trading ~30% more compute for memory;
  2. torch.compile, per block (`--run.compile`): compiling blocks one by one keeps the graphs small and lets
     FSDP's per-block hooks stay outside them; or each network whole, backbone and heads as one graph, and
     the losses (`--run.compile_step`, not with FSDP), replayed as CUDA graphs with `--run.cuda_graphs`
     (torch.compile's reduce-overhead mode: the host launches one graph instead of every kernel);
  3. DDP (a full copy of the model per process; gradients averaged by all-reduce during the backward), or
     FSDP2 (`fully_shard` on every block, the backbone, then the whole model: each process keeps 1/N of every
     parameter, gradient and optimiser state; a block's parameters are all-gathered just before it runs and
     freed after). FSDP's `MixedPrecisionPolicy` computes in bf16 and reduces gradients in fp32 on GPUs.
The teacher gets no gradients. Under DDP it stays a plain module: every process applies the same EMA to the
same averaged student, so the copies stay equal. Under FSDP it is sharded exactly like the student, so the
EMA update is a local operation on matching shards (ema.py works on the local tensors).

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .dist import is_dist, print0
from .vit import Block

MODES = ("none", "ddp", "fsdp")


# inductor generates the kernels; aot_eager (tests, a quick look on a CPU) traces the same graphs and runs them
# op by op, and ignores cuda_graphs' mode
COMPILE_BACKEND = os.environ.get("MINIDINO_COMPILE_BACKEND", "inductor")


def compile_options(run) -> dict:
    """torch.compile's arguments for --run.compile_step / --run.cuda_graphs."""
    # one cache of graphs per code object: student and teacher share SSLModel.forward, and each keeps a graph
    # per grad mode, mask layout and evaluation call; past torch's default of 8 it would fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    options = {"backend": COMPILE_BACKEND}
    if run.cuda_graphs:
        options["mode"] = "reduce-overhead"
    return options


def mark_step_begin(device: torch.device) -> None:
    """A new training step: with --run.cuda_graphs the graphs' output memory of the last step may be reused
    (a no-op without graphs)."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def compile_losses(losses: nn.Module, run) -> nn.Module:
    """The losses' forward (DINO, iBOT, KoLeo on the student's outputs) compiled with --run.compile_step;
    the teacher targets stay eager (a softmax or three Sinkhorn iterations on a (2B, K) tensor)."""
    if run.compile_step:
        losses.compile(**compile_options(run))
    return losses


def wrap(student: nn.Module, no_grad_models: list[nn.Module], run, device: torch.device) -> nn.Module:
    """Returns the student to train with (a DDP wrapper, or the same module made FSDP), as a `RunConfig`
    says (parallel, activation_checkpointing, compile); `no_grad_models` (the teacher, and in distillation the
    EMA model) are sharded in place like the student under FSDP. Without a process group the mode is none."""
    mode = run.parallel if is_dist() else "none"
    if mode not in MODES:
        raise ValueError(f"--run.parallel={mode!r}: expected one of {', '.join(MODES)}")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    if mode != "none" and has_bn:
        if device.type == "cuda":  # BatchNorm in the head sees the global batch, as in the official DINO
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            no_grad_models = [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in no_grad_models]
        else:
            print0("note: --head.use_bn on CPU processes normalises with each process's own batch "
                   "(SyncBatchNorm needs GPUs); results depend on the process count")  # fmt: skip
    if run.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(student, check_fn=lambda m: isinstance(m, Block))
    if run.compile_step:
        for model in (student, *no_grad_models):
            model.compile(**compile_options(run))
    elif run.compile:
        for model in (student, *no_grad_models):
            for block in model.backbone.blocks:
                block.compile()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: the mask token is unused without iBOT masks, the prototypes while frozen
        return DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for model in (student, *no_grad_models):
            for block in model.backbone.blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(model.backbone, mp_policy=mp)  # its own unit: k-NN evaluation calls it alone
            fully_shard(model, mp_policy=mp)
        # The features are split views of one batch (cheap), and nothing writes into them in place, which is
        # what this warning is about (tests/test_parallel.py checks FSDP2's losses and weights against one
        # process): it is silenced rather than paid for with a copy of every crop's tokens.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return student


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are not wrapped: they are their own module)."""
    return model.module if hasattr(model, "module") and hasattr(model, "reducer") else model


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())


# Checkpoints hold full (unsharded) tensors keyed by parameter name, whatever wrote them: a run saved by FSDP
# on N processes resumes on M processes or in one, and the other way round. Gathering FSDP shards is a
# collective (every process calls these); the result lands on rank 0, which writes the file.


def full_state_dict(model: nn.Module) -> dict:
    """All weights, unsharded (on CPU under FSDP, where only rank 0 receives them)."""
    model = unwrap(model)
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _named_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) in the optimiser's order, the order of its integer state ids."""
    names = {p: n for n, p in unwrap(model).named_parameters()}
    return [(names[p], p) for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name (not position) with full tensors on CPU (FSDP shards gathered)."""
    out = {}
    for name, p in _named_params(model, optimizer):
        if p in optimizer.state:  # parameters that never had a gradient have no state yet
            out[name] = {
                k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() if torch.is_tensor(v) else v
                for k, v in optimizer.state[p].items()
            }
    return {"state": out}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load `optimizer_state_dict` output into this optimiser; under FSDP each process keeps its shards."""
    from torch.distributed.tensor import distribute_tensor

    def like(v, p):
        if torch.is_tensor(v) and hasattr(p, "device_mesh") and v.shape == p.shape:
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
        return v

    if any(not isinstance(k, str) for k in saved["state"]):
        raise ValueError("the checkpoint's optimiser state is keyed by position (minidino before DDP/FSDP "
                         "support): it cannot be resumed; its weights still load in eval.py")  # fmt: skip
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: like(v, p) for k, v in saved["state"][name].items()}
        for i, (name, p) in enumerate(_named_params(model, optimizer))
        if name in saved["state"]
    }
    optimizer.load_state_dict(sd)
