"""Every Triton kernel goes through Triton's real GPU compiler (Triton IR -> PTX -> cubin) for an H100 (sm_90)
and an A100 (sm_80), on a machine without a GPU.

The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute, but they run the kernel bodies as
NumPy and accept code that the compiler rejects: a variable that changes type inside a loop, an operation on
the wrong kind of value, a tile that needs more shared memory than the chip has. Compiling ahead of time for
a named target catches those here and in CI, before a GPU session spends its minutes on them."""

import pytest

from conftest import INTERPRET

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(INTERPRET, reason="needs Triton's compiler: run without TRITON_INTERPRET=1")

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one program may use (H100, A100)
SCALARS = {"qk_scale": "fp32", "sm_scale": "fp32", "scale": "fp32"}  # every other scalar argument is i32


def compile_for(kernel, arch: int, pointers: dict, constexprs: dict, warps: int, stages: int) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else pointers.get(n) or SCALARS.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    out = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages)
    )
    assert out.asm["cubin"], fn.__name__
    assert out.metadata.shared <= SHARED_LIMIT[arch], (fn.__name__, arch, out.metadata.shared, constexprs)


# fp32 inputs differ only in PRECISION="ieee" (and compile 5x slower); D=128 on the chip with less shared memory
@pytest.mark.parametrize("varlen, head_dim, arch", [(False, 64, 90), (True, 64, 90), (False, 128, 80)])
@pytest.mark.parametrize("kernel", ["_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"])
def test_attention_kernels_compile(kernel, varlen, head_dim, arch):
    from minidino.kernels import attention

    pointers = dict.fromkeys(("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"), "*bf16")
    pointers.update(LSE="*fp32", DELTA="*fp32", CU_SEQLENS="*i32" if varlen else "*fp32")
    kernel = getattr(attention, kernel)
    config = kernel.configs[
        0
    ]  # what MINIDINO_ATTN_AUTOTUNE=0 runs (the autotuner skips configs that do not fit)
    flags = dict(VARLEN=varlen, BLOCK_D=head_dim, PRECISION="tf32", UPCAST=False, **config.kwargs)
    compile_for(kernel, arch, pointers, flags, config.num_warps, config.num_stages)


@pytest.mark.parametrize("has_gamma", [False, True])
@pytest.mark.parametrize("kernel", ["_drop_add_fwd", "_drop_add_bwd"])
def test_drop_path_kernels_compile(kernel, has_gamma):
    from minidino.kernels import drop_path

    pointers = {
        "_drop_add_fwd": dict(x_ptr="*bf16", y_ptr="*bf16", g_ptr="*fp32", src_ptr="*i64", out_ptr="*bf16"),
        "_drop_add_bwd": dict(
            go_ptr="*bf16", y_ptr="*bf16", g_ptr="*fp32", kept_ptr="*i64", gy_ptr="*bf16", gg_ptr="*fp32"
        ),
    }[kernel]
    flags = dict(HAS_GAMMA=has_gamma, BLOCK_N=16, BLOCK_C=512)
    compile_for(getattr(drop_path, kernel), 90, pointers, flags, 4, 1)
