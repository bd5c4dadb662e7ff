"""Fused channel LayerNorm + GELU (forward, backward, parameter gradients) against the reference."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from spidr_fast.kernels import conv_frontend as cf
from spidr_fast.kernels.conv_frontend import channel_layer_norm_gelu, channel_layer_norm_gelu_ref
from tests.kernels.conftest import DEVICE
from tests.kernels.utils import assert_close_to_truth

ATOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4}
NAMES = ("y", "grad_x", "grad_weight", "grad_bias")

if TYPE_CHECKING:
    import triton.language as tl


def make_inputs(B, C, T, affine, dtype, device):
    """x with a non-zero mean (the centring matters), an affine with scales around 1, an upstream grad."""
    x = torch.randn(B, C, T, device=device) * 2 + 0.5
    weight = torch.randn(C, device=device) * 0.5 + 1 if affine else None
    bias = torch.randn(C, device=device) * 0.5 if affine else None
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in (x, weight, bias)]
    return leaves, torch.randn(B, C, T, device=device).to(dtype)


def run(fn, leaves, grad_y, dtype=None):
    """y and the gradients of sum(y * grad_y) w.r.t. (x, weight, bias); None where there is no leaf."""
    if dtype is not None:
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in leaves]
        grad_y = grad_y.to(dtype)
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y))
    return [y] + [None if t is None else next(grads) for t in leaves]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 7, 130])
@pytest.mark.parametrize("C", [16, 59, 512])
def test_fp32(triton_backend, C, T, B, affine):
    """y and grad_x within 1e-5 of torch's fp32; grad_weight and grad_bias (sums over B T frames, where two fp32
    summation orders can differ by more: torch's own error reaches ~1e-5 relative) within twice torch's fp32 error
    of float64 (+ 1e-5)."""
    leaves, grad_y = make_inputs(B, C, T, affine, torch.float32, triton_backend)
    got = run(channel_layer_norm_gelu, leaves, grad_y)
    want = run(channel_layer_norm_gelu_ref, leaves, grad_y)
    truth = run(channel_layer_norm_gelu_ref, leaves, grad_y, dtype=torch.float64)
    for name, g, w, t in zip(NAMES, got, want, truth):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if name in ("grad_weight", "grad_bias"):
            assert_close_to_truth(name, g.double(), w.double(), t, atol=1e-5)
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("T", [1, 7, 130])
@pytest.mark.parametrize("C", [16, 59, 512])
def test_low_precision(triton_backend, C, T, affine, dtype, B=3):
    """bf16/fp16: the kernel's error against fp64 is at most twice PyTorch's own at that dtype (+ atol)."""
    leaves, grad_y = make_inputs(B, C, T, affine, dtype, triton_backend)
    got = run(channel_layer_norm_gelu, leaves, grad_y)
    pt = run(channel_layer_norm_gelu_ref, leaves, grad_y)
    truth = run(channel_layer_norm_gelu_ref, leaves, grad_y, dtype=torch.float64)
    for name, g, p, t in zip(NAMES, got, pt, truth):
        if t is None:
            continue
        assert g.dtype == p.dtype == dtype and g.shape == t.shape, name
        assert_close_to_truth(name, g, p, t, ATOL[dtype])


def test_bf16_input_fp32_parameters(triton_backend):
    """The model under autocast: a bf16 conv output with the fp32 LayerNorm parameters.

    y comes back in bf16 (one rounding of the fp32 result), the parameter gradients in fp32."""
    leaves, grad_y = make_inputs(3, 59, 40, True, torch.float32, triton_backend)
    x16 = leaves[0].detach().bfloat16().requires_grad_()
    got = run(channel_layer_norm_gelu, [x16, *leaves[1:]], grad_y.bfloat16())
    want = run(channel_layer_norm_gelu_ref, [x16.detach().float().requires_grad_(), *leaves[1:]], grad_y.bfloat16())
    assert [g.dtype for g in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=1e-2, msg=name)


@pytest.mark.parametrize(("B", "T"), [(2, 0), (0, 5)])
def test_empty(triton_backend, B, T):
    leaves, grad_y = make_inputs(B, 24, T, True, torch.float32, triton_backend)
    y, grad_x, grad_w, grad_b = run(channel_layer_norm_gelu, leaves, grad_y)
    assert y.shape == grad_x.shape == (B, 24, T)
    zeros = torch.zeros(24, device=triton_backend)
    assert torch.equal(grad_w, zeros) and torch.equal(grad_b, zeros)


def test_several_blocks_per_backward_program(triton_backend, monkeypatch):
    """Backward programs looping over several T blocks, the last ones past T (fully masked)."""
    monkeypatch.setattr(cf, "MAX_BLOCK_T", 16)  # T=130 -> 9 blocks
    monkeypatch.setattr(cf, "PARTIAL_ROWS", 4)  # 2 batches x 9 blocks // 4 -> 4 blocks per program
    leaves, grad_y = make_inputs(2, 59, 130, True, torch.float32, triton_backend)
    got = run(channel_layer_norm_gelu, leaves, grad_y)
    want = run(channel_layer_norm_gelu_ref, leaves, grad_y)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def test_strided_inputs(triton_backend):
    """x sliced along T (the positional conv drops its last frame) and a transposed upstream gradient."""
    leaves, _ = make_inputs(2, 40, 31, True, torch.float32, triton_backend)
    base = leaves[0]
    x = base[..., :-1]  # (B, C, T - 1) with stride(1) = T
    grad_y = torch.randn(2, 30, 40, device=triton_backend).transpose(1, 2)  # (B, C, T - 1), stride 1 along C
    got = run(lambda x, w, b: channel_layer_norm_gelu(x, w, b), [x, *leaves[1:]], grad_y)
    want = run(lambda x, w, b: channel_layer_norm_gelu_ref(x, w, b), [x, *leaves[1:]], grad_y)
    assert got[0].is_contiguous()
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def _channels_last(t):
    """The same values stored as (B, T, C)."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("out_channels_last", [False, True])
def test_channels_last(triton_backend, x_layout, out_channels_last):
    """Channels-last input and/or output (the front-end on CUDA): the reference's values and gradients, the
    requested output layout, and grad_x in x's layout (what the conv backward before it reads)."""
    leaves, grad_y = make_inputs(2, 40, 31, True, torch.float32, triton_backend)
    x = _channels_last(leaves[0]) if x_layout == "channels_last" else leaves[0]
    grad_y = _channels_last(grad_y) if out_channels_last else grad_y
    fn = lambda x, w, b: channel_layer_norm_gelu(x, w, b, channels_last=out_channels_last)
    got = run(fn, [x, *leaves[1:]], grad_y)
    want = run(channel_layer_norm_gelu_ref, [x, *leaves[1:]], grad_y)
    assert cf.is_channels_last(got[0]) == out_channels_last and got[0].is_contiguous() != out_channels_last
    assert cf.is_channels_last(got[1]) == (x_layout == "channels_last")
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)
    default = channel_layer_norm_gelu(x.detach(), *leaves[1:])  # None: x's layout
    assert cf.is_channels_last(default) == (x_layout == "channels_last")


def test_deterministic(triton_backend, monkeypatch):
    monkeypatch.setattr(cf, "PARTIAL_ROWS", 2)
    leaves, grad_y = make_inputs(3, 59, 130, True, torch.float32, triton_backend)
    first = run(channel_layer_norm_gelu, leaves, grad_y)
    second = run(channel_layer_norm_gelu, leaves, grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dispatch(monkeypatch):
    """CPU default and SPIDR_FAST_BACKEND=reference run the reference (bitwise); so does C > MAX_C."""
    leaves, _ = make_inputs(2, 20, 9, True, torch.float32, "cpu")
    want = channel_layer_norm_gelu_ref(*leaves)
    monkeypatch.delenv("SPIDR_FAST_BACKEND", raising=False)
    assert torch.equal(channel_layer_norm_gelu(*leaves), want)
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    assert torch.equal(channel_layer_norm_gelu(*leaves), want)
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "triton")  # on CPU tensors only under the interpreter: DEVICE
    wide, _ = make_inputs(1, cf.MAX_C + 1, 2, False, torch.float32, DEVICE)
    assert torch.equal(channel_layer_norm_gelu(wide[0]), channel_layer_norm_gelu_ref(wide[0]))
    with pytest.raises(ValueError, match="B, C, T"):
        channel_layer_norm_gelu(torch.zeros(3, 4))


@pytest.mark.parametrize("affine", [True, False])
def test_fullgraph_compile(triton_backend, affine):
    torch._dynamo.reset()
    leaves, grad_y = make_inputs(2, 59, 9, affine, torch.float32, triton_backend)
    compiled = torch.compile(channel_layer_norm_gelu, fullgraph=True, backend="aot_eager", dynamic=False)
    got = run(compiled, leaves, grad_y)
    want = run(channel_layer_norm_gelu, leaves, grad_y)
    for name, g, w in zip(NAMES, got, want):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=name)


def test_custom_op_registrations(triton_backend):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    leaves, grad_y = make_inputs(2, 20, 9, True, torch.float32, triton_backend)
    x, weight, bias = leaves
    ops = torch.ops.spidr_fast
    for channels_last in (False, True):
        torch.library.opcheck(ops.channel_layer_norm_gelu, (x, weight, bias, 1e-5, channels_last))
        torch.library.opcheck(ops.channel_layer_norm_gelu, (x, None, None, 1e-5, channels_last))
    x, weight, bias = (t.detach() for t in leaves)  # the backward op has no autograd formula of its own
    _, mean, rstd = ops.channel_layer_norm_gelu(x, weight, bias, 1e-5, False)
    x_cl = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels-last x: grad_x takes its layout
    for x_, dy in ((x, grad_y), (x_cl, grad_y), (x, grad_y.transpose(1, 2).contiguous().transpose(1, 2))):
        torch.library.opcheck(ops.channel_layer_norm_gelu_backward, (dy, x_, weight, bias, mean, rstd))
        torch.library.opcheck(ops.channel_layer_norm_gelu_backward, (dy, x_, None, None, mean, rstd))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("B", "C", "T", "affine"), [(4, 512, 16_000, True), (2, 768, 1500, False), (3, 1024, 333, True)]
)
def test_gpu_grid(triton_backend, B, C, T, affine, dtype):
    if dtype == torch.float32:
        test_fp32(triton_backend, C, T, B, affine)
    else:
        test_low_precision(triton_backend, C, T, affine, dtype, B)


def test_model_call_sites(triton_backend, monkeypatch):
    """ConvBlock (affine channel LayerNorm) and ConvPositionalEmbedding (no affine, even kernel: a sliced,
    strided conv output) give the same outputs and gradients on the fused path as on the reference path."""
    from spidr_fast.models.feature_extractor import ConvBlock
    from spidr_fast.models.transformer import ConvPositionalEmbedding

    monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "pos_conv")  # the fused pos-conv layer has no such call site
    block = ConvBlock(1, 24, 10, 5, "layer_norm", bias=False).to(triton_backend)
    pos = ConvPositionalEmbedding(embed_dim=32, kernel_size=8, groups=4, depth=2).to(triton_backend)  # 4-tap convs
    inputs = [torch.randn(2, 1, 203, device=triton_backend), torch.randn(2, 37, 32, device=triton_backend)]
    for module, x in zip([block, pos], inputs):
        x.requires_grad_()
        params = [x, *module.parameters()]
        results = []
        for backend in ("triton", "reference"):
            monkeypatch.setenv("SPIDR_FAST_BACKEND", backend)
            y = module(x)
            results.append([y, *torch.autograd.grad((y * y.detach().cos()).sum(), params)])
        for g, w in zip(*results):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_feature_extractor_channels_last(triton_backend, monkeypatch, layout):
    """The fused front-end hands its blocks channels-last tensors (SPIDR_FAST_REFERENCE_OPS=frontend_layout:
    channels-first): fp32 outputs and gradients equal the reference path's; with channels-last the (B, T, C)
    output is contiguous (the projection's LayerNorm reads it without a copy)."""
    from spidr_fast.models.feature_extractor import ConvFeatureExtractor

    torch.manual_seed(0)
    fe = ConvFeatureExtractor([(16, 10, 5), (16, 3, 2), (16, 2, 2)], "layer_norm", bias=False)
    for block in fe.conv_layers:  # non-trivial affine LayerNorms
        torch.nn.init.normal_(block.layer_norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(block.layer_norm.bias, 0.0, 0.3)
    fe = fe.to(triton_backend)
    wav = torch.randn(2, 400, device=triton_backend, requires_grad=True)
    params = [wav, *fe.parameters()]
    if layout == "channels_first":
        monkeypatch.setenv("SPIDR_FAST_REFERENCE_OPS", "frontend_layout")
    y = fe(wav)
    got = [y, *torch.autograd.grad((y * y.detach().cos()).sum(), params)]
    assert y.is_contiguous() == (layout == "channels_last")
    monkeypatch.setenv("SPIDR_FAST_BACKEND", "reference")
    y = fe(wav)
    want = [y, *torch.autograd.grad((y * y.detach().cos()).sum(), params)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def conv_frontend_specs(C: int, dtype: str, affine: bool, T: int = 23_999) -> list[dict]:
    """Both kernels with the tiles their launchers pick at T frames (the second conv block's by default), as
    `bench/sm90.py` specs: x, y and dy channels-last as the model runs them on a GPU, shapes and strides as ints
    (a stride of 1 and multiples of 16 specialise, as at a launch)."""
    import inspect

    specs = []
    kernels = [("fwd", cf._cln_gelu_fwd_kernel, cf.FWD_TILE, cf.FWD_PER_THREAD)]
    kernels.append(("bwd", cf._cln_gelu_bwd_kernel, cf.BWD_TILE, cf.BWD_PER_THREAD))
    for name, fn, tile, per_thread in kernels:
        block_c, block_t, num_warps = cf._blocks(C, T, tile, per_thread)
        consts = {"HAS_WEIGHT": affine, "HAS_BIAS": affine, "BLOCK_C": block_c, "BLOCK_T": block_t}
        fn = getattr(fn, "fn", fn)  # the plain function, also once jitted (interpreter) by an earlier test
        params = inspect.signature(fn).parameters
        if "EVEN_C" in params:
            consts["EVEN_C"] = block_c == C
        if not affine:
            consts.update({p: None for p in ("w_ptr", "b_ptr", "dw_ptr", "db_ptr") if p in params})
        sig = {}
        for p in params:
            if p in consts:
                continue
            if p in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr"):
                sig[p] = "*" + dtype
            elif p.endswith("_ptr"):
                sig[p] = "*fp32"
            elif p.startswith("s_"):  # (B, C, T) channels-last: strides (T C, 1, C)
                sig[p] = {"b": T * C, "c": 1, "t": C}[p[-1]]
            else:
                sig[p] = {"C": C, "T": T, "eps": "fp32"}.get(p, "i32")
        specs.append({"name": name, "fn": fn, "signature": sig, "constexprs": consts, "num_warps": num_warps})
    return specs


@pytest.mark.parametrize(("C", "dtype", "affine"), [(512, "bf16", True), (768, "fp32", False)])
def test_sm90_cubins_do_not_spill(C, dtype, affine):
    """Compile both kernels for an H100 (no GPU needed: triton's bundled ptxas) and read their register
    use: spills and 255-register kernels are invisible to the interpreter but halve a memory-bound
    kernel's occupancy. In a child process (bench/sm90.py): this one runs triton interpreted."""
    from bench import sm90

    specs = conv_frontend_specs(C, dtype, affine)
    results = sm90.compile_many(specs)
    if isinstance(results, str):
        pytest.skip(f"cannot compile for sm_90 here: {results}")
    for spec, usage in zip(specs, results):
        sm90.assert_fits(spec["name"], usage, max_regs=128)
    # the backward's loop reduces over C only (two sums, across 2 warps at most: a barrier pair each); its sums
    # over T accumulate per element and are reduced once after the loop, not through shared memory per T block
    assert results[1]["loop_counts"].get("BAR", 0) <= 4, results[1]["loop_counts"]


def _erf_probe(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, cf._erf(tl.load(x_ptr + offs)))


def erf_grid() -> torch.Tensor:
    """fp32 points: 2**20 evenly over [-8, 8], both sides of the polynomials' switch at |x| = 1.00296 (every fp32
    within 512 ulp), tiny and subnormal magnitudes, signed zeros, infinities and NaN."""
    switch = torch.tensor(1.002959966659546).view(torch.int32) + torch.arange(-512, 513, dtype=torch.int32)
    tiny = torch.logspace(-44, -1, 4096, dtype=torch.float64).float()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.0e38])
    pos = torch.cat([switch.view(torch.float32), tiny])
    return torch.cat([torch.linspace(-8, 8, 2**20), pos, -pos, special])


@pytest.mark.filterwarnings("ignore:overflow encountered")  # x * x at 3e38: inf, as on a GPU
def test_erf_matches_torch_erf(triton_backend):
    """`_erf` (libdevice's erff with its polynomials on immediates) on a dense grid: within 2 ulp of erf (float64,
    rounded) and of torch.erf, as libdevice's erff; exact at 0, +-inf, NaN."""
    from spidr_fast.kernels._utils import jit_in_place

    jit_in_place(vars(cf), cf.KERNELS)
    jit_in_place(globals(), ("_erf_probe",))
    x = erf_grid()
    block = 4096
    x = torch.cat([x, x.new_zeros(-len(x) % block)]).to(triton_backend)
    y = torch.empty_like(x)
    _erf_probe[(len(x) // block,)](x, y, BLOCK=block)
    x, y = x.cpu(), y.cpu()
    truth = torch.erf(x.double()).float()
    ulp = (truth.view(torch.int32).long() - y.view(torch.int32).long()).abs()  # same sign: ulps apart
    finite = truth.isfinite()
    print(
        "max ulp vs erf:",
        ulp[finite].max().item(),
        "vs torch.erf:",
        (torch.erf(x).view(torch.int32).long() - y.view(torch.int32).long()).abs()[finite].max().item(),
    )
    assert ulp[finite & (truth != 0)].max() <= 2
    assert torch.equal(y[~x.isnan()].sign(), truth[~x.isnan()].sign())
    assert y[x.isnan()].isnan().all() and torch.equal(y[x.isinf()], x[x.isinf()].sign())
    assert (torch.erf(x).view(torch.int32).long() - y.view(torch.int32).long()).abs()[finite].max() <= 2
