"""Where the time of one attention forward+backward goes: host (Python/launch) time against GPU kernel time.

    python benchmarks/attention_overhead.py     # GPU only; a JSON line per impl

For the ViT-S/16 global shape (128, 6, 197, 64) in bf16, per impl: `host_us`, the wall time per call of
forward+backward while the GPU queue is kept from draining (no synchronisation inside the loop: when the host
is slower than the GPU this is what a training step pays), and `gpu_kernel_us`, the summed CUDA kernel time
per call from torch.profiler. host_us far above gpu_kernel_us means the call is bound by launch overhead.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.attention import attention  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "attention_overhead", "skipped": "needs a CUDA GPU"}))
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.get_device_name()
    shape = (128, 6, 197, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    impls = {"triton": lambda q, k, v: attention(q, k, v, impl="triton"), "sdpa_cudnn": cudnn}
    for name, fn in impls.items():

        def step():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), go)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        host = (time.perf_counter() - t0) / n  # the host returned: the GPU may still be busy
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages()) / 10
        row = {"benchmark": "attention_overhead", "device": gpu, "impl": name, "shape": list(shape)}
        row.update(host_us=round(1e6 * host, 1), wall_us=round(1e6 * wall, 1))
        row.update(gpu_kernel_us=round(kernel_us, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
