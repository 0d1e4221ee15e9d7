"""Distributed helpers. Everything works without a process group: rank 0 of a world of 1.

`torchrun --nproc_per_node=N train.py ...` sets RANK, LOCAL_RANK and WORLD_SIZE; `init_distributed` reads
them, starts the process group (NCCL on GPUs, Gloo on CPUs) and picks this process's GPU. Nothing here is
stored in module-level globals: the process group itself is the state, and `rank()` / `world_size()` ask it.

Layer: the run (README, "Read the code").
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from .config import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("option --run.device=cuda: no CUDA device is available")
    return torch.device(name)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (the other ranks stay quiet)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device) -> torch.device:
    """Start the process group when launched by torchrun; returns the device this process should use.

    CUDA: one GPU per process (cuda:LOCAL_RANK), NCCL. CPU: Gloo. A plain `python train.py` returns `device`.
    """
    if device.type == "cuda":  # TF32 matrix products for fp32 work (the step itself runs in bf16)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not launched_by_torchrun() or is_dist():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, timeout=datetime.timedelta(minutes=30), device_id=device if device.type == "cuda" else None
    )
    return device


def cleanup() -> None:
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker() -> None:
    """End a torchrun worker at once, after `cleanup()`, without the interpreter's shutdown.

    Under FSDP2, the device mesh (still referenced, from DTensor's caches among others) keeps the destroyed
    process group and its Gloo worker threads alive until the interpreter shuts down. A worker thread that
    then drops the last reference to a finished collective's tensors needs the GIL, is ended by the shutdown
    inside C++ code, and aborts the process ("terminate called without an active exception", SIGABRT: twice
    in about 150 CPU runs of the FSDP test in tests/test_parallel.py), which torchrun reports as a failed
    job. Everything is saved and the group destroyed by then: nothing is left to run.
    """
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor (a copy; the input is untouched). For logging and metrics."""
    if not is_dist():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world_size()


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """Whether a 0-d bool tensor is True on every process, as a tensor on its device (the host does not wait)."""
    if not is_dist():
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0 (rank order)."""
    if not is_dist():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) parameter or gradient; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class _GatherRows(torch.autograd.Function):
    """all_gather_cat with a gradient: forward, every process's rows in rank order; backward, the gradients of
    all processes for this process's rows, summed (an all-reduce, which every backend has)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = slice(rank() * t.shape[0], (rank() + 1) * t.shape[0])
        return all_gather_cat(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, ...) per process -> (world * n, ...) in rank order, differentiable: a loss term of one process
    that reads another process's rows sends its gradient back there (KoLeo over a group that spans
    processes). DDP and FSDP then average the parameter gradients over processes as for any loss."""
    return _GatherRows.apply(t) if is_dist() else t
