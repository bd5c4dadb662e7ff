"""The fused first conv block (Conv1d on the waveform + channel LayerNorm + GELU) against its reference."""

from __future__ import annotations

import pytest
import torch

from spidr_fast.kernels import conv0 as c0
from spidr_fast.kernels.conv0 import conv0_layer_norm_gelu, conv0_layer_norm_gelu_ref
from spidr_fast.kernels.conv_frontend import is_channels_last
from tests.kernels.utils import assert_close_to_truth

NAMES = ("y", "grad_conv_weight", "grad_conv_bias", "grad_ln_weight", "grad_ln_bias")
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """fp32 convs in IEEE fp32 on both sides (on CUDA the fused dots and cuDNN's would otherwise run TF32)."""
    monkeypatch.setattr(c0, "conv_uses_tf32", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_inputs(B, S, C, K, conv_bias, affine, dtype, device):
    """A waveform with an offset (the LayerNorm's centring matters), parameters as leaves (None where absent)."""
    x = (torch.randn(B, S, device=device) + 0.3).to(dtype)
    params = [
        torch.randn(C, 1, K, device=device) * K**-0.5,
        torch.randn(C, device=device) * 0.5 if conv_bias else None,
        torch.randn(C, device=device) * 0.5 + 1 if affine else None,
        torch.randn(C, device=device) * 0.5 if affine else None,
    ]
    return x, [None if p is None else p.to(dtype).requires_grad_() for p in params]


def run(fn, x, params, stride, grad_y=None, dtype=None, **kw):
    """y and the gradients of sum(y * grad_y) w.r.t. the parameters (None where absent); grad_y: randn."""
    if dtype is not None:
        x = x.to(dtype)
        params = [None if p is None else p.detach().to(dtype).requires_grad_() for p in params]
    y = fn(x, *params, stride, **kw)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    present = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y.to(y.dtype)))
    return [y] + [None if p is None else next(grads) for p in params]


def assert_same(got, want, atol=1e-5, rtol=1e-5):
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=name)


CASES = {  # (B, S, C, K, stride, conv_bias, affine)
    "base-like": (2, 203, 24, 10, 5, False, True),  # the base first block's taps, S not a multiple of the stride
    "odd-C": (3, 57, 20, 10, 5, True, True),  # C not a power of two, a conv bias
    "no-affine": (1, 100, 40, 3, 2, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32(triton_backend, case):
    B, S, C, K, stride, conv_bias, affine = CASES[case]
    x, params = make_inputs(B, S, C, K, conv_bias, affine, torch.float32, triton_backend)
    assert_same(run(conv0_layer_norm_gelu, x, params, stride), run(conv0_layer_norm_gelu_ref, x, params, stride))


@pytest.mark.parametrize("case", ["base-like", "odd-C"])
def test_bf16(triton_backend, case):
    """bf16 waveform and parameters: the error against fp64 is at most twice PyTorch's own in bf16 (+ atol)."""
    B, S, C, K, stride, conv_bias, affine = CASES[case]
    x, params = make_inputs(B, S, C, K, conv_bias, affine, torch.bfloat16, triton_backend)
    got = run(conv0_layer_norm_gelu, x, params, stride)
    pt = run(conv0_layer_norm_gelu_ref, x, params, stride)
    truth = run(conv0_layer_norm_gelu_ref, x, params, stride, dtype=torch.float64)
    for name, g, p, t in zip(NAMES, got, pt, truth):
        if t is not None:
            assert g.dtype == p.dtype == torch.bfloat16 and g.shape == t.shape, name
            assert_close_to_truth(name, g, p, t, 1e-2)


def test_autocast(triton_backend):
    """The model under autocast: fp32 waveform and parameters, y in the autocast dtype (the conv's output dtype on
    the two-op path), fp32 parameter gradients close to the fp32 reference's."""
    x, params = make_inputs(2, 203, 24, 10, True, True, torch.float32, triton_backend)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        got = run(conv0_layer_norm_gelu, x, params, 5)
    want = run(conv0_layer_norm_gelu_ref, x, params, 5)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    assert_same([g.float() for g in got], want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("B", "S"), [(2, 9), (0, 57)])
def test_empty(triton_backend, B, S):
    """No frames (S shorter than the kernel: F.conv1d, the two-op path, refuses it) or no rows: an empty y, zero
    parameter gradients."""
    x, params = make_inputs(B, S, 12, 10, True, True, torch.float32, triton_backend)
    got = run(conv0_layer_norm_gelu, x, params, 5)
    assert got[0].shape == (B, 12, max(0, (S - 10) // 5 + 1))
    for g, p in zip(got[1:], params):
        assert torch.equal(g, torch.zeros_like(p))


def test_several_blocks_per_backward_program(triton_backend, monkeypatch):
    """Backward programs looping over several T blocks, the last ones past T (fully masked); bitwise reproducible."""
    monkeypatch.setattr(
        c0, "PARTIAL_ROWS", 3
    )  # T = 130 frames, 16 per block -> 9 blocks x 2 rows // 3 -> 6 per program
    x, params = make_inputs(2, 5 * 129 + 10, 20, 10, True, True, torch.float32, triton_backend)
    got = run(conv0_layer_norm_gelu, x, params, 5)
    assert_same(got, run(conv0_layer_norm_gelu_ref, x, params, 5))
    again = run(conv0_layer_norm_gelu, x, params, 5)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layout(triton_backend, channels_last):
    """The requested output layout (channels-last: what the next conv reads on CUDA), and a channels-last upstream
    gradient (what that conv's backward gives back)."""
    x, params = make_inputs(2, 203, 24, 10, False, True, torch.float32, triton_backend)
    grad_y = torch.randn(2, 39, 24, device=triton_backend).transpose(1, 2)
    got = run(conv0_layer_norm_gelu, x, params, 5, grad_y, channels_last=channels_last)
    assert is_channels_last(got[0]) == channels_last and got[0].is_contiguous() != channels_last
    assert_same(got, run(conv0_layer_norm_gelu_ref, x, params, 5, grad_y))


def test_waveform_gradient_takes_the_two_op_path(triton_backend):
    """The kernels give the waveform no gradient: a waveform that requires one runs conv + channel LayerNorm."""
    x, params = make_inputs(2, 203, 24, 10, False, True, torch.float32, triton_backend)
    x.requires_grad_()
    want = run(conv0_layer_norm_gelu_ref, x, params, 5)
    y = conv0_layer_norm_gelu(x, *params, 5)
    assert "conv0" not in type(y.grad_fn).__name__
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (gx_ref,) = torch.autograd.grad(conv0_layer_norm_gelu_ref(x, *params, 5), x, torch.ones_like(y))
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert_same(run(conv0_layer_norm_gelu, x, params, 5), want)


def test_dispatch(monkeypatch):
    """The fused op runs only where `use_fused(device, "conv0")` says so (SPIDR_FAST_REFERENCE_OPS=conv0: never)."""
    calls = []
    monkeypatch.setattr(c0, "_conv0_op", lambda *a: calls.append(a) or (torch.zeros(0),))
    x, params = make_inputs(1, 60, 8, 10, False, True, torch.float32, "cpu")
    monkeypatch.delenv("SPIDR_FAST_BACKEND", raising=False)
    want = conv0_layer_norm_gelu_ref(x, *params, 5)
    assert torch.equal(conv0_layer_norm_gelu(x, *params, 5), want) and not calls  # CPU default: reference
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "conv0")  # the two-op path (its LayerNorm + GELU fused)
    torch.testing.assert_close(conv0_layer_norm_gelu(x, *params, 5), want)
    assert not calls
    monkeypatch.delenv("SPIDR_FAST_REFERENCE_OPS")
    conv0_layer_norm_gelu(x, *params, 5)
    assert len(calls) == 1
    wide, wide_params = make_inputs(1, 60, c0.MAX_C + 1, 10, False, True, torch.float32, "cpu")
    conv0_layer_norm_gelu(wide, *wide_params, 5)  # wider than the kernels' columns: the two-op path
    assert len(calls) == 1
    with pytest.raises(ValueError, match="conv_weight"):
        conv0_layer_norm_gelu(x.unsqueeze(1), *params, 5)


def test_custom_op_registrations(triton_backend):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    x, params = make_inputs(2, 63, 20, 10, True, True, torch.float32, triton_backend)
    ops = torch.ops.spidr_fast
    for channels_last in (False, True):
        torch.library.opcheck(ops.conv0_layer_norm_gelu, (x, *params, 5, 1e-5, torch.float32, channels_last))
    torch.library.opcheck(ops.conv0_layer_norm_gelu, (x, params[0], None, None, None, 5, 1e-5, torch.float32, False))
    detached = [p.detach() for p in params]
    y, mean, rstd = ops.conv0_layer_norm_gelu(x, *detached, 5, 1e-5, torch.float32, True)
    dy = torch.randn_like(y)
    for dy_ in (dy, dy.contiguous()):  # channels-last and contiguous upstream gradients
        torch.library.opcheck(ops.conv0_layer_norm_gelu_backward, (dy_, x, *detached, mean, rstd, 5))
    torch.library.opcheck(ops.conv0_layer_norm_gelu_backward, (dy, x, detached[0], None, None, None, mean, rstd, 5))


def _extractor(mode):
    from spidr_fast.models.feature_extractor import ConvFeatureExtractor

    torch.manual_seed(0)
    fe = ConvFeatureExtractor([(16, 10, 5), (16, 3, 2)], mode, bias=False)
    for block in fe.conv_layers:  # non-trivial affine norms
        if block.layer_norm is not None:
            torch.nn.init.normal_(block.layer_norm.weight, 1.0, 0.3)
            torch.nn.init.normal_(block.layer_norm.bias, 0.0, 0.3)
    return fe


def _extractor_step(fe, wav):
    y = fe(wav)
    return [y, *torch.autograd.grad((y * y.detach().cos()).sum(), list(fe.parameters()))]


def test_feature_extractor(triton_backend, monkeypatch):
    """ConvFeatureExtractor (layer_norm mode) runs its first block through the fused op: outputs and parameter
    gradients equal the all-reference run's; torch.compile(fullgraph=True) traces it (no graph break)."""
    fe = _extractor("layer_norm").to(triton_backend)
    wav = torch.randn(2, 400, device=triton_backend)
    spy = []
    real_op = c0._conv0_op
    monkeypatch.setattr(c0, "_conv0_op", lambda *a: spy.append(1) or real_op(*a))
    got = _extractor_step(fe, wav)
    assert spy, "the first block did not run the fused op"
    torch._dynamo.reset()
    compiled = torch.compile(fe, fullgraph=True, backend="aot_eager", dynamic=False)
    assert_same(_extractor_step(compiled, wav), got, atol=1e-6, rtol=1e-6)
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    assert_same(_extractor_step(fe, wav), got)


def test_feature_extractor_group_norm_mode(triton_backend, monkeypatch):
    """group_norm mode (a GroupNorm over time in the first block) keeps the conv + GroupNorm + GELU path."""
    monkeypatch.setattr(c0, "_conv0_op", lambda *a: pytest.fail("the fused op ran in group_norm mode"))
    fe = _extractor("group_norm").to(triton_backend)
    wav = torch.randn(2, 400, device=triton_backend)
    got = _extractor_step(fe, wav)
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    assert_same(_extractor_step(fe, wav), got)


def conv0_specs(precision: str, C: int = 512, T: int = 47_999, S: int = 240_000) -> list[dict]:
    """Both kernels at the base shape (16 x 15 s, C = 512, no conv bias, affine LayerNorm, bf16 y and dy, both
    channels-last) with the launchers' tiles and dot precision `precision`, as `bench/sm90.py` specs; strides of 1
    specialise, as at a launch."""
    consts = {"K": 10, "STRIDE": 5, "HAS_CONV_BIAS": False, "HAS_WEIGHT": True, "HAS_BIAS": True}
    consts.update(c0._dot_args(10, torch.device("cuda"), torch.bfloat16), DOT_PRECISION=precision, cb_ptr=None)
    ptrs = {"x_ptr": "*fp32", "cw_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32"}
    ptrs["rstd_ptr"] = "*fp32"
    block_c, block_t, warps = c0._blocks(C, c0.FWD_TILE, c0.FWD_PER_THREAD)
    fwd = dict(ptrs, y_ptr="*bf16", C=C, T=T, s_xb=S, s_yb=T * C, s_yc=1, s_yt=C, eps="fp32")
    specs = [("fwd", "_wave_ln_gelu_fwd_kernel", dict(fwd, wm_ptr="*fp32"), {}, block_c, block_t, warps)]
    block_c, block_t, warps = c0._blocks(C, c0.BWD_TILE, c0.BWD_PER_THREAD)
    bwd = dict(ptrs, dy_ptr="*bf16", dcw_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32")
    bwd.update(C=C, T=T, ITERS=c0.MAX_ITERS, s_xb=S, s_dyb=T * C, s_dyc=1, s_dyt=C)
    specs.append(("bwd", "_wave_ln_gelu_bwd_kernel", bwd, {"dcb_ptr": None}, block_c, block_t, warps))
    return [
        {
            "name": name,
            "fn": f"spidr_fast.kernels.conv0:{fn}",
            "signature": sig,
            "constexprs": dict(consts, BLOCK_C=block_c, BLOCK_T=block_t, **extra),
            "num_warps": warps,
        }
        for name, fn, sig, extra, block_c, block_t, warps in specs
    ]


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_sm90_registers(precision):
    """Compiled for an H100 (no GPU needed, bench/sm90.py), with TF32 dots (autocast, or torch's default) and IEEE
    ones (fp32 training): the forward fits in 128 registers without spilling; TF32 runs both dots on tensor cores. The
    backward holds a (512, 16) tile per T block plus the conv weight's (512, 16) accumulator at 16 warps: it spills
    ~130 B a thread (L1-resident; to time on a GPU): bounded here."""
    from bench import sm90

    specs = conv0_specs(precision)
    results = sm90.compile_many(specs)
    if isinstance(results, str):
        pytest.skip(f"cannot compile for sm_90 here: {results}")
    fwd, bwd = results
    sm90.assert_fits("fwd", fwd, max_regs=128)
    tensor_core = [sm90.tensor_core_ops(r["sass_counts"]) > 0 for r in results]
    assert tensor_core == [precision == "tf32"] * 2
    print("bwd", {k: bwd[k] for k in ("regs", "stack", "shared")})
    assert bwd["regs"] <= 128 and bwd["stack"] <= 256, bwd


def test_tf32_setting_followed(monkeypatch):
    """The dots follow torch's fp32 conv setting (legacy flag or the fp32_precision API) for an fp32 y, and run TF32
    for a bf16 one (autocast, where the two-op path's conv is bf16); on CUDA only."""
    monkeypatch.undo()  # this test reads the real setting
    cudnn = torch.backends.cudnn
    saved = cudnn.allow_tf32
    try:
        for tf32 in (True, False):
            cudnn.allow_tf32 = tf32
            assert c0.conv_uses_tf32() is tf32
            precision = {dtype: c0._dot_args(10, torch.device("cuda"), dtype)["DOT_PRECISION"] for dtype in DTYPES}
            assert precision == {torch.float32: "tf32" if tf32 else "ieee", torch.bfloat16: "tf32"}  # bf16: autocast
            assert c0._dot_args(10, torch.device("cpu"), torch.bfloat16)["DOT_PRECISION"] == "ieee"
    finally:
        cudnn.allow_tf32 = saved


@pytest.mark.parametrize("conv_bias", [True, False])
def test_centred_conv_operands(conv_bias):
    """The forward's operands: centred weight @ patches + centred bias = u - mean_C(u) (0 in the padded rows and
    taps), and the mean filter gives mean_C(u)."""
    C, K, block_c, kp = 20, 10, 32, 16
    w, patches = torch.randn(C, 1, K, dtype=torch.float64), torch.randn(K, 7, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64) if conv_bias else None
    u = w.view(C, K) @ patches + (b[:, None] if conv_bias else 0)
    wc, cb, wm = c0._centred_conv(w, b, block_c, kp)
    assert wc.dtype == wm.dtype == torch.float32 and wc.shape == (block_c, kp) and wm.shape == (kp + 1,)
    assert not wc[C:].any() and not wc[:, K:].any() and not wm[K:kp].any()
    centred = wc[:C, :K].double() @ patches + (cb[:, None].double() if conv_bias else 0)
    torch.testing.assert_close(centred, u - u.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(wm[:K].double() @ patches + wm[kp], u.mean(0), atol=1e-5, rtol=0)
