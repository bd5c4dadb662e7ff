"""Fused positional-conv layer (grouped conv + LayerNorm + GELU + padding mask) against the reference:
outputs and the gradients of x, weight and bias."""

from __future__ import annotations

import pytest
import torch

from spidr_fast.kernels import pos_conv as pc
from spidr_fast.kernels.pos_conv import pos_conv_layer, pos_conv_layer_ref
from tests.kernels.conftest import DEVICE
from tests.kernels.utils import assert_close_to_truth

NAMES = ("y", "grad_x", "grad_weight", "grad_bias")


def make_inputs(B, T, D, groups, k, keep, dtype, device, bias=True):
    """x, weight, bias leaves (a weight scaled like nn.Conv1d's init), the keep mask and an upstream grad.

    keep: None, or "padded": rows of decreasing real lengths, the last row all padding when B > 1."""
    x = torch.randn(B, T, D, device=device) + 0.3
    weight = torch.randn(D, D // groups, k, device=device) / (D // groups * k) ** 0.5
    b = torch.randn(D, device=device) * 0.5 if bias else None
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in (x, weight, b)]
    mask = None
    if keep == "padded":
        lengths = torch.linspace(T, 0, B).round().long() if B > 1 else torch.full((B,), max(T - 1, 0))
        mask = torch.arange(T, device=device) < lengths.to(device)[:, None]  # (B, T)
    return leaves, mask, torch.randn(B, T, D, device=device).to(dtype)


def run(fn, leaves, keep, groups, grad_y, dtype=None):
    """y and the gradients of sum(y * grad_y) w.r.t. (x, weight, bias); None where there is no leaf."""
    if dtype is not None:
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in leaves]
        grad_y = grad_y.to(dtype)
    x, weight, bias = leaves
    y = fn(x, keep, weight, bias, groups)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y))
    return [y] + [None if t is None else next(grads) for t in leaves]


def reference(monkeypatch, *args, **kwargs):
    """`run` of the plain-PyTorch reference (its channel LayerNorm + GELU on its reference too)."""
    with monkeypatch.context() as m:
        m.setenv("SPIDR_FAST_BACKEND", "reference")
        return run(pos_conv_layer_ref, *args, **kwargs)


# (B, T, D, groups, k): odd and even k; groups 1/2/4; Cg = 12 (not a power of two), 4 (padded to 16) and 16;
# T = 1, T < k, T not a multiple of the 64-frame block (two blocks)
# k = 33: past the 31 taps whose input-frame validity the conv packs into one int32 a frame (the per-tap masks)
SHAPES = [(2, 70, 24, 2, 5), (2, 9, 48, 4, 4), (1, 1, 16, 1, 3), (3, 5, 24, 2, 8), (2, 13, 16, 4, 3)]
SHAPES += [(2, 40, 16, 2, 33)]


@pytest.mark.parametrize("keep", [None, "padded"])
@pytest.mark.parametrize(("B", "T", "D", "groups", "k"), SHAPES)
def test_fp32(triton_backend, monkeypatch, B, T, D, groups, k, keep):
    leaves, mask, grad_y = make_inputs(B, T, D, groups, k, keep, torch.float32, triton_backend)
    got = run(pos_conv_layer, leaves, mask, groups, grad_y)
    want = reference(monkeypatch, leaves, mask, groups, grad_y)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)
    if mask is not None:  # padded frames: zero out, zero input gradient
        assert not got[0][~mask].any() and not got[1][~mask].any()


@pytest.mark.parametrize(("B", "T", "D", "groups", "k"), [(2, 70, 24, 2, 5), (3, 9, 48, 4, 4)])
def test_bf16(triton_backend, monkeypatch, B, T, D, groups, k):
    """bf16: the kernel's error against fp64 is at most twice PyTorch's own at bf16 (+ atol)."""
    leaves, mask, grad_y = make_inputs(B, T, D, groups, k, "padded", torch.bfloat16, triton_backend)
    got = run(pos_conv_layer, leaves, mask, groups, grad_y)
    pt = reference(monkeypatch, leaves, mask, groups, grad_y)
    truth = reference(monkeypatch, leaves, mask, groups, grad_y, dtype=torch.float64)
    for name, g, p, t in zip(NAMES, got, pt, truth):
        assert g.dtype == p.dtype == torch.bfloat16 and g.shape == t.shape, name
        assert_close_to_truth(name, g, p, t, 2e-3)


def test_autocast_casts_to_the_compute_dtype(triton_backend, monkeypatch):
    """Under autocast (the training step), fp32 x and parameters: y in the autocast dtype, the parameter
    gradients in fp32, the values those of the reference on the bf16-cast inputs."""
    leaves, mask, grad_y = make_inputs(2, 20, 24, 2, 5, "padded", torch.float32, triton_backend)
    with torch.autocast(torch.device(triton_backend).type, dtype=torch.bfloat16):
        got = run(pos_conv_layer, leaves, mask, 2, grad_y.bfloat16())
    want = reference(monkeypatch, leaves, mask, 2, grad_y, dtype=torch.bfloat16)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=3e-2, rtol=3e-2, msg=name)


def test_no_bias(triton_backend, monkeypatch):
    leaves, mask, grad_y = make_inputs(2, 11, 24, 2, 3, "padded", torch.float32, triton_backend, bias=False)
    got = run(pos_conv_layer, leaves, mask, 2, grad_y)
    want = reference(monkeypatch, leaves, mask, 2, grad_y)
    assert got[3] is None
    for name, g, w in zip(NAMES[:3], got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("B", "T"), [(0, 5), (2, 0)])
def test_empty(triton_backend, B, T):
    leaves, mask, grad_y = make_inputs(B, T, 24, 2, 4, "padded", torch.float32, triton_backend)
    y, grad_x, grad_w, grad_b = run(pos_conv_layer, leaves, mask, 2, grad_y)
    assert y.shape == grad_x.shape == (B, T, 24)
    assert torch.equal(grad_w, torch.zeros_like(grad_w)) and torch.equal(grad_b, torch.zeros_like(grad_b))


def test_weight_gradient_chunks_deterministic(triton_backend, monkeypatch):
    """Weight-gradient programs looping over several (row, T block) pairs, the last past the end (masked);
    two runs are bitwise equal (fixed-order sums of the partials, no atomics)."""
    monkeypatch.setattr(pc, "BLOCK_T_DW", 16)  # B=2, T=70 -> 10 blocks
    monkeypatch.setattr(pc, "DW_PROGRAMS", 5 * 2 * 3)  # k * groups * 3 -> 3 chunks of 4 blocks
    leaves, mask, grad_y = make_inputs(2, 70, 24, 2, 5, "padded", torch.float32, triton_backend)
    first = run(pos_conv_layer, leaves, mask, 2, grad_y)
    second = run(pos_conv_layer, leaves, mask, 2, grad_y)
    want = reference(monkeypatch, leaves, mask, 2, grad_y)
    for name, a, b, w in zip(NAMES, first, second, want):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5, msg=name)


def test_dispatch(monkeypatch):
    """CPU default and SPIDR_FAST_BACKEND=reference run the reference (bitwise); so do groups wider than
    MAX_CG channels when the fused path is forced; bad arguments are named."""
    leaves, mask, _ = make_inputs(2, 9, 24, 2, 5, "padded", torch.float32, "cpu")
    want = pos_conv_layer_ref(*leaves[:1], mask, *leaves[1:], 2)
    monkeypatch.delenv("SPIDR_FAST_BACKEND", raising=False)
    assert torch.equal(pos_conv_layer(leaves[0], mask, *leaves[1:], 2), want)
    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "pos_conv")
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    launch = pc._fwd_launch
    monkeypatch.setattr(pc, "_fwd_launch", lambda *a: pytest.fail("fused path ran"))
    want = pos_conv_layer_ref(*leaves[:1], mask, *leaves[1:], 2)  # its channel LayerNorm now on Triton
    assert torch.equal(pos_conv_layer(leaves[0], mask, *leaves[1:], 2), want)
    monkeypatch.delenv("SPIDR_FAST_REFERENCE_OPS")
    wide = [
        torch.randn(1, 3, pc.MAX_CG + 1, device=DEVICE),
        torch.randn(pc.MAX_CG + 1, pc.MAX_CG + 1, 3, device=DEVICE),
    ]
    assert torch.equal(
        pos_conv_layer(*wide[:1], None, wide[1], None, 1), pos_conv_layer_ref(*wide[:1], None, wide[1], None, 1)
    )
    monkeypatch.setattr(pc, "_fwd_launch", launch)
    x, weight, bias = leaves
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, D\)"):
        pos_conv_layer(x[0], None, weight, bias, 2)
    with pytest.raises(ValueError, match="weight must have shape"):
        pos_conv_layer(x, None, weight, bias, 3)
    with pytest.raises(ValueError, match="keep must be"):
        pos_conv_layer(x, mask.float(), weight, bias, 2)
    with pytest.raises(ValueError, match="bias must have shape"):
        pos_conv_layer(x, None, weight, bias[:5], 2)


def test_custom_op_registrations(triton_backend):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    leaves, mask, grad_y = make_inputs(2, 9, 24, 2, 4, "padded", torch.float32, triton_backend)
    x, weight, bias = leaves
    ops = torch.ops.spidr_fast
    torch.library.opcheck(ops.pos_conv, (x, mask, weight, bias, 1e-5))
    torch.library.opcheck(ops.pos_conv, (x, None, weight, None, 1e-5))
    x, weight = x.detach(), weight.detach()  # the backward op has no autograd formula of its own
    _, u, mean, rstd = ops.pos_conv(x, mask, weight, bias.detach(), 1e-5)
    torch.library.opcheck(ops.pos_conv_backward, (grad_y, x, mask, weight, u, mean, rstd, True))
    torch.library.opcheck(ops.pos_conv_backward, (grad_y, x, None, weight, u, mean, rstd, False))


@pytest.mark.parametrize("padded", [False, True])
def test_module_fullgraph_compile(triton_backend, monkeypatch, padded):
    """ConvPositionalEmbedding (even 4-tap kernel, 2 layers) compiled with fullgraph=True: one graph that calls
    the fused op, no graph break; outputs and gradients equal eager's and the reference path's."""
    from spidr_fast.kernels.attention import Padding
    from spidr_fast.models.transformer import ConvPositionalEmbedding

    torch._dynamo.reset()
    pos = ConvPositionalEmbedding(embed_dim=32, kernel_size=8, groups=4, depth=2).to(triton_backend)
    x = torch.randn(2, 23, 32, device=triton_backend, requires_grad=True)
    mask = torch.arange(23, device=triton_backend) < torch.tensor([[23], [15]], device=triton_backend)
    fn = (lambda x, mask: pos(x, Padding(mask))) if padded else (lambda x, mask: pos(x))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, fullgraph=True, backend=capture, dynamic=False)(x, mask)
    assert len(graphs) == 1
    assert torch.ops.spidr_fast.pos_conv.default in {n.target for n in graphs[0].graph.nodes}
    params = [x, *pos.parameters()]
    results = []
    for backend, compiled in (("triton", True), ("triton", False), ("reference", False)):
        monkeypatch.setenv("SPIDR_FAST_BACKEND", backend)
        torch._dynamo.reset()
        f = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False) if compiled else fn
        y = f(x, mask)
        results.append([y, *torch.autograd.grad((y * y.detach().cos()).sum(), params)])
    for got in results[:2]:
        for g, w in zip(got, results[2]):  # parameter gradients up to ~30: fp32 rounding of the reference ~1e-5
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_trainer_flop_count(triton_backend):
    """The trainer's counter (spidr_fast/train/flops.py) sees the opaque fused op as the conv it is: 2 B T D Cg k
    forward, twice that backward (grad_x and grad_weight), as it counts the reference's convs."""
    from spidr_fast.train.flops import step_flop_counter

    B, T, D, groups, k = 2, 13, 24, 2, 5
    leaves, mask, grad_y = make_inputs(B, T, D, groups, k, "padded", torch.float32, triton_backend)
    counter = step_flop_counter()
    with counter:
        run(pos_conv_layer, leaves, mask, groups, grad_y)
    assert counter.get_total_flops() == 3 * 2 * B * T * D * (D // groups) * k


def pos_conv_specs(dtype: str) -> list[dict]:
    """The three kernels with the tiles their launchers pick at the base shapes (D=768, 16 groups, k=19,
    T=749), as `bench/sm90.py` specs."""
    import inspect

    D, CG, K, T = 768, 48, 19, 749
    common = {"DOT_FP32": dtype == "fp32", "INPUT_PRECISION": "tf32"}
    conv = {"K": K, "BLOCK_T": pc.BLOCK_T_CONV, "BLOCK_C": 64, "MASK_IN": True, "MASK_OUT": True, **common}
    conv["BLOCK_D"] = pc.BLOCK_D_NORM
    ln_bwd = pc.ln_bwd_config(D, T)
    ln_warps = ln_bwd.pop("num_warps")
    cases = [
        ("fwd", pc._pos_conv_kernel, dict(conv, PAD=K // 2, NORM=True, HAS_BIAS=True), pc.NUM_WARPS_CONV),
        # the input gradient's conv reads dz unmasked (its launcher: mask_in=False)
        (
            "dx",
            pc._pos_conv_kernel,
            dict(conv, PAD=K - 1 - K // 2, NORM=False, HAS_BIAS=False, MASK_IN=False),
            pc.NUM_WARPS_CONV,
        ),
        ("ln_bwd", pc._pos_conv_ln_gelu_bwd_kernel, dict(ln_bwd, HAS_KEEP=True), ln_warps),
        (
            "dw",
            pc._pos_conv_dw_kernel,
            {"K": K, "PAD": K // 2, "MASK_IN": True, "BLOCK_T": pc.BLOCK_T_DW, "BLOCK_C": 64, **common},
            4,
        ),
    ]
    specs = []
    for name, fn, consts, warps in cases:
        fn = getattr(fn, "fn", fn)  # the plain function, also once jitted (interpreter) by an earlier test
        params = inspect.signature(fn).parameters
        consts = {p: v for p, v in consts.items() if p in params}
        sig = {}
        for p in params:
            if p in consts:
                continue
            if p == "keep_ptr":
                sig[p] = "*u8"
            elif p in ("x_ptr", "out_ptr", "u_ptr", "dy_ptr", "dz_ptr", "w_ptr", "bias_ptr"):
                sig[p] = "*" + dtype
            elif p.endswith("_ptr"):
                sig[p] = "*fp32"
            else:
                sig[p] = {"T": T, "D": D, "G": D // CG, "CG": CG}.get(p, "fp32" if p == "eps" else "i32")
        specs.append({"name": name, "fn": fn, "signature": sig, "constexprs": consts, "num_warps": warps})
    return specs


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sm90_cubins_do_not_spill(dtype):
    """Compile the kernels for an H100 (no GPU needed: triton's bundled ptxas) and read their register use:
    spills are invisible to the interpreter. In a child process (bench/sm90.py)."""
    from bench import sm90

    specs = pos_conv_specs(dtype)
    results = sm90.compile_many(specs)
    if isinstance(results, str):
        pytest.skip(f"cannot compile for sm_90 here: {results}")
    for spec, usage in zip(specs, results):
        sm90.assert_fits(spec["name"], usage, max_regs=255)
        if dtype == "bf16" and spec["name"] in ("fwd", "dx", "dw"):
            assert sm90.tensor_core_ops(usage["sass_counts"]) > 0, spec["name"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "T", "keep"), [(4, 749, None), (3, 333, "padded")])
def test_gpu_base_shape(triton_backend, monkeypatch, B, T, keep, dtype):
    """The base config's layer (D=768, 16 groups, k=19) on a GPU: within twice PyTorch's error at the dtype
    (cuDNN's fp32 conv runs TF32, as the kernel then does)."""
    leaves, mask, grad_y = make_inputs(B, T, 768, 16, 19, keep, dtype, triton_backend)
    got = run(pos_conv_layer, leaves, mask, 16, grad_y)
    pt = reference(monkeypatch, leaves, mask, 16, grad_y)
    truth = reference(monkeypatch, leaves, mask, 16, grad_y, dtype=torch.float64)
    for name, g, p, t in zip(NAMES, got, pt, truth):
        assert_close_to_truth(name, g, p, t, 1e-3)


def test_dot_precision_reads_the_conv_setting_through_either_torch_api():
    """An fp32 CUDA input runs its dots in TF32 exactly where cuDNN would run the fp32 conv in TF32, read as
    `conv0.conv_uses_tf32` reads it: with cuDNN's conv and rnn precisions set apart by the fp32_precision API,
    torch refuses the legacy `cudnn.allow_tf32` read (the launcher raised before)."""
    from types import SimpleNamespace

    from spidr_fast.kernels import pos_conv

    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv") or not hasattr(cudnn.conv, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flag")
    cuda_fp32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    saved = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision
    try:
        for conv, want in (("tf32", "tf32"), ("ieee", "ieee")):
            cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = conv, "ieee" if conv == "tf32" else "tf32"
            assert pos_conv._dot_config(cuda_fp32)["INPUT_PRECISION"] == want
        assert pos_conv._dot_config(SimpleNamespace(is_cuda=False, dtype=torch.float32))["INPUT_PRECISION"] == "ieee"
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved
