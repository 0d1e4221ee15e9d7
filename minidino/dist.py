"""Distributed helpers. Everything works without a process group: rank 0 of a world of 1."""

from __future__ import annotations

import torch.distributed as dist


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
