"""Flash-style attention in Triton: forward and backward, dense (B, H, N, D) or packed crops of mixed lengths.

Attention is softmax(q k^T / sqrt(D)) v. Written out (`attention_ref`), it materialises the (N, N) score
matrix per head in device memory, writes it, reads it back for the softmax and again for the product with v:
little work per byte, so the GPU waits on memory. The kernels never store the scores (Dao et al. 2022,
FlashAttention, arXiv 2205.14135; the loop order of FlashAttention-2, arXiv 2307.08691). In file order:

  1. the references in plain PyTorch;
  2. the forward kernel: one program per (tile of BLOCK_M queries, sequence, head). Its q tile stays in
     registers; it walks over the keys in tiles of BLOCK_N, computes each (BLOCK_M, BLOCK_N) block of scores
     on-chip and folds it into a running ("online") softmax: the row maximum m, the row sum l of exp(s - m)
     and the un-normalised output acc, all rescaled by exp(m_old - m_new) whenever the maximum grows; after
     the last tile, out = acc / l. It reads q once and k, v once per query tile, and writes out and one
     number per row, lse = m + log(l), which is all the backward needs to rebuild the softmax;
  3. the backward kernels recompute instead of storing: P = exp(q k^T * scale - lse) costs one more matrix
     product but keeps no (N, N) array between forward and backward. With delta = rowsum(dO * out):
         dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.
     Two kernels, so no program adds into memory that another one writes (no atomics): one program per query
     tile accumulates dQ on-chip (and stores delta), one per key tile accumulates dK and dV;
  4. the autograd Function, and the dispatchers `attention`, `attention_varlen` and `attention_qkv` (what the
     ViT calls on its fused qkv projection).
Products accumulate in fp32 (fp32 inputs use exact fp32 products, not TF32); exponentials are exp2 with
log2(e) folded into the scale, what the hardware computes fastest.

Packed (varlen) batches: a DINO step's 2 global crops (197 tokens at ViT-S/16) and 10 local ones (37) are
too little work per launch for a GPU. Packed, q (T, H, D) holds every sequence back to back, cu_seqlens =
[0, n_0, n_0 + n_1, ...], and each program looks up its sequence: crops of all sizes go through one launch.
The host side (sizes, layouts, lean launches, torch.compile operators) is kernels/attention_host.py, which
imports nothing from here. Tests run the kernels through Triton's interpreter and compile them for sm_90/80.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_host as host  # the host side; it gets this file's kernels by `host.use_kernels`
from .attention_host import IMPLS, packed_offsets  # noqa: F401 (re-exported: the impls, varlen offsets)
from .launch import INTERPRET, Launcher

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the PyTorch paths still work
    triton = None


# ----------------------------------------------------------------------------------------------------------
# 1. References in plain PyTorch


def attention_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v written out; q, k, v: (B, H, N, D). In fp32 (fp64 stays fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    return (scores.softmax(dim=-1) @ v.to(acc)).to(q.dtype)


def attention_varlen_torch(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, impl: str = "sdpa", lengths: list[int] | None = None
) -> Tensor:
    """Packed attention without Triton: q, k, v (T, H, D); each run of equal-length sequences as one batch.
    `lengths`: the sequence lengths as the host knows them (vit.Packing); without them they are read back
    from cu_seqlens, which makes the host wait for the device."""
    lengths = cu_seqlens.diff().tolist() if lengths is None else lengths
    out, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        count, n = j - i, lengths[i]  # `count` sequences of n tokens from token `start`
        qkv = [t[start : start + count * n].unflatten(0, (count, n)).transpose(1, 2) for t in (q, k, v)]
        o = attention_ref(*qkv) if impl == "ref" else F.scaled_dot_product_attention(*qkv)  # (count, H, n, D)
        out.append(o.transpose(1, 2).flatten(0, 1))  # (count * n, H, D)
        start, i = start + count * n, j
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# The kernels' memory layout. Strides come in a few sets, one per layout: q, k and v share qkv_stride_*
# (views of one fused qkv projection), out has out_stride_*, dout dout_stride_*, and dq, dk, dv share
# grad_stride_* (views of one fused gradient buffer). An element sits at
#     base + seq * stride_b + head * stride_h + token * stride_n + d        (d contiguous)
# Dense inputs: seq = batch index, tokens from 0. Packed inputs: stride_b = 0, tokens from cu_seqlens[seq].
# lse and delta are (seq, head, token) arrays with strides (lse_stride_b, lse_stride_h, 1).

# fmt: off
if triton is not None:

    def _autotune(candidates):
        """Autotuning over (BLOCK_M, BLOCK_N, warps, pipeline stages) candidates, once per (sequence length
        rounded up to a power of 2, head dim, packed or not). MINIDINO_ATTN_AUTOTUNE=0 keeps the first only
        (quick compiles for tests); the interpreter gets one small tile."""
        if INTERPRET:
            candidates = [(16, 16, 1, 1)]
        elif os.environ.get("MINIDINO_ATTN_AUTOTUNE") == "0":
            candidates = candidates[:1]
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in candidates
        ]
        return triton.autotune(configs=configs, key=["N_BUCKET", "D", "VARLEN"])

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32. UPCAST: the CPU interpreter multiplies bf16 wrongly; go through fp32."""
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _this_sequence(CU_SEQLENS, H, N, VARLEN: tl.constexpr):
        """(sequence, head, first token, length) of this program: from cu_seqlens when packed, else
        (batch index, head, 0, N)."""
        seq, head = tl.program_id(1) // H, tl.program_id(1) % H
        start = 0
        n = N
        if VARLEN:
            start = tl.load(CU_SEQLENS + seq)
            n = tl.load(CU_SEQLENS + seq + 1) - start
        return seq, head, start, n

    @triton.jit
    def _offset(seq, head, token, stride_b, stride_h, stride_n):
        """Element offset of (seq, head, token) in a layout with these strides."""
        return seq * stride_b + head * stride_h + token * stride_n

    # ------------------------------------------------------------------------------------------------------
    # 2. Forward

    @_autotune([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 2)])
    @triton.jit
    def _attn_fwd(
        Q, K, V, Out, LSE, CU_SEQLENS,
        qkv_stride_b, qkv_stride_h, qkv_stride_n, out_stride_b, out_stride_h, out_stride_n,
        lse_stride_b, lse_stride_h, H, N, D, N_BUCKET, qk_scale,
        VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One tile of BLOCK_M queries of one (sequence, head): out and the log-sum-exp (log2 units)."""
        seq, head, start, n = _this_sequence(CU_SEQLENS, H, N, VARLEN)
        if tl.program_id(0) * BLOCK_M >= n:  # a query tile past the end of a short packed sequence
            return
        qkv = _offset(seq, head, start, qkv_stride_b, qkv_stride_h, qkv_stride_n)  # now at this (seq, head)
        Q, K, V = Q + qkv, K + qkv, V + qkv
        Out += _offset(seq, head, start, out_stride_b, out_stride_h, out_stride_n)
        LSE += _offset(seq, head, start, lse_stride_b, lse_stride_h, 1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
        cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions within a tile
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        row_ok = rows < n
        q = tl.load(Q + rows[:, None] * qkv_stride_n + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running un-normalised output
        for j in range(0, n, BLOCK_N):
            keys = j + cols
            k_ok = keys < n
            kT = tl.load(K + keys[None, :] * qkv_stride_n + d[:, None], mask=d_ok[:, None] & k_ok, other=0.0)
            s = _dot(q, kT, PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N) scores, log2 units
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + keys[:, None] * qkv_stride_n + d[None, :], mask=k_ok[:, None] & d_ok, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new

        tl.store(Out + rows[:, None] * out_stride_n + d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)
        tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)

    # ------------------------------------------------------------------------------------------------------
    # 3. Backward: dQ per query tile, then dK and dV per key tile

    @_autotune([(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2), (64, 64, 4, 2)])
    @triton.jit
    def _attn_bwd_dq(
        Q, K, V, Out, DO, DQ, LSE, DELTA, CU_SEQLENS,
        qkv_stride_b, qkv_stride_h, qkv_stride_n, out_stride_b, out_stride_h, out_stride_n,
        dout_stride_b, dout_stride_h, dout_stride_n, grad_stride_b, grad_stride_h, grad_stride_n,
        lse_stride_b, lse_stride_h, H, N, D, N_BUCKET, qk_scale, sm_scale,
        VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One tile of BLOCK_M queries: delta = rowsum(dO * out) (stored for _attn_bwd_dkdv), then dQ, with
        q, dO and dQ on-chip while it walks over the key tiles."""
        seq, head, start, n = _this_sequence(CU_SEQLENS, H, N, VARLEN)
        if tl.program_id(0) * BLOCK_M >= n:
            return
        qkv = _offset(seq, head, start, qkv_stride_b, qkv_stride_h, qkv_stride_n)
        Q, K, V = Q + qkv, K + qkv, V + qkv
        DQ += _offset(seq, head, start, grad_stride_b, grad_stride_h, grad_stride_n)
        DO += _offset(seq, head, start, dout_stride_b, dout_stride_h, dout_stride_n)
        Out += _offset(seq, head, start, out_stride_b, out_stride_h, out_stride_n)
        rows_at = _offset(seq, head, start, lse_stride_b, lse_stride_h, 1)  # lse and delta of (seq, head)
        LSE, DELTA = LSE + rows_at, DELTA + rows_at
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        row_ok = rows < n
        tile_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * qkv_stride_n + d[None, :], mask=tile_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + rows[:, None] * dout_stride_n + d[None, :], mask=tile_ok, other=0.0)
        o = tl.load(Out + rows[:, None] * out_stride_n + d[None, :], mask=tile_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
        tl.store(DELTA + rows, delta, mask=row_ok)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for j in range(0, n, BLOCK_N):
            keys = j + cols
            k_ok = keys < n
            k = tl.load(K + keys[:, None] * qkv_stride_n + d[None, :], mask=k_ok[:, None] & d_ok, other=0.0)
            vT = tl.load(V + keys[None, :] * qkv_stride_n + d[:, None], mask=d_ok[:, None] & k_ok, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
            p = tl.where(k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)  # the forward's softmax, rebuilt
            dp = _dot(do, vT, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        dq = (dq * sm_scale).to(DQ.dtype.element_ty)
        tl.store(DQ + rows[:, None] * grad_stride_n + d[None, :], dq, mask=tile_ok)

    @_autotune(
        [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2), (64, 128, 8, 2), (16, 128, 4, 3)]
    )
    @triton.jit
    def _attn_bwd_dkdv(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS,
        qkv_stride_b, qkv_stride_h, qkv_stride_n, dout_stride_b, dout_stride_h, dout_stride_n,
        grad_stride_b, grad_stride_h, grad_stride_n, lse_stride_b, lse_stride_h, H, N, D, N_BUCKET,
        qk_scale, sm_scale,
        VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One tile of BLOCK_N keys: dK and dV, with k, v, dK, dV on-chip while it walks over the query
        tiles (BLOCK_M queries each)."""
        seq, head, start, n = _this_sequence(CU_SEQLENS, H, N, VARLEN)
        if tl.program_id(0) * BLOCK_N >= n:
            return
        qkv = _offset(seq, head, start, qkv_stride_b, qkv_stride_h, qkv_stride_n)
        grad = _offset(seq, head, start, grad_stride_b, grad_stride_h, grad_stride_n)
        Q, K, V, DK, DV = Q + qkv, K + qkv, V + qkv, DK + grad, DV + grad
        DO += _offset(seq, head, start, dout_stride_b, dout_stride_h, dout_stride_n)
        rows_at = _offset(seq, head, start, lse_stride_b, lse_stride_h, 1)  # lse and delta of (seq, head)
        LSE, DELTA = LSE + rows_at, DELTA + rows_at
        keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        k_ok = keys < n
        tile_ok = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + keys[:, None] * qkv_stride_n + d[None, :], mask=tile_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + keys[:, None] * qkv_stride_n + d[None, :], mask=tile_ok, other=0.0)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for i in range(0, n, BLOCK_M):
            qrows = i + rows
            q_ok = qrows < n
            qT = tl.load(Q + qrows[None, :] * qkv_stride_n + d[:, None], mask=d_ok[:, None] & q_ok, other=0.0)
            do = tl.load(DO + qrows[:, None] * dout_stride_n + d[None, :], mask=q_ok[:, None] & d_ok, other=0.0)
            lse = tl.load(LSE + qrows, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + qrows, mask=q_ok, other=0.0)
            sT = _dot(k, qT, PRECISION, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M): scores, transposed
            pT = tl.where(q_ok[None, :], tl.exp2(sT - lse[None, :]), 0.0)
            dv += _dot(pT.to(do.dtype), do, PRECISION, UPCAST)
            dpT = _dot(v, tl.trans(do), PRECISION, UPCAST)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PRECISION, UPCAST)
        dk = (dk * sm_scale).to(DK.dtype.element_ty)
        tl.store(DK + keys[:, None] * grad_stride_n + d[None, :], dk, mask=tile_ok)
        tl.store(DV + keys[:, None] * grad_stride_n + d[None, :], dv.to(DV.dtype.element_ty), mask=tile_ok)

    # cached direct launches after the first call of each kind (kernels/launch.py), handed to the host side
    host.use_kernels(Launcher(_attn_fwd), Launcher(_attn_bwd_dq), Launcher(_attn_bwd_dkdv))
# fmt: on


# ----------------------------------------------------------------------------------------------------------
# 4. The autograd Function (the host side of a call: kernels/attention_host.py), and the dispatchers


class _FlashAttention(torch.autograd.Function):
    """Inputs: q, k, v (B, H, N, D) or packed (T, H, D); or, with k = v = None, q holding all three as one
    fused (B, N, 3, H, D) or (T, 3, H, D) tensor, whose gradient then comes back as one tensor too: dq, dk
    and dv are written into views of one buffer in that layout, with no concatenation of three gradients."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen):
        ctx.fused = k is None
        if ctx.fused:  # views of one fused qkv share one layout already
            q, k, v = host.split_qkv(q, cu_seqlens is not None)
        ctx.seqs = seqs = host.Sequences.of(q, cu_seqlens, max_seqlen)
        if not ctx.fused:
            q, k, v = seqs.one_layout(q, k, v)
        o, lse = host.launch_forward(seqs, q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        seqs = ctx.seqs
        dqkv = seqs.new_fused(q)  # dq, dk, dv: views of one buffer in the fused qkv layout
        dq, dk, dv = host.split_qkv(dqkv, seqs.cu_seqlens is not None)
        host.launch_backward(seqs, seqs.d_contiguous(do), q, k, v, o, lse, dq, dk, dv)
        return (dqkv, None, None, None, None) if ctx.fused else (dq, dk, dv, None, None)


def _flash(
    q: Tensor, k: Tensor | None, v: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int
) -> Tensor:
    """The Triton path. Launches pass raw addresses (kernels/launch.py), so q, k, v must share a device.
    Under torch.compile: the custom operator of kernels/attention_host.py, kept whole in the graph."""
    if k is not None and not q.get_device() == k.get_device() == v.get_device():
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if torch.compiler.is_compiling():
        if k is None:  # fused qkv: the compiler handles its split and the gradients' concatenation
            q, k, v = host.split_qkv(q, cu_seqlens is not None)
        return torch.ops.minidino.flash_attention(q, k, v, cu_seqlens, max_seqlen)[0]
    return _FlashAttention.apply(q, k, v, cu_seqlens, max_seqlen)


def attention(q: Tensor, k: Tensor, v: Tensor, impl: str = "auto") -> Tensor:
    """Non-causal softmax(q k^T / sqrt(D)) v for q, k, v (B, H, N, D), any N; returns (B, H, N, D).
    impl: "auto" runs Triton on CUDA and PyTorch's scaled_dot_product_attention elsewhere; "triton", "sdpa"
    and "ref" force one."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        shapes = [tuple(t.shape) for t in (q, k, v)]
        raise ValueError(f"attention: q, k, v must share one (B, H, N, D) shape, got {shapes}")
    if host.use_triton(q, impl):
        return _flash(q, k, v, None, q.shape[2])
    return attention_ref(q, k, v) if impl == "ref" else F.scaled_dot_product_attention(q, k, v)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    impl: str = "auto",
    lengths: list[int] | None = None,
) -> Tensor:
    """Packed attention: q, k, v (T, H, D) hold sequences back to back; sequence i is tokens
    cu_seqlens[i]:cu_seqlens[i+1] (int32, starts with 0, ends with T) and attends only within itself.
    `lengths` (the host's copy of cu_seqlens.diff()) spares the PyTorch path a read-back."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 3:
        raise ValueError(f"attention_varlen: q, k, v must share one (T, H, D) shape, got {tuple(q.shape)}")
    if host.use_triton(q, impl):
        return _flash(q, k, v, cu_seqlens.to(q.device, torch.int32), int(max_seqlen))
    return attention_varlen_torch(q, k, v, cu_seqlens, "ref" if impl == "ref" else "sdpa", lengths)


def attention_qkv(
    qkv: Tensor,
    impl: str = "auto",
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    lengths: list[int] | None = None,
) -> Tensor:
    """Attention on the fused output of a qkv projection, token-major in and out, as a ViT block holds it:
    qkv (B, N, 3, H, D) -> (B, N, H, D); packed (cu_seqlens given, as in `attention_varlen`):
    qkv (T, 3, H, D) -> (T, H, D). With Triton the gradient comes back as one tensor in qkv's layout."""
    packed = cu_seqlens is not None
    if qkv.dim() != (4 if packed else 5) or qkv.shape[-3] != 3:
        want = "(T, 3, H, D) with cu_seqlens" if packed else "(B, N, 3, H, D)"
        raise ValueError(f"attention_qkv: qkv must be {want}, got {tuple(qkv.shape)}")
    if host.use_triton(qkv, impl):
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        args = (cu_seqlens.to(qkv.device, torch.int32), int(max_seqlen)) if packed else (None, qkv.shape[1])
        out = _flash(qkv, None, None, *args)
        return out if packed else out.transpose(1, 2)
    q, k, v = host.split_qkv(qkv, packed)
    if packed:
        return attention_varlen(q, k, v, cu_seqlens, max_seqlen, impl, lengths)
    return attention(q, k, v, impl).transpose(1, 2)
