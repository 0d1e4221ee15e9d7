"""kernels/attention.py: the Triton kernels against attention_ref (on CPU through the Triton interpreter, on
GPU when present), packed against per-sequence, the dispatcher, and the ViT's packed multi-crop path."""

import os

import pytest
import torch
from conftest import assert_printed_ok, run_python

from kernels.attention import attention, attention_qkv, attention_ref, attention_varlen, packed_offsets
from minidino.vit import VisionTransformer

# Tolerances on max |error| relative to (1 + max |reference|): fp32 products are exact fp32 ("ieee"), 16-bit
# inputs round the probabilities to 16 bits before the product with v (as every flash kernel does).
# The checks run in a child process on CPU because TRITON_INTERPRET=1 must be set before triton is imported.
KERNEL_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from kernels.attention import attention, attention_qkv, attention_ref, attention_varlen, packed_offsets
from kernels.attention import attention_varlen_torch
device, big = sys.argv[2], sys.argv[3] == "big"
torch.manual_seed(0)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

def close(got, want, what):
    err = (got.float() - want.float()).abs().max().item()
    tol = TOL[dtype] * (1 + want.float().abs().max().item())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({shape}, {dtype})"

shapes = [(2, 2, 37, 32), (1, 3, 17, 64), (1, 1, 5, 128)]
# (2, 6, 197, 64) after (4, 6, 197, 64): the same kind of call with fewer sequences (a last, smaller batch)
big_shapes = [(4, 6, 197, 64), (2, 6, 197, 64), (2, 16, 257, 64), (1, 12, 1370, 64), (3, 4, 50, 128)]
big_shapes += [(5, 3, 65, 32)]
cases = [(s, dt) for s in shapes for dt in TOL] + ([(s, torch.bfloat16) for s in big_shapes] if big else [])
cases *= 2 if device == "cuda" else 1  # on GPU the second round launches the cached compiled kernels
for shape, dtype in cases:
    B, H, N, D = shape
    # q, k, v as the strided views a fused qkv projection gives: (B, N, 3, H, D) -> three (B, H, N, D)
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    out = attention(q, k, v, impl="triton")
    ref = attention_ref(q.float(), k.float(), v.float())
    close(out, ref, "forward")
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
    want = torch.autograd.grad(ref, (q, k, v), go.float(), retain_graph=True)
    for g, w, name in zip(got, want, "qkv"):
        close(g, w, "grad " + name)
    # output gradients in other layouts: d not contiguous, and broadcast (the gradient of out.sum())
    if shape == shapes[0]:
        odd = go.transpose(-1, -2).contiguous().transpose(-1, -2)
        for g, w, name in zip(torch.autograd.grad(out, (q, k, v), odd, retain_graph=True), want, "qkv"):
            close(g, w, "grad (d-strided dout) " + name)
        got = torch.autograd.grad(out.float().sum(), (q, k, v), retain_graph=True)
        for g, w, name in zip(got, torch.autograd.grad(ref.sum(), (q, k, v)), "qkv"):
            close(g, w, "grad (broadcast dout) " + name)
    # the fused entry point: qkv in, (B, N, H, D) out, one gradient for qkv
    out_f = attention_qkv(qkv, impl="triton")
    close(out_f.transpose(1, 2), ref, "forward (fused qkv)")
    g_f = torch.autograd.grad(out_f, qkv, go.transpose(1, 2))[0]
    close(g_f, torch.stack([w.transpose(1, 2) for w in want], 2), "grad (fused qkv)")  # (B, N, 3, H, D)
    if shape == shapes[0]:
        # the gradient reaches qkv straight from the kernels' node: no unbind/stack in between
        nodes, fn = [], out_f.grad_fn
        while fn is not None:
            nodes.append(type(fn).__name__)
            fn = fn.next_functions[0][0] if fn.next_functions else None
        assert nodes[-1] == "AccumulateGrad" and not any("Unbind" in n or "Stack" in n for n in nodes), nodes
        # a qkv whose d axis is not contiguous is copied first, with the same results
        odd = qkv.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
        close(attention_qkv(odd, impl="triton").transpose(1, 2), ref, "forward (d-strided qkv)")
    # contiguous inputs take the same kernels with other strides
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    close(attention(qc, kc, vc, impl="triton"), ref, "forward (contiguous)")

# packed: sequences of mixed lengths in one launch equal each sequence on its own
lengths = [37, 37, 17, 5, 17, 1] + ([197, 197, 37, 37, 37, 257] if big else [])
cu, longest = packed_offsets(lengths, device)
for dtype in TOL:
    shape = ("packed", lengths)
    T = sum(lengths)
    q, k, v = (torch.randn(T, 3, 32, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    out = attention_varlen(q, k, v, cu, longest, impl="triton")
    ref = attention_varlen_torch(q.float(), k.float(), v.float(), cu, impl="ref")
    close(out, ref, "packed forward")
    starts = cu.tolist()
    for i in range(len(lengths)):  # each sequence alone, through the dense kernel
        s, e = starts[i], starts[i + 1]
        one = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, n, D)
        alone = attention(*one, impl="triton")[0].transpose(0, 1)
        close(out[s:e], alone, f"packed sequence {i}")
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go.float())
    for g, w, name in zip(got, want, "qkv"):
        close(g, w, "packed grad " + name)
    qkv = torch.stack((q, k, v), 1).detach().requires_grad_()  # (T, 3, H, D)
    out_f = attention_qkv(qkv, "triton", cu, longest)
    close(out_f, ref, "packed forward (fused qkv)")
    close(torch.autograd.grad(out_f, qkv, go)[0], torch.stack(want, 1), "packed grad (fused qkv)")
if device == "cuda":
    from kernels.attention import _bwd_dkdv, _bwd_dq, _fwd
    assert all(launcher.hits > 0 for launcher in (_fwd, _bwd_dq, _bwd_dkdv)), "cached launches never ran"
    # cached launches pass raw addresses, so the dispatcher must refuse a CPU tensor among CUDA ones
    q = torch.randn(1, 2, 17, 32, device=device)
    try:
        attention(q, q.cpu(), q, impl="triton")
        raise AssertionError("a CPU k was accepted")
    except ValueError as e:
        assert "one device" in str(e), e
print("ok")
"""

VIT_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from minidino.vit import VisionTransformer
device = sys.argv[2]
torch.manual_seed(0)
vit = VisionTransformer("vit_nano", patch_size=8, img_size=32, attn_impl="sdpa").to(device)
crops = [torch.randn(2, 3, 32, 32, device=device), torch.randn(2, 3, 16, 16, device=device)]

def run(impl, packed):
    vit.set_attn_impl(impl)
    vit.pack_crops = packed
    vit.zero_grad()
    out = vit(crops)
    loss = sum((o["cls"] ** 2).sum() + o["patch"].sum() for o in out)
    loss.backward()
    grads = [p.grad.clone() for p in vit.parameters() if p.grad is not None]
    return [o[k] for o in out for k in ("cls", "patch")], grads

want_out, want_grad = run("sdpa", False)
for packed in (False, True):
    got_out, got_grad = run("triton", packed)
    for a, b in zip(got_out + got_grad, want_out + want_grad):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
print("ok")
"""

COMPILE_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from minidino.vit import Attention, Packing
device = sys.argv[2]
# CPU: dynamo + AOTAutograd (no C++ compiler needed); GPU: inductor, with the kernels inside its graph
backend = "inductor" if device == "cuda" else "aot_eager"
torch.manual_seed(0)
m = Attention(64, 2, "triton").to(device)
ref = Attention(64, 2, "sdpa").to(device)
ref.load_state_dict(m.state_dict())
for packing in (None, Packing.from_lengths([17, 17, 5, 5, 5], device)):
    x = torch.randn((3, 17, 64) if packing is None else (49, 64), device=device, requires_grad=True)
    # fullgraph: the attention call must not break the graph (it is a custom operator under compile)
    out = torch.compile(lambda x: m(x, packing=packing), backend=backend, fullgraph=True)(x)
    want = ref(x, packing=packing)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    got = torch.autograd.grad((out * want.detach()).sum(), [x, *m.parameters()])
    for g, w in zip(got, torch.autograd.grad((want * want.detach()).sum(), [x, *ref.parameters()])):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
print("ok")
"""


def _child(script: str, device: str, size: str = "small") -> None:
    # on GPU, one tile config per kernel: this checks correctness, the benchmark autotunes
    env = dict(TRITON_INTERPRET="1" if device == "cpu" else "0", MINIDINO_ATTN_AUTOTUNE="0")
    assert_printed_ok(run_python(script, device, size, **env))


def test_triton_kernels_match_reference_in_interpreter(triton_interpreter):
    _child(KERNEL_CHECK, "cpu")


def test_vit_with_triton_attention_matches_sdpa_in_interpreter(triton_interpreter):
    _child(VIT_CHECK, "cpu")


def test_compiled_attention_with_triton_in_interpreter(triton_interpreter):
    """torch.compile sees the Triton path as one custom operator (forward and backward): no graph break,
    the same outputs and gradients as SDPA, dense and packed."""
    _child(COMPILE_CHECK, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_match_reference_on_gpu():
    _child(KERNEL_CHECK, "cuda", "big")
    _child(VIT_CHECK, "cuda")
    _child(COMPILE_CHECK, "cuda")


def test_reference_matches_sdpa_and_softmax_properties():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, dtype=torch.float64) for _ in range(3))
    out = attention_ref(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # identical keys: uniform attention, so every query returns the mean of v
    same = attention_ref(q, k[:, :, :1].expand_as(k), v)
    torch.testing.assert_close(same, v.mean(dim=2, keepdim=True).expand_as(v))


def test_dispatcher_fallbacks_and_errors():
    q, k, v = (torch.randn(1, 2, 17, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, impl="auto"), attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        attention(q, k, v, impl="sdpa"), attention(q, k, v, impl="ref"), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        attention(q, k[:, :, :5], v)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="CUDA"):
            attention(q, k, v, impl="triton")  # a CPU tensor without the interpreter
    big_d = torch.randn(1, 1, 5, 160)
    with pytest.raises(ValueError, match="head dim 160"):
        attention(big_d, big_d, big_d, impl="triton")


def test_fused_qkv_entry_point_without_triton():
    """attention_qkv on CPU (SDPA and the reference): token-major in and out, dense and packed."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 37, 3, 3, 8)  # (B, N, 3, H, D)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    want = attention_ref(q, k, v).transpose(1, 2)  # (B, N, H, D)
    for impl in ("auto", "sdpa", "ref"):
        torch.testing.assert_close(attention_qkv(qkv, impl), want, atol=1e-5, rtol=1e-5)
    cu, longest = packed_offsets([37, 37], "cpu")
    packed = attention_qkv(qkv.flatten(0, 1), "sdpa", cu, longest)  # (T, 3, H, D) -> (T, H, D)
    torch.testing.assert_close(packed, want.flatten(0, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, D\), got \(2, 37, 9, 8\)"):
        attention_qkv(qkv.flatten(2, 3))
    with pytest.raises(ValueError, match=r"\(T, 3, H, D\) with cu_seqlens"):
        attention_qkv(qkv, "sdpa", cu, longest)


def test_packed_torch_path_equals_per_sequence():
    torch.manual_seed(0)
    lengths = [17, 17, 5, 37, 37, 37, 5]
    cu, longest = packed_offsets(lengths, "cpu")
    assert cu.tolist() == [0, 17, 34, 39, 76, 113, 150, 155] and longest == 37
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    out = attention_varlen(q, k, v, cu, longest, impl="sdpa")
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = attention_ref(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
        torch.testing.assert_close(out[s:e], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("registers", [0, 2])
def test_vit_packed_multicrop_equals_per_resolution(registers):
    torch.manual_seed(0)
    vit = VisionTransformer("vit_nano", patch_size=4, img_size=32, n_registers=registers)
    crops = [
        torch.randn(3, 3, 32, 32),
        torch.randn(3, 3, 32, 32),
        torch.randn(3, 3, 16, 16),
        torch.randn(3, 3, 12, 12),
    ]
    masks = [torch.rand(3, 64) < 0.3, None, None, None]

    def run(packed):
        vit.pack_crops = packed
        vit.zero_grad()
        out = vit(crops, masks)
        sum(o["cls"].pow(2).sum() + o["patch"].sin().sum() for o in out).backward()
        return out, {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}

    per_res, grads = run(False)
    packed, packed_grads = run(True)
    for a, b in zip(per_res, packed):
        assert a["patch"].shape == b["patch"].shape
        torch.testing.assert_close(b["cls"], a["cls"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["patch"], a["patch"], atol=1e-5, rtol=1e-4)
    assert grads.keys() == packed_grads.keys()
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_packed_stochastic_depth_drops_whole_crops():
    torch.manual_seed(0)
    vit = VisionTransformer(
        "vit_nano", patch_size=4, img_size=16, drop_path=0.5, drop_path_schedule="uniform"
    )
    vit.pack_crops = True
    vit.train()
    out = vit([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)])  # runs; per-crop shapes kept
    assert out[0]["patch"].shape == (8, 16, 128) and out[1]["patch"].shape == (8, 4, 128)


def test_launcher_reuses_a_compiled_kernel_only_for_the_same_kind_of_call(monkeypatch):
    """Launcher's bookkeeping, with a stand-in for Triton's autotuned kernel (the real direct launches run
    in the GPU test): the first call of a kind goes through the kernel, later identical kinds launch the
    kept compiled kernel, with tensors passed as their addresses, the constexpr tail and the autotuned grid;
    any other integer, dtype, device type or pointer alignment is a new kind; missing internals switch the
    launcher back to the usual path for good."""
    pytest.importorskip("triton")
    from kernels.launch import Launcher

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args))

    class Tuned:  # what Triton's Autotuner offers: kernel[grid](...), arg_names, best_config
        arg_names = ["X", "n", "FLAG", "BLOCK_M"]
        best_config = type("Config", (), {"kwargs": {"BLOCK_M": 32}})()

        def __getitem__(self, grid):
            def run(*args, **constexprs):
                calls.append(("usual", grid({**constexprs, "BLOCK_M": 32}), args))
                return Compiled()

            return run

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launcher = Launcher(Tuned())
    launcher.direct = True  # as on a GPU
    x = torch.zeros(64)

    def grid(sequences):  # the grid counts sequences, which need not show in any argument
        return lambda meta: (100 // meta["BLOCK_M"] + 1, sequences)

    for _ in range(3):
        launcher(grid(6), (x,), (100,), {"FLAG": True})
    launcher(grid(2), (x,), (100,), {"FLAG": True})  # fewer sequences, same kind of call
    launcher(grid(6), (x,), (101,), {"FLAG": True})  # another integer
    launcher(grid(6), (x.double(),), (100,), {"FLAG": True})  # another dtype
    launcher(grid(6), (x[1:],), (100,), {"FLAG": True})  # another alignment (4 bytes off)

    class OnGPU:  # x as a CUDA tensor would present itself to the launcher
        dtype, is_cuda, data_ptr = x.dtype, True, x.data_ptr

    launcher(grid(6), (OnGPU(),), (100,), {"FLAG": True})  # same address and dtype, another device type
    assert [c[0] for c in calls] == ["usual", "direct", "direct", "direct"] + ["usual"] * 4
    _, grid_3d, args = calls[1]
    assert grid_3d == (4, 6, 1) and args == (x.data_ptr(), 100, True, 32)
    assert calls[3][1] == (4, 2, 1) and launcher.hits == 3

    class Bare(Tuned):  # a Triton without these internals
        best_config = None

    launcher = Launcher(Bare())
    launcher.direct = True
    calls.clear()
    for _ in range(2):
        launcher(grid(6), (x,), (100,), {"FLAG": True})
    assert [c[0] for c in calls] == ["usual", "usual"] and not launcher.direct
