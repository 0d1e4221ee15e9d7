"""Efficient stochastic depth: time and peak memory of the fused update and of whole ViT blocks.

    python benchmarks/drop_path.py                  # on a GPU: everything below, one JSON line per setting
    python benchmarks/drop_path.py --quick          # smaller batch and fewer repeats (also runs on CPU)

1. the update alone, x[kept] += scale * gamma * y: Triton kernel vs the PyTorch reference (index_add), forward
   and forward+backward, ViT-S (N=197, C=384) and ViT-L (N=257, C=1024) shapes at p = 0.4;
2. a ViT-S and a ViT-L block, forward+backward in bf16 autocast, at p = 0.1, 0.2, 0.3, 0.4 for each
   drop_path_impl (mask, subset, subset_triton), with the speed-up over `mask` in the same run.
On CPU the Triton rows are skipped (the dispatcher would fall back to the reference); the rest still runs.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from minidino.config import ModelConfig
from minidino.kernels.drop_path import drop_add
from minidino.vit import ARCHS, Block


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """(median ms, peak MiB on CUDA else None) of fn() over `repeats` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def update_rows(shapes: dict, device, dtype, repeats: int, gpu: str) -> None:
    """1. the fused update alone, x[kept] += scale * gamma * y at p = 0.4: Triton against the reference."""
    for arch, (B, N) in shapes.items():
        C = ARCHS[arch][0]
        n_keep = round(0.6 * B)
        x = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
        y = torch.randn(n_keep, N, C, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
        kept = torch.randperm(B, device=device)[:n_keep]
        row = {}
        for impl in ["ref", "triton"] if device.type == "cuda" else ["ref"]:
            fwd, _ = timed(lambda: drop_add(x, y, kept, B / n_keep, g, impl), repeats, device)

            def fwd_bwd():
                drop_add(x, y, kept, B / n_keep, g, impl).float().sum().backward()

            fb, peak = timed(fwd_bwd, repeats, device)
            row[impl] = fb
            line = {"benchmark": "drop_add", "device": gpu, "arch": arch, "B": B, "N": N, "C": C, "p": 0.4}
            line |= {
                "impl": impl,
                "fwd_ms": round(fwd, 4),
                "fwd_bwd_ms": round(fb, 4),
                "peak_mib": peak and round(peak, 1),
            }
            print(json.dumps(line))
        if "triton" in row:
            speedup = round(row["ref"] / row["triton"], 3)
            print(
                json.dumps(
                    {
                        "benchmark": "drop_add_speedup",
                        "device": gpu,
                        "arch": arch,
                        "triton_vs_ref_fwd_bwd": speedup,
                    }
                )
            )


def block_rows(shapes: dict, device, impls: list[str], repeats: int, gpu: str) -> None:
    """2. whole blocks, forward+backward in bf16 autocast (GPU), for each drop_path_impl and rate."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for arch, (B, N) in shapes.items():
        dim, _, heads = ARCHS[arch]
        x = torch.randn(B, N, dim, device=device, requires_grad=True)
        for p in (0.1, 0.2, 0.3, 0.4):
            base = None
            for impl in impls:
                torch.manual_seed(0)
                blk = (
                    Block(dim, heads, p, ModelConfig(layerscale=1e-5, drop_path_impl=impl)).to(device).train()
                )

                def step():
                    with autocast:
                        out = blk(x)
                    out.float().sum().backward()

                ms, peak = timed(step, repeats, device)
                base = base or ms
                row = {
                    "benchmark": "block",
                    "device": gpu,
                    "arch": arch,
                    "B": B,
                    "N": N,
                    "p": p,
                    "impl": impl,
                }
                row |= {"fwd_bwd_ms": round(ms, 3), "peak_mib": peak and round(peak, 1)}
                print(json.dumps(row | {"speedup_vs_mask": round(base / ms, 3)}))


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    impls = ["mask", "subset"] + (["subset_triton"] if device.type == "cuda" else [])
    repeats = 5 if quick else 30
    shapes = {"vit_small": (16 if quick else 128, 197), "vit_large": (4 if quick else 64, 257)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    update_rows(shapes, device, dtype, repeats, gpu)
    block_rows(shapes, device, impls, repeats, gpu)


if __name__ == "__main__":
    main(sys.argv[1:])
