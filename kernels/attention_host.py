"""The host side of the attention kernels (kernels/attention.py): what one call's sizes and memory layouts are,
how the three kernels are launched with their strides, and the torch.compile custom operators.

At ViT sizes one forward+backward is a few hundred microseconds of GPU work, about what Python spends
launching it, so this side is kept lean: strides are passed once per memory layout (q, k and v of a fused
projection share one set; dq, dk and dv are views of one buffer and share another), and the launches go
through `Launcher` (kernels/launch.py), which launches the compiled kernel of an earlier call of the same
kind directly. Under torch.compile the launches run inside two custom operators with fake (shape-only)
functions and a registered backward, so the compiler keeps the attention whole in its graph instead of
tracing this Python; eager calls use the autograd Function in attention.py (less host time per call).
"""

from __future__ import annotations

from typing import NamedTuple  # the custom operators' schemas are read from these annotations

import torch
from torch import Tensor

from .launch import INTERPRET, cdiv, next_power_of_2

try:
    import triton
except ImportError:
    triton = None

LOG2_E = 1.4426950408889634  # the kernels compute exp(x) as exp2(x * log2(e))
IMPLS = ("auto", "triton", "sdpa", "ref")  # attention's `impl`: auto runs Triton on CUDA, sdpa elsewhere
KERNELS = {}  # forward, backward dq, backward dk/dv launchers: set by attention.py (imports go one way)


def use_kernels(forward, backward_dq, backward_dkdv) -> None:
    """Called by attention.py with its kernels' launchers, so that this file needs no import of that one."""
    KERNELS.update(forward=forward, backward_dq=backward_dq, backward_dkdv=backward_dkdv)


class Sequences(NamedTuple):
    """The sequences of one attention call, and the buffers and layouts the kernels need: dense q
    (B, H, N, D), or packed q (T, H, D) whose sequences start at `cu_seqlens`."""

    count: int  # B, or the number of packed sequences
    heads: int
    longest: int  # N, or the longest packed sequence
    head_dim: int
    cu_seqlens: Tensor | None  # (count + 1,) int32 on q's device; None for dense inputs

    @classmethod
    def of(cls, q: Tensor, cu_seqlens: Tensor | None, max_seqlen: int) -> Sequences:
        if cu_seqlens is None:
            return cls(*q.shape, None)
        return cls(cu_seqlens.numel() - 1, q.shape[1], max_seqlen, q.shape[2], cu_seqlens)

    def strides(self, t: Tensor) -> tuple[int, int, int]:
        """(per sequence, per head, per token) element strides; packed sequences are found by token offset."""
        st = t.stride()  # one call: each stride(i) is a call into C++
        return st[:3] if self.cu_seqlens is None else (0, st[1], st[0])

    def lse_strides(self, lse: Tensor) -> tuple[int, int]:
        return lse.stride()[:2] if self.cu_seqlens is None else (0, lse.stride(0))

    def new_lse(self, q: Tensor) -> Tensor:
        """The log-sum-exp of every query row, fp32: (B, H, N) for dense q, (H, T) for packed q."""
        shape = q.shape[:3] if self.cu_seqlens is None else (q.shape[1], q.shape[0])
        return q.new_empty(shape, dtype=torch.float32)

    def new_tokens(self, like: Tensor) -> Tensor:
        """A buffer shaped like q, in the (B, N, H, D) memory layout (packed: (T, H, D)), so that
        'b h n d -> b n (h d)' after it is a free view."""
        if self.cu_seqlens is not None:
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        B, H, N, D = like.shape
        return like.new_empty(B, N, H, D).transpose(1, 2)

    def new_fused(self, q: Tensor) -> Tensor:
        """One buffer for three tensors shaped like q, laid out as a fused qkv projection's output:
        (B, N, 3, H, D) for q (B, H, N, D); packed: (T, 3, H, D) for q (T, H, D)."""
        if self.cu_seqlens is not None:
            return q.new_empty(q.shape[0], 3, *q.shape[1:])
        B, H, N, D = q.shape
        return q.new_empty(B, N, 3, H, D)

    def one_layout(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as they are if they share strides with d contiguous (views of one fused qkv always do),
        else copies into one layout: the kernels take one stride set for the three."""
        st = q.stride()
        if st[-1] != 1 or k.stride() != st or v.stride() != st:
            return tuple(self.new_tokens(t).copy_(t) for t in (q, k, v))
        return q, k, v

    def d_contiguous(self, do: Tensor) -> Tensor:
        """dout as it is when d is contiguous, else a copy (a broadcast gradient has stride 0 there too)."""
        return do if do.stride(-1) == 1 else self.new_tokens(do).copy_(do)

    def sizes_and_flags(self, q: Tensor) -> tuple[tuple[int, int, int, int], dict]:
        """(H, N, D, N_BUCKET) and the compile-time switches. fp32 inputs get exact fp32 products ("ieee",
        not TF32); 16-bit inputs multiply natively; both accumulate in fp32. The head dim is padded to a
        power of 2 (at least 16) on-chip; the longest sequence rounded up to a power of 2 keys the autotuner."""
        flags = dict(
            VARLEN=self.cu_seqlens is not None,
            BLOCK_D=max(16, next_power_of_2(self.head_dim)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        )
        return (self.heads, self.longest, self.head_dim, next_power_of_2(self.longest)), flags

    def grid(self, tile: str):
        """One program per tile of `tile` rows (BLOCK_M queries or BLOCK_N keys) of each (sequence, head)."""
        return lambda meta: (cdiv(self.longest, meta[tile]), self.count * self.heads)


def use_triton(q: Tensor, impl: str) -> bool:
    """Whether a call with `impl` runs the Triton kernels on q; a clear error where it was asked for and
    cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"attention: unknown impl {impl!r} (expected one of {', '.join(IMPLS)})")
    supported = q.shape[-1] <= 128 and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if impl != "triton":
        return impl == "auto" and triton is not None and q.is_cuda and supported
    if triton is None:
        raise RuntimeError("attention(impl='triton'): triton is not installed")
    if not supported:
        raise ValueError(
            f"attention(impl='triton'): head dim {q.shape[-1]} and dtype {q.dtype} not supported "
            "(head dim <= 128; fp32, fp16 or bf16)"
        )
    if not (q.is_cuda or INTERPRET):
        raise RuntimeError("attention(impl='triton'): needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    return True


def split_qkv(qkv: Tensor, packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as views of a fused (B, N, 3, H, D) tensor, (B, H, N, D) each; packed: of (T, 3, H, D)."""
    return qkv.unbind(1) if packed else qkv.permute(2, 0, 3, 1, 4).unbind(0)


def launch_forward(s: Sequences, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse): the forward kernel on q, k, v of one layout; out in the (B, N, H, D) memory layout, lse the
    log-sum-exp per row in log2 units."""
    o, lse = s.new_tokens(q), s.new_lse(q)
    sizes, flags = s.sizes_and_flags(q)
    cu = lse if s.cu_seqlens is None else s.cu_seqlens  # dense: not read (VARLEN off), any pointer will do
    scalars = (*s.strides(q), *s.strides(o), *s.lse_strides(lse), *sizes, s.head_dim**-0.5 * LOG2_E)
    KERNELS["forward"](s.grid("BLOCK_M"), (q, k, v, o, lse, cu), scalars, flags)
    return o, lse


def launch_backward(s: Sequences, do, q, k, v, o, lse, dq, dk, dv) -> None:
    """Writes dq, dk, dv (one layout among them) from dout (d contiguous) and what the forward kept."""
    cu = lse if s.cu_seqlens is None else s.cu_seqlens
    delta = torch.empty_like(lse)  # rowsum(dO * out), written by the dq kernel for the dk/dv kernel
    sizes, flags = s.sizes_and_flags(q)
    qkv, dout, grad = s.strides(q), s.strides(do), s.strides(dq)
    rest = (*s.lse_strides(lse), *sizes, s.head_dim**-0.5 * LOG2_E, s.head_dim**-0.5)
    KERNELS["backward_dq"](
        s.grid("BLOCK_M"),
        (q, k, v, o, do, dq, lse, delta, cu),
        (*qkv, *s.strides(o), *dout, *grad, *rest),
        flags,
    )
    KERNELS["backward_dkdv"](
        s.grid("BLOCK_N"), (q, k, v, do, dk, dv, lse, delta, cu), (*qkv, *dout, *grad, *rest), flags
    )


# ----------------------------------------------------------------------------------------------------------
# torch.compile: the kernels as custom operators. The compiler sees opaque operators with known output
# shapes (the fake functions) and a registered backward; attention.py's `_flash` calls them while compiling.

if triton is not None:

    @torch.library.custom_op("minidino::flash_attention", mutates_args=())
    def _flash_op(
        q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int
    ) -> tuple[Tensor, Tensor]:
        """(out, lse), as `launch_forward`; lse is kept for the backward, not differentiated."""
        seqs = Sequences.of(q, cu_seqlens, max_seqlen)
        return launch_forward(seqs, *seqs.one_layout(q, k, v))

    @_flash_op.register_fake
    def _(q, k, v, cu_seqlens, max_seqlen):
        seqs = Sequences.of(q, cu_seqlens, max_seqlen)
        return seqs.new_tokens(q), seqs.new_lse(q)

    @torch.library.custom_op("minidino::flash_attention_backward", mutates_args=())
    def _flash_backward_op(
        do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv); cu and n: cu_seqlens and the longest sequence, as for the forward."""
        seqs = Sequences.of(q, cu, n)
        q, k, v = seqs.one_layout(q, k, v)
        dq, dk, dv = (seqs.new_tokens(q) for _ in range(3))  # one layout for the three
        launch_backward(seqs, seqs.d_contiguous(do), q, k, v, o, lse, dq, dk, dv)
        return dq, dk, dv

    @_flash_backward_op.register_fake
    def _(do, q, k, v, o, lse, cu, n):
        seqs = Sequences.of(q, cu, n)
        return tuple(seqs.new_tokens(q) for _ in range(3))

    def _save_for_backward(ctx, inputs, output):
        q, k, v, cu_seqlens, ctx.max_seqlen = inputs
        ctx.save_for_backward(q, k, v, *output, cu_seqlens)

    def _op_backward(ctx, do, _dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        return *_flash_backward_op(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen), None, None

    _flash_op.register_autograd(_op_backward, setup_context=_save_for_backward)


def packed_offsets(lengths: list[int], device: torch.device | str) -> tuple[Tensor, int]:
    """cu_seqlens (int32, len(lengths) + 1) and the longest length, for `attention_varlen`."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    # non_blocking: a blocking copy to the GPU makes the host wait for all queued work (a stream sync); from
    # pageable memory the driver stages the bytes before returning, so the source may go away at once
    return cu.to(device, non_blocking=True), max(lengths)
