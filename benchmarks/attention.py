"""Attention speed: the Triton kernels (kernels/attention.py) against every SDPA backend and the reference.

    python benchmarks/attention.py          # on a GPU, bf16: every shape below, a JSON line per (shape, impl)
    python benchmarks/attention.py --quick  # fewer repeats; on CPU only sdpa and ref run, on tiny shapes
    python benchmarks/attention.py --graphs # also fwd+bwd replayed from a CUDA graph (GPU)

Shapes (B, H, N, D): ViT-S/16 global crops (128, 6, 197, 64), local crops (640, 6, 37, 64), ViT-L/14
global (64, 16, 257, 64), ViT-B/14 at 518 px (16, 12, 1370, 64). Then a packed DINO step: 64 images, each with
2 global (197 tokens) and 10 local (37 tokens) crops, H=6, D=64: one packed Triton launch against SDPA called
once per resolution. FLOPs: 4 B H N^2 D forward; forward+backward counted as 3.5x that (backward 2.5x).
Times are medians over repeats of a CUDA-event-timed loop; every impl runs in the same process, so compare
ratios within one run. `fwd_bwd_gpu_ms` is the summed GPU kernel time per call (torch.profiler), which
leaves out the host's share; `fwd_bwd_graph_ms` (with --graphs) is the wall time of the same call captured
once in a CUDA graph and replayed, which takes the host's share out of the wall time for every impl alike.
The last lines summarise Triton's fwd+bwd speed-up over the best SDPA backend, in wall time, in GPU kernel
time and, with --graphs, replayed from graphs.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from minidino.kernels.attention import attention, attention_ref, attention_varlen, packed_offsets

SHAPES = {
    "vit_s16_global": (128, 6, 197, 64),
    "vit_s16_local": (640, 6, 37, 64),
    "vit_l14_global": (64, 16, 257, 64),
    "vit_b14_518px": (16, 12, 1370, 64),
}


def flops(batch: int, heads: int, n: int, d: int, backward: bool = False) -> float:
    """Matrix-product FLOPs of attention: 4 B H N^2 D forward (q k^T and p v); backward counted as 2.5x."""
    fwd = 4.0 * batch * heads * n * n * d
    return fwd * (3.5 if backward else 1.0)


def sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_math": SDPBackend.MATH,
    }


def timed_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds per call of fn(); each sample times a loop of calls to amortise launch gaps."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(1000 * (time.perf_counter() - t0))
        return sorted(samples)[len(samples) // 2]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    inner = max(1, min(50, int(0.02 / max(time.perf_counter() - t0, 1e-6))))  # ~20 ms per sample
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return sorted(samples)[len(samples) // 2]


def impls(device: torch.device) -> dict[str, object]:
    """name -> f(q, k, v) on (B, H, N, D); SDPA backends forced one at a time."""
    from torch.nn.attention import sdpa_kernel

    out = {}
    if device.type == "cuda":
        out["triton"] = lambda q, k, v: attention(q, k, v, impl="triton")
        for name, backend in sdpa_backends().items():

            def run(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)

            out[name] = run
    else:
        out["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    out["ref"] = attention_ref
    return out


def gpu_ms(fn, calls: int = 10) -> float:
    """Summed CUDA kernel time per call of fn() (torch.profiler): the GPU work alone, without the host's
    share. Where the host is slower than the GPU, timed_ms measures the host and this number still
    compares the kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1000


def graphed_ms(fn, repeats: int, device: torch.device) -> float | str:
    """Milliseconds per call of fn() captured once in a CUDA graph and replayed: the host's share (Python,
    launches) is gone, so this is the wall time the kernels need back to back. An error message instead
    where capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream (compiles, autotunes, fills caches)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        return str(e).splitlines()[0][:200]
    ms = timed_ms(graph.replay, repeats, device)
    del graph
    torch.cuda.empty_cache()
    return ms


def measure(
    fn, inputs, repeats, device, graphs=False
) -> tuple[float, float, float | None, float | str | None]:
    """(forward ms, forward+backward ms, forward+backward GPU kernel ms or None on CPU, forward+backward ms
    replayed from a CUDA graph or None) of fn(*inputs) with a fixed output gradient. The backward returns
    the input gradients (autograd.grad) rather than adding them into .grad, which would time an extra
    elementwise add per input whose cost depends on the gradient's memory layout, not on attention."""
    with torch.no_grad():
        fwd = timed_ms(lambda: fn(*inputs), repeats, device)
    go = torch.randn_like(fn(*inputs))
    step = lambda: torch.autograd.grad(fn(*inputs), inputs, go)  # noqa: E731
    cuda = device.type == "cuda"
    fb, fb_gpu = timed_ms(step, repeats, device), gpu_ms(step) if cuda else None
    return fwd, fb, fb_gpu, graphed_ms(step, repeats, device) if graphs and cuda else None


def max_error(fn, inputs, cu_seqlens=None) -> float:
    """Largest |difference| to the fp32 reference over the output and the three input gradients;
    cu_seqlens for packed (T, H, D) inputs."""
    out = fn(*inputs)
    go = torch.randn_like(out)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref = attention_ref(*ref_inputs) if out.dim() == 4 else None
    if ref is None:  # packed (T, H, D): compare with the per-length-group reference
        from minidino.kernels.attention import attention_varlen_torch

        ref = attention_varlen_torch(*ref_inputs, cu_seqlens, impl="ref")
    got = [out, *torch.autograd.grad(out, inputs, go)]
    want = [ref, *torch.autograd.grad(ref, ref_inputs, go.float())]
    return max((a.float() - b).abs().max().item() for a, b in zip(got, want))


class Rows:
    """Prints the JSON lines of one run and keeps what the summary compares."""

    def __init__(self, gpu: str, dtype: torch.dtype):
        self.gpu, self.dtype, self.summary = gpu, str(dtype).split(".")[1], {}

    def error(self, shape: str, impl: str, e: Exception) -> None:  # a backend that refuses a shape or dtype
        row = {"benchmark": "attention", "device": self.gpu, "shape": shape, "impl": impl}
        print(json.dumps({**row, "error": str(e).splitlines()[0][:200]}), flush=True)

    def timing(self, shape, impl, sizes: dict, times: tuple, total_flops: float, **extra) -> None:
        fwd, fb, fb_gpu, fb_graph = times
        row = {
            "benchmark": "attention",
            "device": self.gpu,
            "dtype": self.dtype,
            "shape": shape,
            "impl": impl,
        }
        row |= sizes | {"fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fb, 4)}
        row |= {
            "fwd_tflops": round(total_flops / fwd / 1e9, 1),
            "fwd_bwd_tflops": round(3.5 * total_flops / fb / 1e9, 1),
        }
        row["fwd_bwd_gpu_ms"] = None if fb_gpu is None else round(fb_gpu, 4)
        if fb_graph is not None:
            row["fwd_bwd_graph_ms"] = fb_graph if isinstance(fb_graph, str) else round(fb_graph, 4)
        print(json.dumps(row | extra), flush=True)
        self.summary.setdefault(shape, {})[impl] = (
            fb,
            fb_gpu,
            fb_graph if isinstance(fb_graph, float) else None,
        )

    def print_summary(self) -> None:
        """Triton's fwd+bwd speed-up over the best SDPA backend: wall, GPU kernel and CUDA-graph time."""
        for shape, times in self.summary.items():
            sdpa = {k: v for k, v in times.items() if k.startswith("sdpa")}
            ours = times.get("triton_packed", times.get("triton"))
            if not (sdpa and ours):
                continue
            best = min(sdpa, key=lambda k: sdpa[k][0])
            row = {"benchmark": "attention_summary", "device": self.gpu, "shape": shape, "best_sdpa": best}
            row |= {"best_sdpa_fwd_bwd_ms": round(sdpa[best][0], 4), "triton_fwd_bwd_ms": round(ours[0], 4)}
            row["speedup_fwd_bwd"] = round(sdpa[best][0] / ours[0], 3)
            for i, what in ((1, "gpu_time"), (2, "graph")):  # the best SDPA by each measure
                timed = {k: v[i] for k, v in sdpa.items() if v[i] is not None}
                if ours[i] is not None and timed:
                    best_k = min(timed, key=timed.get)
                    row |= {
                        f"best_sdpa_{what}": best_k,
                        f"speedup_fwd_bwd_{what}": round(timed[best_k] / ours[i], 3),
                    }
            print(json.dumps(row), flush=True)


def per_resolution(fn, split: int, n_global: int, n_local: int):
    """The usual multi-crop path: one call per resolution on (B, H, n, D) views of the packed tokens."""

    def run(q, k, v):
        outs = []
        for lo, hi, n in ((0, split, n_global), (split, q.shape[0], n_local)):
            views = [t[lo:hi].unflatten(0, (-1, n)).transpose(1, 2) for t in (q, k, v)]  # (B, H, n, D)
            outs.append(fn(*views).transpose(1, 2).flatten(0, 1))  # (B * n, H, D)
        return torch.cat(outs)

    return run


def main(argv: list[str]) -> None:
    quick, graphs = "--quick" in argv, "--graphs" in argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = 5 if quick or not cuda else 15
    shapes = SHAPES if cuda else {"tiny_global": (4, 2, 65, 32), "tiny_local": (16, 2, 17, 32)}
    rows = Rows(torch.cuda.get_device_name() if cuda else "cpu", dtype)

    for name, (B, H, N, D) in shapes.items():
        qkv = [torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        for impl, fn in impls(device).items():
            try:
                times = measure(fn, qkv, repeats, device, graphs)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                rows.error(name, impl, e)
                continue
            err = {"max_err": round(max_error(fn, qkv), 5)} if impl == "triton" else {}
            rows.timing(name, impl, dict(B=B, H=H, N=N, D=D), times, flops(B, H, N, D), **err)

    # a packed DINO step: 2 global + 10 local crops of 64 images (CPU: 4 images, short sequences)
    images, (n_global, n_local), H, D = (64, (197, 37), 6, 64) if cuda else (4, (65, 17), 2, 32)
    lengths = [n_global] * (2 * images) + [n_local] * (10 * images)
    q, k, v = (
        torch.randn(sum(lengths), H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    cu, longest = packed_offsets(lengths, device)
    split = 2 * images * n_global
    candidates = {
        n: per_resolution(fn, split, n_global, n_local) for n, fn in impls(device).items() if n != "ref"
    }
    if cuda:
        candidates["triton_packed"] = lambda q, k, v: attention_varlen(q, k, v, cu, longest, impl="triton")
    sizes = dict(B=images, H=H, N=f"2x{n_global}+10x{n_local}", D=D)
    for impl, fn in candidates.items():
        try:
            times = measure(fn, (q, k, v), repeats, device, graphs)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            rows.error("dino_step_packed", impl, e)
            continue
        err = {"max_err": round(max_error(fn, (q, k, v), cu), 5)} if impl == "triton_packed" else {}
        total = sum(4.0 * H * n * n * D for n in lengths)
        rows.timing(
            "dino_step_packed", impl, sizes, times, total, per_resolution=impl != "triton_packed", **err
        )
    rows.print_summary()


if __name__ == "__main__":
    main(sys.argv[1:])
