"""kernels/attention.py: the Triton kernels against attention_ref (on CPU through the Triton interpreter, on
GPU when present), packed against per-sequence, the dispatcher, and the ViT's packed multi-crop path."""

import os

import pytest
import torch

from conftest import CUDA
from minidino.config import ModelConfig
from minidino.kernels.attention import (
    attention,
    attention_qkv,
    attention_ref,
    attention_varlen,
    attention_varlen_torch,
    packed_offsets,
)
from minidino.packing import Packing
from minidino.vit import Attention, VisionTransformer

# Tolerances on max |error| relative to (1 + max |reference|): fp32 products are exact fp32 ("ieee"), 16-bit
# inputs round the probabilities to 16 bits before the product with v (as every flash kernel does).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPES = [(2, 2, 37, 32), (1, 3, 17, 64), (1, 1, 5, 128)]  # (B, H, N, D)
if CUDA:  # ViT sizes too; (2, 6, 197, 64) after (4, ...): the same kind of call with fewer sequences
    SHAPES += [(4, 6, 197, 64), (2, 6, 197, 64), (2, 16, 257, 64), (1, 12, 1370, 64), (3, 4, 50, 128)]
    SHAPES += [(5, 3, 65, 32)]
LENGTHS = [37, 37, 17, 5, 17, 1] + ([197, 197, 37, 37, 37, 257] if CUDA else [])  # packed sequences


def close(got, want, what: str) -> None:
    tol = TOL[got.dtype] * (1 + want.float().abs().max().item())
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({tuple(got.shape)}, {got.dtype})"


def fused_qkv(shape, dtype, device):
    """q, k, v as the strided views a fused qkv projection gives: (B, N, 3, H, D) -> three (B, H, N, D)."""
    B, H, N, D = shape
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    return qkv, [t.transpose(1, 2) for t in qkv.unbind(2)]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", TOL, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_kernels_match_the_reference(shape, dtype, kernel_device):
    torch.manual_seed(0)
    qkv, (q, k, v) = fused_qkv(shape, dtype, kernel_device)
    ref = attention_ref(q.float(), k.float(), v.float())
    go = torch.randn_like(ref).to(dtype)
    want = torch.autograd.grad(ref, (q, k, v), go.float())
    for call in range(2 if CUDA else 1):  # on GPU the second call launches the cached compiled kernels
        out = attention(q, k, v, impl="triton")
        close(out, ref, f"forward (call {call + 1})")
        for g, w, name in zip(torch.autograd.grad(out, (q, k, v), go), want, "qkv"):
            close(g, w, f"grad {name} (call {call + 1})")
    # contiguous inputs take the same kernels with other strides
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    close(attention(qc, kc, vc, impl="triton"), ref, "forward (contiguous)")
    # the fused entry point: qkv in, (B, N, H, D) out, one gradient for qkv
    out = attention_qkv(qkv, impl="triton")
    close(out.transpose(1, 2), ref, "forward (fused qkv)")
    got = torch.autograd.grad(out, qkv, go.transpose(1, 2))[0]
    close(got, torch.stack([w.transpose(1, 2) for w in want], 2), "grad (fused qkv)")  # (B, N, 3, H, D)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", TOL, ids=str)
def test_odd_layouts_and_the_fused_gradient_path(dtype, kernel_device):
    torch.manual_seed(0)
    qkv, (q, k, v) = fused_qkv(SHAPES[0], dtype, kernel_device)
    ref = attention_ref(q.float(), k.float(), v.float())
    out = attention(q, k, v, impl="triton")
    go = torch.randn_like(out)
    want = torch.autograd.grad(ref, (q, k, v), go.float(), retain_graph=True)
    # output gradients in other layouts: d not contiguous, and broadcast (the gradient of out.sum())
    odd = go.transpose(-1, -2).contiguous().transpose(-1, -2)
    for g, w, name in zip(torch.autograd.grad(out, (q, k, v), odd, retain_graph=True), want, "qkv"):
        close(g, w, "grad (d-strided dout) " + name)
    got = torch.autograd.grad(out.float().sum(), (q, k, v))
    for g, w, name in zip(got, torch.autograd.grad(ref.sum(), (q, k, v)), "qkv"):
        close(g, w, "grad (broadcast dout) " + name)
    # the fused qkv gradient reaches qkv straight from the kernels' node: no unbind/stack in between
    nodes, fn = [], attention_qkv(qkv, impl="triton").grad_fn
    while fn is not None:
        nodes.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert nodes[-1] == "AccumulateGrad" and not any("Unbind" in n or "Stack" in n for n in nodes), nodes
    # a qkv whose d axis is not contiguous is copied first, with the same results
    odd = qkv.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    close(attention_qkv(odd, impl="triton").transpose(1, 2), ref, "forward (d-strided qkv)")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", TOL, ids=str)
def test_packed_kernels_equal_each_sequence_alone(dtype, kernel_device):
    """Sequences of mixed lengths in one launch equal each sequence through the dense kernel."""
    torch.manual_seed(0)
    cu, longest = packed_offsets(LENGTHS, kernel_device)
    T = sum(LENGTHS)
    q, k, v = (torch.randn(T, 3, 32, device=kernel_device, dtype=dtype).requires_grad_() for _ in range(3))
    out = attention_varlen(q, k, v, cu, longest, impl="triton")
    ref = attention_varlen_torch(q.float(), k.float(), v.float(), cu, impl="ref")
    close(out, ref, "packed forward")
    starts = cu.tolist()
    for i in range(len(LENGTHS)):
        one = [t[starts[i] : starts[i + 1]].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, n, D)
        close(
            out[starts[i] : starts[i + 1]], attention(*one, impl="triton")[0].transpose(0, 1), f"sequence {i}"
        )
    go = torch.randn_like(out)
    want = torch.autograd.grad(ref, (q, k, v), go.float())
    for g, w, name in zip(torch.autograd.grad(out, (q, k, v), go), want, "qkv"):
        close(g, w, "packed grad " + name)
    qkv = torch.stack((q, k, v), 1).detach().requires_grad_()  # (T, 3, H, D)
    out = attention_qkv(qkv, "triton", cu, longest)
    close(out, ref, "packed forward (fused qkv)")
    close(torch.autograd.grad(out, qkv, go)[0], torch.stack(want, 1), "packed grad (fused qkv)")


@pytest.mark.triton
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_launches_are_cached_and_devices_checked(kernel_device):
    from minidino.kernels.attention_host import KERNELS  # the launchers attention.py handed over

    q = torch.randn(1, 2, 17, 32, device=kernel_device, requires_grad=True)
    for _ in range(2):
        attention(q, q, q, impl="triton").sum().backward()
    assert len(KERNELS) == 3 and all(launcher.hits > 0 for launcher in KERNELS.values()), (
        "cached launches never ran"
    )
    # cached launches pass raw addresses, so the dispatcher must refuse a CPU tensor among CUDA ones
    with pytest.raises(ValueError, match="one device"):
        attention(q, q.cpu(), q, impl="triton")


@pytest.mark.triton
@pytest.mark.parametrize(
    "packed, pos_embed",
    [(False, "learned"), (True, "learned"), (True, "rope")],
    ids=["dense", "packed", "rope"],
)
def test_vit_with_triton_attention_equals_sdpa(packed, pos_embed, kernel_device):
    """With RoPE (DINOv3) q and k are rotated before the kernel; the packed case needs a table per token,
    the harder one, so it is the RoPE case here (the dense path is tested with RoPE in test_rope.py)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_nano", patch_size=8, img_size=32, drop_path=0.0, pos_embed=pos_embed)
    cfg.n_registers = 2 if pos_embed == "rope" else 0
    vit = VisionTransformer(cfg).to(kernel_device)
    crops = [torch.randn(2, 3, 32, 32, device=kernel_device), torch.randn(2, 3, 16, 16, device=kernel_device)]

    def run(impl: str, pack: bool):
        vit.set_attn_impl(impl)
        vit.pack_crops = pack
        vit.zero_grad()
        out = vit(crops)
        sum((o["cls"] ** 2).sum() + o["patch"].sum() for o in out).backward()
        grads = [p.grad.clone() for p in vit.parameters() if p.grad is not None]
        return [o[k] for o in out for k in ("cls", "patch")] + grads

    got, want = run("triton", packed), run("sdpa", False)
    n_out = 2 * len(crops)  # the outputs: (cls, patch) of each crop size; the gradients follow
    for g, w in zip(got[:n_out], want[:n_out]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # the gradients of cls_token and pos_embed sum over every image and token: fp32 accumulation in another
    # order differs by up to 1.4e-4 on values of 0.07 on some CPUs (the interpreter's tiles vs SDPA's math);
    # the register tokens' gradients (RoPE case) by up to 6e-4 on values of 0.06
    for g, w in zip(got[n_out:], want[n_out:]):
        torch.testing.assert_close(g, w, atol=1e-3 if pos_embed == "rope" else 5e-4, rtol=1e-3)


@pytest.mark.triton
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_compiled_attention_keeps_the_triton_call_in_its_graph(packed, kernel_device):
    """torch.compile sees the Triton path as one custom operator (forward and backward): no graph break
    (fullgraph), the same outputs and gradients as SDPA. CPU: dynamo + AOTAutograd (no C++ compiler
    needed); GPU: inductor, with the kernels inside its graph."""
    torch.manual_seed(0)
    m = Attention(64, 2, "triton").to(kernel_device)
    ref = Attention(64, 2, "sdpa").to(kernel_device)
    ref.load_state_dict(m.state_dict())
    packing = Packing.from_lengths([17, 17, 5, 5, 5], kernel_device) if packed else None
    x = torch.randn((49, 64) if packed else (3, 17, 64), device=kernel_device, requires_grad=True)
    backend = "inductor" if CUDA else "aot_eager"
    out = torch.compile(lambda x: m(x, packing=packing), backend=backend, fullgraph=True)(x)
    want = ref(x, packing=packing)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    got = torch.autograd.grad((out * want.detach()).sum(), [x, *m.parameters()])
    for g, w in zip(got, torch.autograd.grad((want * want.detach()).sum(), [x, *ref.parameters()])):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


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
    vit = VisionTransformer(
        ModelConfig(arch="vit_nano", patch_size=4, img_size=32, n_registers=registers, drop_path=0.0)
    )
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
        ModelConfig(arch="vit_nano", patch_size=4, img_size=16, drop_path=0.5, drop_path_schedule="uniform")
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
    from minidino.kernels.launch import Launcher

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
