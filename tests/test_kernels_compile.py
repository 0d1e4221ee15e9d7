"""Every Triton kernel goes through Triton's real GPU compiler (Triton IR -> PTX -> cubin) for an H100 (sm_90)
and an A100 (sm_80), on a machine without a GPU.

The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute, but they run the kernel bodies as
NumPy and accept code that the compiler rejects: a variable that changes type inside a loop, an operation on
the wrong kind of value, a tile that needs more shared memory than the chip has. Compiling ahead of time for
a named target catches those here and in CI, before a GPU session spends its minutes on them."""

import pytest
from conftest import assert_printed_ok, run_python

COMPILE_CHECK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import attention as A, drop_path as P

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one program may use (H100, A100)

def compile_for(kernel, arch, pointers, constexprs, warps, stages):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = fn.arg_names
    scalars = {"qk_scale": "fp32", "sm_scale": "fp32", "scale": "fp32"}
    sig = {
        n: "constexpr" if n in constexprs else pointers.get(n) or scalars.get(n, "i32") for n in names
    }
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    options = dict(num_warps=warps, num_stages=stages)
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    assert out.asm["cubin"], fn.__name__
    assert out.metadata.shared <= SHARED_LIMIT[arch], (fn.__name__, arch, out.metadata.shared, constexprs)
    return out

def attention_kernels(dtype, varlen, d, arch):
    io = "*" + dtype
    pointers = dict.fromkeys(("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"), io)
    pointers.update(LSE="*fp32", DELTA="*fp32", cu_ptr="*i32" if varlen else "*fp32")
    for kernel in (A._attn_fwd, A._attn_bwd_dq, A._attn_bwd_dkdv):
        # the first config: what MINIDINO_ATTN_AUTOTUNE=0 runs (the autotuner skips configs that do not fit)
        config = kernel.configs[0]
        flags = dict(VARLEN=varlen, BLOCK_D=d, PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
        compile_for(kernel, arch, pointers, {**flags, **config.kwargs}, config.num_warps, config.num_stages)

for varlen in (False, True):  # fp32 inputs differ only in PRECISION="ieee" (and compile 5x slower)
    attention_kernels("bf16", varlen, 64, 90)
attention_kernels("bf16", False, 128, 80)  # the largest head dim on the chip with less shared memory
for kernel, pointers in (
    (P._drop_add_fwd, dict(x_ptr="*bf16", y_ptr="*bf16", g_ptr="*fp32", src_ptr="*i64", out_ptr="*bf16")),
    (
        P._drop_add_bwd,
        dict(go_ptr="*bf16", y_ptr="*bf16", g_ptr="*fp32", kept_ptr="*i64", gy_ptr="*bf16", gg_ptr="*fp32"),
    ),
):
    for has_gamma in (False, True):
        compile_for(kernel, 90, pointers, dict(HAS_GAMMA=has_gamma, BLOCK_N=16, BLOCK_C=512), 4, 1)
print("ok")
"""


def test_triton_kernels_compile_for_h100_and_a100():
    pytest.importorskip("triton")
    # the real compiler, whatever the calling shell set
    assert_printed_ok(run_python(COMPILE_CHECK, TRITON_INTERPRET="0"))
