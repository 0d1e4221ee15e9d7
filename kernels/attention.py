"""Flash-style attention in Triton: forward and backward, dense (B, H, N, D) or packed crops of mixed lengths.

Attention is softmax(q k^T / sqrt(D)) v. Written out (`attention_ref`), it materialises the (N, N) score
matrix per head in device memory, writes it, reads it back for the softmax and again for the product with v.
A ViT-S/16 step holds 128 x 6 x 197 x 197 scores per layer; the work per byte is low and the GPU waits on
memory. The kernels here never store the scores (Dao et al. 2022, FlashAttention, arXiv 2205.14135; the loop
order of FlashAttention-2, arXiv 2307.08691):

  forward   one program per (tile of BLOCK_M queries, sequence, head). Its q tile stays in registers; it walks
            over the keys in tiles of BLOCK_N, and for each computes the (BLOCK_M, BLOCK_N) scores on-chip and
            folds them into a running ("online") softmax: the row maximum m, the row sum l of exp(s - m) and
            the un-normalised output acc, all rescaled by exp(m_old - m_new) whenever the maximum grows. After
            the last tile, out = acc / l. Reads q once and k, v once per query tile; writes out and one number
            per row, the log-sum-exp lse = m + log(l), which is all the backward needs to rebuild the softmax.
  backward  recomputes instead of storing: P = exp(q k^T * scale - lse) costs one more matrix product but
            saves the (N, N) probabilities that would otherwise sit in memory between forward and backward.
            With dO the output gradient and delta = rowsum(dO * out):
                dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.
            Two kernels, so no program ever adds into memory another program writes (no atomics):
              _attn_bwd_dq    one program per query tile (also computes and stores delta for its rows),
                              loops over key tiles, accumulates dQ on-chip;
              _attn_bwd_dkdv  one program per key tile, loops over query tiles, accumulates dK and dV on-chip.
All products accumulate in fp32 (fp32 inputs use exact fp32 products, not TF32); exponentials use exp2 with
log2(e) folded into the scale, which is what the hardware computes fastest.

Packed (varlen) batches. A DINO step runs 2 global crops (197 tokens for ViT-S/16) and 10 local crops (37
tokens). Attention on 37 tokens per head is too little work to fill a GPU, so the local-crop launch leaves it
mostly idle. Packing concatenates every sequence along the token axis, q of shape (T, H, D) with
T = sum of lengths, and passes the cumulative offsets cu_seqlens = [0, n_0, n_0 + n_1, ...]; each program
looks up where its sequence starts and how long it is, so all crops of all sizes go through one launch.
Programs whose query tile lies past the end of a short sequence return at once.

Host time. At ViT sizes one forward+backward is a few hundred microseconds of GPU work, about what Python
spends launching it, so the wrapper keeps launches lean: strides are passed once per memory layout, and
`Launcher` (kernels/launch.py) launches the compiled kernel of an earlier call of the same kind directly.
Under torch.compile the same launches run inside two custom operators (forward, backward), so the compiler
keeps the attention in its graph instead of tracing the launcher's Python.

`attention(q, k, v, impl)` and `attention_varlen(q, k, v, cu_seqlens, max_seqlen, impl)` dispatch: impl "auto"
runs Triton on CUDA and PyTorch's `scaled_dot_product_attention` elsewhere; "triton", "sdpa" and "ref" force
one. `attention_qkv(qkv, impl)` (what the ViT calls) takes the fused output of the qkv projection as it is,
(B, N, 3, H, D) or packed (T, 3, H, D), and with Triton returns its gradient as one tensor in that layout.
Tests run the kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1) against `attention_ref` and
compile them for sm_90 and sm_80 (tests/test_kernels_compile.py).
"""

from __future__ import annotations

import os
from typing import Optional  # the custom operators' schemas are read from these annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.launch import INTERPRET, Launcher, cdiv, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the PyTorch paths still work
    triton = None

IMPLS = ("auto", "triton", "sdpa", "ref")
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


# ----------------------------------------------------------------------------------------------------------
# References in plain PyTorch


def attention_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v written out; q, k, v: (B, H, N, D). In fp32 (fp64 stays fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    return (scores.softmax(dim=-1) @ v.to(acc)).to(q.dtype)


def _per_length_groups(cu_seqlens: Tensor) -> list[tuple[int, int, int]]:
    """Runs of consecutive sequences of equal length as (first token, number of sequences, length)."""
    lengths = cu_seqlens.diff().tolist()
    groups, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        groups.append((start, j - i, lengths[i]))
        start += (j - i) * lengths[i]
        i = j
    return groups


def attention_varlen_torch(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, impl: str = "sdpa") -> Tensor:
    """Packed attention without Triton: q, k, v (T, H, D); each run of equal-length sequences as one batch."""
    out = []
    for start, count, n in _per_length_groups(cu_seqlens):
        qkv = [t[start : start + count * n].unflatten(0, (count, n)).transpose(1, 2) for t in (q, k, v)]
        o = attention_ref(*qkv) if impl == "ref" else F.scaled_dot_product_attention(*qkv)  # (count, H, n, D)
        out.append(o.transpose(1, 2).flatten(0, 1))  # (count * n, H, D)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Strides come in a few shared sets, one per memory layout: q, k and v share (s_b, s_h, s_n)
# (views of one fused qkv projection), out has (so_b, so_h, so_n), dout (sg_b, sg_h, sg_n), and dq, dk, dv
# share (sd_b, sd_h, sd_n) (views of one fused gradient buffer). An element sits at
# base + seq * s_b + head * s_h + token * s_n + d, with d contiguous. Dense inputs: seq = batch index, tokens
# from 0. Packed inputs: s_b = 0, tokens from cu_seqlens[seq]. lse and delta are (seq, head, token) arrays
# with strides (sl_b, sl_h, 1).

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
    def _sequence(cu_ptr, H, N, VARLEN: tl.constexpr):
        """(sequence, head, first token, length) of this program: from cu_seqlens when packed, else
        (batch index, head, 0, N)."""
        seq, head = tl.program_id(1) // H, tl.program_id(1) % H
        start = 0
        n = N
        if VARLEN:
            start = tl.load(cu_ptr + seq)
            n = tl.load(cu_ptr + seq + 1) - start
        return seq, head, start, n

    @triton.jit
    def _at(seq, head, token, s_b, s_h, s_n):
        """Element offset of (seq, head, token) in a layout with these strides."""
        return seq * s_b + head * s_h + token * s_n

    @_autotune([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 2)])
    @triton.jit
    def _attn_fwd(
        Q, K, V, Out, LSE, cu_ptr, s_b, s_h, s_n, so_b, so_h, so_n, sl_b, sl_h, H, N, D, N_BUCKET, qk_scale,
        VARLEN: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One tile of BLOCK_M queries of one (sequence, head): out and the log-sum-exp (log2 units)."""
        seq, head, start, n = _sequence(cu_ptr, H, N, VARLEN)
        if tl.program_id(0) * BLOCK_M >= n:  # a query tile past the end of a short packed sequence
            return
        qkv = _at(seq, head, start, s_b, s_h, s_n)  # pointers now start at this sequence and head
        Q, K, V = Q + qkv, K + qkv, V + qkv
        Out += _at(seq, head, start, so_b, so_h, so_n)
        LSE += _at(seq, head, start, sl_b, sl_h, 1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
        cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions within a tile
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        row_ok = rows < n
        q = tl.load(Q + rows[:, None] * s_n + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)  # on-chip

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running un-normalised output
        for j in range(0, n, BLOCK_N):
            keys = j + cols
            k_ok = keys < n
            kT = tl.load(K + keys[None, :] * s_n + d[:, None], mask=d_ok[:, None] & k_ok, other=0.0)
            s = _dot(q, kT, PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N) scores, log2 units
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + keys[:, None] * s_n + d[None, :], mask=k_ok[:, None] & d_ok, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new

        tl.store(Out + rows[:, None] * so_n + d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)
        tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)

    @_autotune([(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2), (64, 64, 4, 2)])
    @triton.jit
    def _attn_bwd_dq(
        Q, K, V, Out, DO, DQ, LSE, DELTA, cu_ptr, s_b, s_h, s_n, so_b, so_h, so_n, sg_b, sg_h, sg_n,
        sd_b, sd_h, sd_n, sl_b, sl_h, H, N, D, N_BUCKET, qk_scale, sm_scale,
        VARLEN: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One tile of BLOCK_M queries: delta = rowsum(dO * out) (stored for _attn_bwd_dkdv), then dQ, with
        q, dO and dQ on-chip while it walks over the key tiles. dO has strides sg_*, dQ sd_*."""
        seq, head, start, n = _sequence(cu_ptr, H, N, VARLEN)
        if tl.program_id(0) * BLOCK_M >= n:
            return
        qkv, grad = _at(seq, head, start, s_b, s_h, s_n), _at(seq, head, start, sd_b, sd_h, sd_n)
        Q, K, V, DQ = Q + qkv, K + qkv, V + qkv, DQ + grad
        DO += _at(seq, head, start, sg_b, sg_h, sg_n)
        Out += _at(seq, head, start, so_b, so_h, so_n)
        rows_at = _at(seq, head, start, sl_b, sl_h, 1)  # lse and delta of this sequence and head
        LSE, DELTA = LSE + rows_at, DELTA + rows_at
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        row_ok = rows < n
        tile_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * s_n + d[None, :], mask=tile_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + rows[:, None] * sg_n + d[None, :], mask=tile_ok, other=0.0)
        o = tl.load(Out + rows[:, None] * so_n + d[None, :], mask=tile_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
        tl.store(DELTA + rows, delta, mask=row_ok)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for j in range(0, n, BLOCK_N):
            keys = j + cols
            k_ok = keys < n
            k = tl.load(K + keys[:, None] * s_n + d[None, :], mask=k_ok[:, None] & d_ok, other=0.0)
            vT = tl.load(V + keys[None, :] * s_n + d[:, None], mask=d_ok[:, None] & k_ok, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
            p = tl.where(k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)  # the forward's softmax, rebuilt
            dp = _dot(do, vT, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        dq = (dq * sm_scale).to(DQ.dtype.element_ty)
        tl.store(DQ + rows[:, None] * sd_n + d[None, :], dq, mask=tile_ok)

    @_autotune(
        [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2), (64, 128, 8, 2), (16, 128, 4, 3)]
    )
    @triton.jit
    def _attn_bwd_dkdv(
        Q, K, V, DO, DK, DV, LSE, DELTA, cu_ptr, s_b, s_h, s_n, sg_b, sg_h, sg_n, sd_b, sd_h, sd_n,
        sl_b, sl_h, H, N, D, N_BUCKET, qk_scale, sm_scale,
        VARLEN: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One tile of BLOCK_N keys: dK and dV, with k, v, dK, dV on-chip while it walks over the query
        tiles (BLOCK_M queries each)."""
        seq, head, start, n = _sequence(cu_ptr, H, N, VARLEN)
        if tl.program_id(0) * BLOCK_N >= n:
            return
        qkv, grad = _at(seq, head, start, s_b, s_h, s_n), _at(seq, head, start, sd_b, sd_h, sd_n)
        Q, K, V, DK, DV = Q + qkv, K + qkv, V + qkv, DK + grad, DV + grad
        DO += _at(seq, head, start, sg_b, sg_h, sg_n)
        rows_at = _at(seq, head, start, sl_b, sl_h, 1)  # lse and delta of this sequence and head
        LSE, DELTA = LSE + rows_at, DELTA + rows_at
        keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        k_ok = keys < n
        tile_ok = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + keys[:, None] * s_n + d[None, :], mask=tile_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + keys[:, None] * s_n + d[None, :], mask=tile_ok, other=0.0)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for i in range(0, n, BLOCK_M):
            qrows = i + rows
            q_ok = qrows < n
            qT = tl.load(Q + qrows[None, :] * s_n + d[:, None], mask=d_ok[:, None] & q_ok, other=0.0)
            do = tl.load(DO + qrows[:, None] * sg_n + d[None, :], mask=q_ok[:, None] & d_ok, other=0.0)
            lse = tl.load(LSE + qrows, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + qrows, mask=q_ok, other=0.0)
            sT = _dot(k, qT, PRECISION, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M): scores, transposed
            pT = tl.where(q_ok[None, :], tl.exp2(sT - lse[None, :]), 0.0)
            dv += _dot(pT.to(do.dtype), do, PRECISION, UPCAST)
            dpT = _dot(v, tl.trans(do), PRECISION, UPCAST)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PRECISION, UPCAST)
        dk = (dk * sm_scale).to(DK.dtype.element_ty)
        tl.store(DK + keys[:, None] * sd_n + d[None, :], dk, mask=tile_ok)
        tl.store(DV + keys[:, None] * sd_n + d[None, :], dv.to(DV.dtype.element_ty), mask=tile_ok)


# fmt: on
# ----------------------------------------------------------------------------------------------------------
# Autograd wrapper: one Function for dense (B, H, N, D) and packed (T, H, D) inputs.


def _strides(t: Tensor, packed: bool) -> tuple[int, int, int]:
    """(per sequence, per head, per token) element strides; packed sequences are found by token offset."""
    st = t.stride()  # one call: each stride(i) is a call into C++
    return (0, st[1], st[0]) if packed else st[:3]


def _flags(q: Tensor, packed: bool) -> dict:
    """Compile-time switches. fp32 inputs get exact fp32 products ("ieee", not TF32); 16-bit inputs multiply
    natively; both accumulate in fp32. The head dim is padded to a power of 2 (at least 16) on-chip."""
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = INTERPRET and q.dtype == torch.bfloat16
    block_d = max(16, next_power_of_2(q.shape[-1]))
    return dict(VARLEN=packed, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast)


def _sizes(H: int, N: int, D: int) -> tuple[int, int, int, int]:
    """(H, N, D, N_BUCKET): the longest sequence rounded up to a power of 2 keys the autotuner."""
    return H, N, D, next_power_of_2(N)


def _problem(q: Tensor, cu_seqlens: Tensor | None, max_seqlen: int) -> tuple[int, int, int, int]:
    """(sequences, heads, longest sequence, head dim) of q: dense (B, H, N, D) or packed (T, H, D)."""
    if cu_seqlens is None:
        return tuple(q.shape)
    return cu_seqlens.numel() - 1, q.shape[1], max_seqlen, q.shape[2]


def _empty_lse(q: Tensor, packed: bool) -> Tensor:
    """The log-sum-exp of every query row, fp32: (B, H, N) for dense q, (H, T) for packed q."""
    shape = (q.shape[1], q.shape[0]) if packed else q.shape[:3]
    return q.new_empty(shape, dtype=torch.float32)


def _lse_strides(lse: Tensor, packed: bool) -> tuple[int, int]:
    """(per sequence, per head) strides of lse (and delta); packed rows are found by token offset."""
    return (0, lse.stride(0)) if packed else lse.stride()[:2]


def _empty_like_tokens(t: Tensor, packed: bool) -> Tensor:
    """Buffer laid out as (B, N, H, D) in memory (packed: (T, H, D)), so 'b h n d -> b n (h d)' after it is
    a free view."""
    if packed:
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    B, H, N, D = t.shape
    return t.new_empty(B, N, H, D).transpose(1, 2)


def _split_qkv(qkv: Tensor, packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as views of a fused (B, N, 3, H, D) tensor, (B, H, N, D) each; packed: of a (T, 3, H, D)
    tensor, (T, H, D) each."""
    return qkv.unbind(1) if packed else qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _one_layout(q: Tensor, k: Tensor, v: Tensor, packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as they are if they share strides with d contiguous (views of one fused qkv always do), else
    copies into one layout: the kernels take one stride set for the three."""
    st = q.stride()
    if st[-1] != 1 or k.stride() != st or v.stride() != st:
        return tuple(_empty_like_tokens(t, packed).copy_(t) for t in (q, k, v))
    return q, k, v


def _empty_qkv_like(q: Tensor, packed: bool) -> Tensor:
    """One buffer for three tensors shaped like q, in the layout of a fused qkv projection's output:
    (B, N, 3, H, D) for q (B, H, N, D); packed: (T, 3, H, D) for q (T, H, D)."""
    if packed:
        T, H, D = q.shape
        return q.new_empty(T, 3, H, D)
    B, H, N, D = q.shape
    return q.new_empty(B, N, 3, H, D)


if triton is not None:
    _fwd, _bwd_dq, _bwd_dkdv = Launcher(_attn_fwd), Launcher(_attn_bwd_dq), Launcher(_attn_bwd_dkdv)


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int):
    """(out, lse): the forward kernel on q, k, v of one layout; out in the (B, N, H, D) memory layout, lse the
    log-sum-exp per row in log2 units (`_empty_lse`)."""
    packed = cu_seqlens is not None
    n_seqs, H, N, D = _problem(q, cu_seqlens, max_seqlen)
    o, lse = _empty_like_tokens(q, packed), _empty_lse(q, packed)
    grid = lambda meta: (cdiv(N, meta["BLOCK_M"]), n_seqs * H)  # noqa: E731
    scalars = (*_strides(q, packed), *_strides(o, packed), *_lse_strides(lse, packed), *_sizes(H, N, D))
    # dense: cu_seqlens is not read (VARLEN off), any pointer will do
    cu = lse if cu_seqlens is None else cu_seqlens
    _fwd(grid, (q, k, v, o, lse, cu), (*scalars, D**-0.5 * LOG2_E), _flags(q, packed))
    return o, lse


def _launch_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, dq, dk, dv) -> None:
    """Writes dq, dk, dv (one layout among them) from dout (d contiguous) and what the forward kept."""
    packed = cu_seqlens is not None
    n_seqs, H, N, D = _problem(q, cu_seqlens, max_seqlen)
    cu = lse if cu_seqlens is None else cu_seqlens  # dense: not read
    delta = torch.empty_like(lse)  # rowsum(dO * out), written by the dq kernel for the dk/dv kernel
    flags, qkv_strides, d_strides = _flags(q, packed), _strides(q, packed), _strides(dq, packed)
    rest = (*_lse_strides(lse, packed), *_sizes(H, N, D), D**-0.5 * LOG2_E, D**-0.5)
    _bwd_dq(
        lambda meta: (cdiv(N, meta["BLOCK_M"]), n_seqs * H),
        (q, k, v, o, do, dq, lse, delta, cu),
        (*qkv_strides, *_strides(o, packed), *_strides(do, packed), *d_strides, *rest),
        flags,
    )
    _bwd_dkdv(
        lambda meta: (cdiv(N, meta["BLOCK_N"]), n_seqs * H),
        (q, k, v, do, dk, dv, lse, delta, cu),
        (*qkv_strides, *_strides(do, packed), *d_strides, *rest),
        flags,
    )


def _d_contiguous(do: Tensor, packed: bool) -> Tensor:
    """dout as it is when d is contiguous, else a copy (a broadcast gradient has stride 0 there too)."""
    return do if do.stride(-1) == 1 else _empty_like_tokens(do, packed).copy_(do)


class _FlashAttention(torch.autograd.Function):
    """Inputs: q, k, v (B, H, N, D) or packed (T, H, D); or, with k = v = None, q holding all three as one
    fused (B, N, 3, H, D) or (T, 3, H, D) tensor, whose gradient then comes back as one tensor too.

    Strides travel in four sets: q, k, v (one layout; inputs that differ are first copied into one, from a
    fused qkv projection they never differ); out; dout; dq, dk, dv (views of one fused buffer, so a fused
    input's gradient needs no concatenation)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen):
        packed, ctx.fused, ctx.max_seqlen = cu_seqlens is not None, k is None, max_seqlen
        q, k, v = _split_qkv(q, packed) if ctx.fused else _one_layout(q, k, v, packed)
        o, lse = _launch_forward(q, k, v, cu_seqlens, max_seqlen)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        packed = cu_seqlens is not None
        dqkv = _empty_qkv_like(q, packed)
        dq, dk, dv = _split_qkv(dqkv, packed)
        _launch_backward(_d_contiguous(do, packed), q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, dq, dk, dv)
        if ctx.fused:
            return dqkv, None, None, None, None
        return dq, dk, dv, None, None


# Under torch.compile the kernels are custom operators: the compiler sees an opaque op with known output
# shapes (the "fake" functions) and a registered backward, where it would otherwise trace into the Python
# of the launcher and break the graph. Eager calls keep the autograd.Function above (less host time).
if triton is not None:

    @torch.library.custom_op("minidino::flash_attention", mutates_args=())
    def _flash_op(
        q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int
    ) -> tuple[Tensor, Tensor]:
        """(out, lse), as `_launch_forward`; lse is kept for the backward, not differentiated."""
        return _launch_forward(*_one_layout(q, k, v, cu_seqlens is not None), cu_seqlens, max_seqlen)

    @_flash_op.register_fake
    def _(q, k, v, cu_seqlens, max_seqlen):
        packed = cu_seqlens is not None
        return _empty_like_tokens(q, packed), _empty_lse(q, packed)

    @torch.library.custom_op("minidino::flash_attention_backward", mutates_args=())
    def _flash_backward_op(
        do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu: Optional[Tensor], n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv); cu and n: cu_seqlens and the longest sequence, as for the forward."""
        packed = cu is not None
        q, k, v = _one_layout(q, k, v, packed)
        dq, dk, dv = (_empty_like_tokens(q, packed) for _ in range(3))  # one layout for the three
        _launch_backward(_d_contiguous(do, packed), q, k, v, o, lse, cu, n, dq, dk, dv)
        return dq, dk, dv

    @_flash_backward_op.register_fake
    def _(do, q, k, v, o, lse, cu, n):
        return tuple(_empty_like_tokens(q, cu is not None) for _ in range(3))

    def _save_for_backward(ctx, inputs, output):
        q, k, v, cu_seqlens, ctx.max_seqlen = inputs
        ctx.save_for_backward(q, k, v, *output, cu_seqlens)

    def _op_backward(ctx, do, _dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        return *_flash_backward_op(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen), None, None

    _flash_op.register_autograd(_op_backward, setup_context=_save_for_backward)


def _flash(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int) -> Tensor:
    """The Triton path: the custom operator under torch.compile, the autograd.Function otherwise."""
    if torch.compiler.is_compiling():
        if k is None:  # fused qkv: the compiler handles its split and the gradients' concatenation
            q, k, v = _split_qkv(q, cu_seqlens is not None)
        return _flash_op(q, k, v, cu_seqlens, max_seqlen)[0]
    return _FlashAttention.apply(q, k, v, cu_seqlens, max_seqlen)


# ----------------------------------------------------------------------------------------------------------
# Dispatchers


def _use_triton(q: Tensor, impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"attention: unknown impl {impl!r} (expected one of {', '.join(IMPLS)})")
    supported = q.shape[-1] <= 128 and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if impl == "triton":
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
    return impl == "auto" and triton is not None and q.is_cuda and supported


def _one_device(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The Triton path launches with raw addresses (kernels/launch.py), so it checks devices itself."""
    if not q.get_device() == k.get_device() == v.get_device():
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def attention(q: Tensor, k: Tensor, v: Tensor, impl: str = "auto") -> Tensor:
    """Non-causal softmax(q k^T / sqrt(D)) v for q, k, v (B, H, N, D), any N; returns (B, H, N, D)."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must share one (B, H, N, D) shape, got {[tuple(t.shape) for t in (q, k, v)]}"
        )
    if _use_triton(q, impl):
        _one_device(q, k, v)
        return _flash(q, k, v, None, q.shape[2])
    if impl == "ref":
        return attention_ref(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, impl: str = "auto"
) -> Tensor:
    """Packed attention: q, k, v (T, H, D) hold sequences back to back; sequence i is tokens
    cu_seqlens[i]:cu_seqlens[i+1] (int32, starts with 0, ends with T) and attends only within itself."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 3:
        raise ValueError(f"attention_varlen: q, k, v must share one (T, H, D) shape, got {tuple(q.shape)}")
    if _use_triton(q, impl):
        _one_device(q, k, v)
        return _flash(q, k, v, cu_seqlens.to(q.device, torch.int32), int(max_seqlen))
    return attention_varlen_torch(q, k, v, cu_seqlens, "ref" if impl == "ref" else "sdpa")


def attention_qkv(
    qkv: Tensor, impl: str = "auto", cu_seqlens: Tensor | None = None, max_seqlen: int | None = None
) -> Tensor:
    """Attention on the fused output of a qkv projection, token-major in and out, as a ViT block holds it:
    qkv (B, N, 3, H, D) -> (B, N, H, D); packed (cu_seqlens given, as in `attention_varlen`):
    qkv (T, 3, H, D) -> (T, H, D). With Triton the gradient comes back as one tensor in qkv's layout, where
    splitting qkv into q, k and v first would cost a concatenation of their three gradients."""
    packed = cu_seqlens is not None
    if qkv.dim() != (4 if packed else 5) or qkv.shape[-3] != 3:
        want = "(T, 3, H, D) with cu_seqlens" if packed else "(B, N, 3, H, D)"
        raise ValueError(f"attention_qkv: qkv must be {want}, got {tuple(qkv.shape)}")
    if _use_triton(qkv, impl):
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        args = (cu_seqlens.to(qkv.device, torch.int32), int(max_seqlen)) if packed else (None, qkv.shape[1])
        out = _flash(qkv, None, None, *args)
        return out if packed else out.transpose(1, 2)
    q, k, v = _split_qkv(qkv, packed)
    if packed:
        return attention_varlen(q, k, v, cu_seqlens, max_seqlen, impl)
    return attention(q, k, v, impl).transpose(1, 2)


def flops(batch: int, heads: int, n: int, d: int, backward: bool = False) -> float:
    """Matrix-product FLOPs of attention: 4 B H N^2 D forward (q k^T and p v); backward counted as 2.5x."""
    fwd = 4.0 * batch * heads * n * n * d
    return fwd * (3.5 if backward else 1.0)


def packed_offsets(lengths: list[int], device: torch.device | str) -> tuple[Tensor, int]:
    """cu_seqlens (int32, len(lengths) + 1) and the longest length, for `attention_varlen`."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    # non_blocking: PyTorch follows a blocking copy to the GPU with a stream sync, which makes the host wait
    # for all queued work; from pageable memory the driver stages the bytes before returning, so the source
    # may go away at once
    return cu.to(device, non_blocking=True), max(lengths)


__all__ = [
    "attention",
    "attention_qkv",
    "attention_varlen",
    "attention_ref",
    "attention_varlen_torch",
    "packed_offsets",
    "flops",
]
