"""Where the time of one attention call goes: host (Python + launch) time against GPU kernel time.

    python benchmarks/attention_overhead.py          # on a GPU: a JSON line per (shape, impl)
    python benchmarks/attention_overhead.py --stub   # the host side alone, launches stubbed (any machine)

For ViT-S/16 global (128, 6, 197, 64), ViT-L/14 global (64, 16, 257, 64) and ViT-S/16 local (640, 6, 37, 64)
crops in bf16, forward+backward (`fb_*`, autograd.grad with a fixed output gradient) and forward only
(`f_*`, no grad), per impl:
  host_us    wall time per call while the GPU queue is kept from draining (no synchronisation inside the
             loop; the least of 5 rounds): what a training step pays when the host is slower than the GPU;
  ms         the usual timing (`timed_ms` of benchmarks/attention.py: CUDA events around loops of calls);
  kernel_us  summed CUDA kernel time per call from torch.profiler (`gpu_ms`): the GPU work alone.
host_us far above kernel_us means the call is bound by launch overhead, and `ms` then measures the host.
Per shape, one more line (`attention_host_profile`) lists the functions where the Triton call spends its
host time (cProfile, microseconds of own time per forward+backward).
Compare ratios within one run: the host side is noisy on shared machines.

Without a GPU (`--stub`, the default there) it measures what it can of the host side on the CPU: the
Python of the Triton autograd.Function per forward+backward (q, k, v apart, and one fused qkv), with every
kernel launch replaced by a no-op stand-in for the compiled kernel (the launcher's bookkeeping still runs),
on tiny tensors, against an autograd.Function that does nothing (the floor any Python wrapper pays).
Triton's own launch code is left out, so this tracks the wrapper, not the whole call.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from attention import gpu_ms, timed_ms  # benchmarks/attention.py, next to this script

from minidino.kernels.attention import attention

SHAPES = {
    "vit_s16_global": (128, 6, 197, 64),
    "vit_l14_global": (64, 16, 257, 64),
    "vit_s16_local": (640, 6, 37, 64),
}


def measure(step) -> dict:
    """Host time per call (no synchronisation inside the loop; the least of 5 rounds of 50 calls, each after
    a garbage collection and with the GPU queue empty, since a shared host's noise only ever adds), the usual
    CUDA-event timing and the summed GPU kernel time, for one callable."""
    for _ in range(5):  # compiles and autotunes on the first call
        step()
    rounds = []
    for _ in range(5):
        gc.collect()
        torch.cuda.synchronize()
        n, t0 = 50, time.perf_counter()
        for _ in range(n):
            step()
        rounds.append((time.perf_counter() - t0) / n)  # the host returned: the GPU may still be busy
    torch.cuda.synchronize()
    device = torch.device("cuda")
    return {
        "host_us": round(1e6 * min(rounds), 1),
        "ms": round(timed_ms(step, 7, device), 4),
        "kernel_us": round(1000 * gpu_ms(step), 1),
    }


def host_profile(step, calls: int = 200) -> list:
    """cProfile of `calls` calls: the 12 functions with the most own time, in microseconds per call (the
    profiler's own cost inflates them all; the shares are what to read)."""
    import cProfile
    import pstats

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.runcall(lambda: [step() for _ in range(calls)])
    torch.cuda.synchronize()
    stats = pstats.Stats(
        prof
    ).stats  # (file, line, name) -> (calls, primitive calls, own s, total s, callers)
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    where = lambda f: f"{os.path.basename(f[0])}:{f[1]}({f[2]})"  # noqa: E731
    return [[where(f), round(1e6 * st[2] / calls, 1)] for f, st in top]


class _Nothing(torch.autograd.Function):
    """The floor: an autograd.Function whose forward and backward only allocate."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, g):
        return g, g, g


def stubbed_host_us() -> dict:
    """Host microseconds per forward+backward of the Triton wrapper, launches stubbed out (CPU, tiny)."""
    import triton

    from minidino.kernels import attention as A
    from minidino.kernels.attention_host import KERNELS  # the launchers attention.py handed over

    class Compiled:  # launching it does nothing
        def __getitem__(self, grid):
            return lambda *args: None

    for launcher in KERNELS.values():
        names = launcher.kernel.arg_names

        class Kernel:  # what the launcher reads from Triton's autotuned kernel
            arg_names = names
            best_config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})

            def __getitem__(self, grid):
                return lambda *args, **constexprs: Compiled()

        launcher.kernel, launcher.direct = Kernel(), True
    torch.cuda.current_device = lambda: 0  # the launcher's key asks for it
    qkv = torch.randn(2, 5, 3, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in qkv.unbind(2))
    go = torch.randn_like(q)
    calls = {
        "nothing": lambda: torch.autograd.grad(_Nothing.apply(q, k, v), (q, k, v), go),
        "triton": lambda: torch.autograd.grad(A._FlashAttention.apply(q, k, v, None, None), (q, k, v), go),
        "triton_qkv": lambda: torch.autograd.grad(
            A._FlashAttention.apply(qkv, None, None, None, None), qkv, go
        ),
    }
    best = {}
    for _ in range(7):  # rounds; the minimum is the least disturbed
        for name, fn in calls.items():
            for _ in range(100):
                fn()
            n, t0 = 2000, time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best.get(name, float("inf")), 1e6 * (time.perf_counter() - t0) / n)
    row = {f"fb_host_us_{name}": round(us, 1) for name, us in best.items()}
    return {**row, "stubbed_launches": sum(launcher.hits for launcher in KERNELS.values())}


def main(argv: list[str]) -> None:
    if "--stub" in argv or not torch.cuda.is_available():
        row = {
            "benchmark": "attention_overhead",
            "device": "cpu (launches stubbed)",
            "shape": "(2, 2, 5, 64)",
        }
        print(json.dumps({**row, **stubbed_host_us()}), flush=True)
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    impls = {
        "triton": lambda q, k, v: attention(q, k, v, impl="triton"),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    gpu = torch.cuda.get_device_name()
    for shape_name, shape in SHAPES.items():
        q, k, v = (
            torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        go = torch.randn_like(q)
        for name, fn in impls.items():
            row = {"benchmark": "attention_overhead", "device": gpu, "shape": shape_name, "impl": name}
            try:
                fb = measure(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), go))
                with torch.no_grad():
                    f = measure(lambda: fn(q, k, v))
            except RuntimeError as e:  # a backend that refuses this shape
                print(json.dumps({**row, "error": str(e).splitlines()[0][:200]}), flush=True)
                continue
            row.update({f"fb_{key}": val for key, val in fb.items()})
            row.update({f"f_{key}": val for key, val in f.items()})
            print(json.dumps(row), flush=True)
        # where the Triton call's host time goes, function by function
        top = host_profile(lambda: torch.autograd.grad(impls["triton"](q, k, v), (q, k, v), go))
        print(
            json.dumps(
                {
                    "benchmark": "attention_host_profile",
                    "device": gpu,
                    "shape": shape_name,
                    "impl": "triton",
                    "fb_top_own_us": top,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
