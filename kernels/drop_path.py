"""Efficient stochastic depth: the residual update of the kept samples, fused in one Triton kernel.

DINOv2 (arXiv 2304.07193, Sec. 5, "efficient stochastic depth") trains with drop rates of 0.3-0.4. Instead of
running a block's branch (attention or MLP) on the whole batch and multiplying the dropped samples by zero, it
runs the branch on the kept samples only and adds the result back:

    out = x;  out[kept] += scale * gamma * y,    y = branch(x[kept]),  scale = B / B_kept

so the expected update equals the branch's output (unbiased, as with the classic 1 / (1 - p) rescale) and a
share p of the branch compute is skipped. `drop_add` is that update; forward and backward are Triton kernels:

  forward   one program per (sample b, tile of BLOCK_N tokens x all C channels): reads x's tile and, when
            b is kept, y's tile of that sample and gamma; writes out's tile. x, y, out cross memory once each.
  backward  grad_x = grad_out (passed through, no copy); one program per (kept sample j, token tile) reads
            grad_out[kept[j]] and y[j], writes grad_y = scale * gamma * grad_out[kept[j]] and the tile's
            partial sum over tokens of scale * grad_out * y; the partials (n_tiles, C) sum to grad_gamma.
Everything accumulates in fp32 and is stored in the input dtype.

`drop_add_ref` is the same operation in plain PyTorch (index_add); `drop_add(..., impl="auto")` uses Triton on
CUDA and the reference elsewhere. Tests run the kernels on CPU through TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .launch import INTERPRET, cdiv, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference still works
    triton = None


def drop_add_ref(x: Tensor, y: Tensor, kept: Tensor, scale: float, gamma: Tensor | None = None) -> Tensor:
    """x (B, N, C), y (B_kept, N, C) for the samples `kept` (B_kept,) -> x with x[kept] += scale*gamma*y."""
    update = y * gamma.to(x.dtype) if gamma is not None else y  # a bf16 stream stays bf16 (fp32: unchanged)
    return torch.index_add(x, 0, kept, update.to(x.dtype), alpha=scale)


if triton is not None:

    @triton.jit
    def _drop_add_fwd(
        x_ptr,
        y_ptr,
        g_ptr,
        src_ptr,
        out_ptr,
        N,
        C,
        scale,
        HAS_GAMMA: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        b = tl.program_id(0)  # sample
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]  # (BLOCK_N, 1) token indices
        c = tl.arange(0, BLOCK_C)[None, :]  # (1, BLOCK_C) channel indices
        mask = (n < N) & (c < C)
        offs = n * C + c  # within one sample's (N, C) slab
        x = tl.load(x_ptr + b * N * C + offs, mask=mask)
        src = tl.load(src_ptr + b)  # row of y holding this sample's branch output, or -1 if dropped
        acc = x.to(tl.float32)
        if src >= 0:
            y = tl.load(y_ptr + src * N * C + offs, mask=mask).to(tl.float32)
            if HAS_GAMMA:
                y = y * tl.load(g_ptr + c, mask=c < C).to(tl.float32)
            acc = acc + scale * y
        tl.store(out_ptr + b * N * C + offs, acc.to(x.dtype), mask=mask)

    @triton.jit
    def _drop_add_bwd(
        go_ptr,
        y_ptr,
        g_ptr,
        kept_ptr,
        gy_ptr,
        gg_ptr,
        N,
        C,
        scale,
        HAS_GAMMA: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        j = tl.program_id(0)  # kept sample index into y
        tile = tl.program_id(1)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        mask = (n < N) & (c < C)
        offs = n * C + c
        b = tl.load(kept_ptr + j)  # which sample of the batch
        go = tl.load(go_ptr + b * N * C + offs, mask=mask).to(tl.float32)
        if HAS_GAMMA:
            g = tl.load(g_ptr + c, mask=c < C).to(tl.float32)
            gy = scale * g * go
            y = tl.load(y_ptr + j * N * C + offs, mask=mask).to(tl.float32)
            part = tl.sum(scale * go * y, axis=0)  # (BLOCK_C,): this tile's share of grad_gamma
            row = j * tl.num_programs(1) + tile
            tl.store(gg_ptr + row * C + tl.arange(0, BLOCK_C), part, mask=tl.arange(0, BLOCK_C) < C)
        else:
            gy = scale * go
        tl.store(gy_ptr + j * N * C + offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)


def _tiles(N: int, C: int) -> tuple[int, int]:
    """BLOCK_C covers all channels (next power of 2); BLOCK_N keeps a tile near 4k elements."""
    block_c = next_power_of_2(C)
    return max(1, min(next_power_of_2(N), 4096 // block_c)), block_c


class _DropAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, kept, scale, gamma):
        x, y = x.contiguous(), y.contiguous()
        B, N, C = x.shape
        src = torch.full((B,), -1, dtype=torch.int64, device=x.device)
        src[kept] = torch.arange(kept.numel(), device=x.device)
        out = torch.empty_like(x)
        block_n, block_c = _tiles(N, C)
        g = gamma if gamma is not None else x  # a dummy pointer when there is no gamma
        _drop_add_fwd[(B, cdiv(N, block_n))](
            x, y, g, src, out, N, C, scale, HAS_GAMMA=gamma is not None, BLOCK_N=block_n, BLOCK_C=block_c
        )
        ctx.save_for_backward(y, kept, gamma if gamma is not None else torch.empty(0, device=x.device))
        ctx.scale, ctx.has_gamma = scale, gamma is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, kept, gamma = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        _, N, C = grad_out.shape
        block_n, block_c = _tiles(N, C)
        n_tiles = cdiv(N, block_n)
        grad_y = torch.empty_like(y)
        partial = torch.empty(kept.numel() * n_tiles, C, dtype=torch.float32, device=y.device)
        g = gamma if ctx.has_gamma else y
        _drop_add_bwd[(kept.numel(), n_tiles)](
            grad_out,
            y,
            g,
            kept,
            grad_y,
            partial,
            N,
            C,
            ctx.scale,
            HAS_GAMMA=ctx.has_gamma,
            BLOCK_N=block_n,
            BLOCK_C=block_c,
        )
        grad_gamma = partial.sum(0).to(gamma.dtype) if ctx.has_gamma else None
        return grad_out, grad_y, None, None, grad_gamma


def drop_add(
    x: Tensor, y: Tensor, kept: Tensor, scale: float, gamma: Tensor | None = None, impl: str = "auto"
) -> Tensor:
    """x[kept] += scale * gamma * y, out of place; impl: auto (Triton on CUDA, else ref), triton, ref."""
    if impl == "auto":
        use_triton = triton is not None and (x.is_cuda or INTERPRET)
    elif impl == "triton":
        if triton is None:
            raise RuntimeError("drop_add(impl='triton'): triton is not installed")
        use_triton = True
    elif impl == "ref":
        use_triton = False
    else:
        raise ValueError(f"drop_add: unknown impl {impl!r} (expected auto, triton or ref)")
    if not use_triton:
        return drop_add_ref(x, y, kept, scale, gamma)
    return _DropAdd.apply(x, y, kept, float(scale), gamma)
