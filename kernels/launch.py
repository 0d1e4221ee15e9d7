"""Launching Triton kernels with little host time per call (used by kernels/attention.py), whether Triton
runs in its CPU interpreter, and the two grid-size helpers both kernel files use.

At ViT sizes a fused kernel can finish on the GPU in less time than Python takes to launch it; then the GPU
waits for the host, and a kernel that is faster on the GPU loses end to end. `Launcher` removes most of the
per-launch Python after the first call of each kind.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run as Python on the CPU (tests)


# Host-side sizes in plain Python: triton.cdiv and triton.next_power_of_2 go through Triton's JIT-function
# call machinery, several microseconds of host time per call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Launcher:
    """Calls kernel[grid](*tensors, *scalars, **constexprs) with little host time once a call of the same
    kind was made.

    Triton's front end inspects every argument on every launch (type, integer divisibility, pointer
    alignment) to pick the compiled variant, and the autotuner adds its own pass over the arguments. At ViT
    sizes this host time, tens to hundreds of microseconds per launch depending on the CPU, can exceed the
    kernel's GPU time, and then the GPU waits for Python. So the first call for a key (exact integer
    arguments, dtypes, pointer alignment mod 128: everything Triton specialises on, and more) goes the usual
    way, compiling and autotuning as needed; we keep the compiled kernel it returns and launch that directly
    for later calls with the same key. Tensors and scalars come apart so that the key is cheap to build: the
    scalars as one tuple, the tensors by dtype, device type and alignment.

    Direct launches pass each tensor as its address (an int). Given a tensor, Triton's C launcher calls its
    data_ptr() and then asks the CUDA driver (cuPointerGetAttribute) whether the address is device memory,
    for every pointer argument of every launch: two dozen driver calls per attention forward+backward.
    The first call of a kind made that check with the usual path, and the key keeps CPU tensors from ever
    matching a CUDA kind; the dispatchers check that all tensors sit on one device. The interpreter always
    goes the usual way."""

    def __init__(self, kernel):
        self.kernel, self.cache, self.direct = kernel, {}, not INTERPRET
        self.hits = 0  # direct launches so far (the GPU test checks that this path ran)

    def __call__(self, grid, tensors: tuple, scalars: tuple, constexprs: dict) -> None:
        """kernel[grid](*tensors, *scalars, **constexprs): the kernel's arguments in that order."""
        if not self.direct:
            self.kernel[grid](*tensors, *scalars, **constexprs)
            return
        pointers = [t.data_ptr() for t in tensors]
        key = (torch.cuda.current_device(), scalars, *constexprs.values())
        key += tuple([(t.dtype, t.is_cuda, p % 128) for t, p in zip(tensors, pointers)])
        hit = self.cache.get(key)
        if hit is None:
            compiled = self.kernel[grid](*tensors, *scalars, **constexprs)
            try:  # the autotuner's pick for this key (tile sizes) completes the argument list
                meta = {**constexprs, **self.kernel.best_config.kwargs}
                n_args = len(tensors) + len(scalars)
                self.cache[key] = compiled, meta, [meta[n] for n in self.kernel.arg_names[n_args:]]
            except (AttributeError, KeyError, TypeError):  # other Triton internals: keep to the usual path
                self.direct = False
            return
        compiled, meta, tail = hit
        # the grid is worked out anew: it also counts sequences, which no argument of the key does; the launch
        # goes on the current stream, as Triton's own
        compiled[(*grid(meta), 1, 1)[:3]](*pointers, *scalars, *tail)
        self.hits += 1
