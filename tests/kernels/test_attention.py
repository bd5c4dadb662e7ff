"""Attention backends agree with the masked-SDPA reference on real frames, forward and backward.

On CPU the flash backends run through fakes with their varlen signatures (they check the glue and
the backend choice, not flash-attn); the `gpu` tests at the end run the real libraries.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spidr_fast.kernels import attention as attn
from spidr_fast.kernels.attention import Padding, packed_backends, select_backend, self_attention, self_attention_ref

CUDA = torch.device("cuda")


def _per_sequence(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """(total, H, Dh) packed frames -> SDPA per sequence: what a varlen kernel computes."""
    assert cu_seqlens.dtype == torch.int32 and q.dim() == 3  # (total, H, Dh), as flash-attn wants
    assert int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) <= max_seqlen  # a bound is all a varlen kernel needs
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        seq = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # (H, T_b, Dh)
        out[start:end] = F.scaled_dot_product_attention(*seq, dropout_p=dropout_p).transpose(0, 1)
    return out


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0):
    """flash-attn 2's varlen signature."""
    assert q.dtype in (torch.float16, torch.bfloat16), "flash-attn 2 takes only fp16/bf16"
    return _per_sequence(q, k, v, cu_seqlens_q, max_seqlen_q, dropout_p)


def fake_flash_attn_4_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """flash_attn.cute's varlen signature (no dropout), returning (out, lse) as its recent versions do."""
    assert q.dtype in (torch.float16, torch.bfloat16), "flash-attn 4 takes only fp16/bf16"
    assert not torch.is_grad_enabled() or not q.requires_grad, "spidr_fast calls FA4's forward only"
    return _per_sequence(q, k, v, cu_seqlens_q, max_seqlen_q), None


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Both flash libraries faked; counts the calls of each."""
    calls = {"flash_attn": 0, "flash_attn_4": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: counted("flash_attn", fake_flash_attn_varlen_func))
    monkeypatch.setattr(attn, "_flash_attn_4_varlen", lambda: counted("flash_attn_4", fake_flash_attn_4_varlen_func))
    return calls


def make_padding(lengths: list[int]) -> tuple[Padding, torch.Tensor]:
    seq = max(lengths)
    mask = torch.arange(seq) < torch.tensor(lengths)[:, None]
    return Padding.from_mask(mask), mask


def qkv(
    batch: int, seq: int, dtype: torch.dtype, grad: bool = True, device: str = "cpu", dim: int = 16
) -> list[torch.Tensor]:
    return [torch.randn(batch, 2, seq, dim, dtype=dtype, device=device, requires_grad=grad) for _ in range(3)]


# ------------------------------------------------------------------------------ the backend choice


@pytest.mark.parametrize(
    ("fa4", "fa2", "capability", "expected"),
    [
        (True, True, (9, 0), ("flash_attn_4", "flash_attn", "nested")),
        (True, True, (10, 0), ("flash_attn_4", "flash_attn", "nested")),
        (True, True, (8, 0), ("flash_attn", "nested")),  # FA4 needs Hopper or newer
        (True, False, (9, 0), ("flash_attn_4", "nested")),
        (False, False, (9, 0), ("nested",)),
    ],
)
def test_packed_backends_on_cuda(fa4, fa2, capability, expected, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIDR_FAST_ATTENTION", raising=False)
    monkeypatch.setattr(attn, "_flash_attn_4_varlen", lambda: fake_flash_attn_4_varlen_func if fa4 else None)
    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: fake_flash_attn_varlen_func if fa2 else None)
    monkeypatch.setattr(attn, "_compute_capability", lambda device: capability)
    assert packed_backends(CUDA) == expected
    assert packed_backends(torch.device("cpu")) == ()  # CPU: masked SDPA


def test_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "nested")
    assert packed_backends(torch.device("cpu")) == ("nested",)
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "masked")
    assert packed_backends(CUDA) == ()
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "flash")
    with pytest.raises(ValueError, match="SPIDR_FAST_ATTENTION must be one of"):
        packed_backends(CUDA)


@pytest.mark.parametrize(
    ("variable", "value"), [("SPIDR_FAST_BACKEND", "reference"), ("SPIDR_FAST_REFERENCE_OPS", "attention")]
)
def test_reference_settings_win_over_the_attention_backend(variable, value, fakes, monkeypatch) -> None:
    """The dispatch rule of every op: attention's reference (masked SDPA) even where a packed backend
    is available (CUDA) or forced (SPIDR_FAST_ATTENTION, on CPU)."""
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(attn, "_compute_capability", lambda device: (9, 0))
    monkeypatch.delenv("SPIDR_FAST_ATTENTION", raising=False)
    assert packed_backends(CUDA) == ()
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "nested")
    padding, mask = make_padding([5, 3])
    assert padding.backends == () and padding.indices is None
    q, k, v = qkv(2, 5, torch.float32, grad=False)
    assert torch.equal(self_attention(q, k, v, padding), self_attention_ref(q, k, v, Padding(mask)))


@pytest.mark.parametrize(
    ("dtype", "dropout_p", "grad", "expected"),
    [
        (torch.bfloat16, 0.0, False, "flash_attn_4"),  # teacher / extraction: no dropout, no gradient
        (torch.float16, 0.0, False, "flash_attn_4"),
        (torch.bfloat16, 0.1, True, "flash_attn"),  # training: dropout and backward
        (torch.bfloat16, 0.0, True, "flash_attn"),  # FA4's forward only: a backward goes to FA2
        (torch.bfloat16, 0.1, False, "flash_attn"),  # FA4 has no dropout
        (torch.float32, 0.0, False, "nested"),  # flash kernels take only fp16/bf16: SDPA
        (torch.float32, 0.1, True, "nested"),
    ],
)
def test_select_backend(dtype, dropout_p, grad, expected) -> None:
    mask = torch.ones(2, 4, dtype=torch.bool)
    padding = Padding(mask, ("flash_attn_4", "flash_attn", "nested"))
    q = torch.zeros(2, 1, 4, 8, dtype=dtype, requires_grad=grad)
    assert select_backend(padding, q, dropout_p) == expected
    with torch.no_grad():  # no gradient is recorded: FA4 whatever q.requires_grad
        if dtype != torch.float32 and dropout_p == 0.0:
            assert select_backend(padding, q, dropout_p) == "flash_attn_4"
    fa2_only = "masked" if dtype == torch.float32 else "flash_attn"
    assert select_backend(Padding(mask, ("flash_attn",)), q, dropout_p) == fa2_only
    assert select_backend(Padding(mask), q, dropout_p) == "masked"


def test_fp32_falls_back_to_sdpa(fakes: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn takes only fp16/bf16: a forced flash backend with fp32 inputs runs masked SDPA."""
    for name in ("flash_attn", "flash_attn_4"):
        monkeypatch.setenv("SPIDR_FAST_ATTENTION", name)
        padding, _ = make_padding([5, 3])
        q, k, v = qkv(2, 5, torch.float32, grad=False)
        assert torch.equal(self_attention(q, k, v, padding), self_attention_ref(q, k, v, padding))
    assert fakes == {"flash_attn": 0, "flash_attn_4": 0}


def test_padding_built_under_compile_has_no_packed_metadata(fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Padding built inside a compiled region (whole-model compile) skips the `nonzero` and runs masked SDPA."""
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "flash_attn")

    def forward(q, k, v, mask):
        return self_attention(q, k, v, Padding.from_mask(mask))

    _, mask = make_padding([6, 2])
    q, k, v = qkv(2, 6, torch.bfloat16, grad=False)
    out = torch.compile(forward, fullgraph=True, backend="eager")(q, k, v, mask)
    assert torch.equal(out, self_attention_ref(q, k, v, Padding(mask)))
    assert fakes["flash_attn"] == 0
    assert Padding.from_mask(mask).indices is not None  # eagerly, the packed metadata is there


# ------------------------------------------------------------------------------ numerics on CPU


@pytest.fixture(params=["masked", "nested", "flash_attn", "flash_attn_4"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, fakes) -> str:
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", request.param)
    return request.param


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lengths", [[7, 4, 1], [5, 5], [33, 17, 32, 1]])
def test_backends_match_reference(backend, fakes, lengths: list[int], dtype: torch.dtype, tol: float) -> None:
    q, k, v = qkv(len(lengths), max(lengths), dtype)
    padding, mask = make_padding(lengths)
    real = mask[:, None, :, None].expand_as(q)
    grad_fa4 = backend != "flash_attn_4"  # FA4 runs forward-only calls
    with torch.set_grad_enabled(grad_fa4):
        out = self_attention(q, k, v, padding)
    ref = self_attention_ref(q, k, v, padding)
    assert (out - ref)[real].abs().max() <= tol
    ran = select_backend(padding, q if grad_fa4 else q.detach(), 0.0)
    assert ran == (backend if dtype == torch.bfloat16 or backend in ("masked", "nested") else "masked")
    if ran != "masked":
        assert (out[~real] == 0).all()  # packed backends leave padded query rows at zero
    if grad_fa4:
        grads = torch.autograd.grad((out * real).float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * real).float().square().sum(), (q, k, v))
        for g, rg in zip(grads, ref_grads, strict=True):
            assert (g - rg).abs().max() <= tol * max(1.0, rg.abs().max().item())


def test_no_padding_is_plain_sdpa() -> None:
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    assert torch.equal(self_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))


def test_padding_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "nested")
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    padding = Padding.from_mask(mask)
    assert padding.backends == ("nested",)
    assert padding.cu_seqlens.tolist() == [0, 3, 4, 4] and padding.cu_seqlens.dtype == torch.int32
    assert padding.indices.tolist() == [0, 1, 2, 3]
    x = torch.randn(3, 2, 3, 4)  # (B, H, T, Dh)
    packed = padding.pack(x)
    assert packed.shape == (4, 2, 4)
    back = padding.unpack(packed, 3, 3)
    assert torch.equal(back[mask[:, None, :, None].expand_as(x)], x[mask[:, None, :, None].expand_as(x)])
    monkeypatch.delenv("SPIDR_FAST_ATTENTION")
    assert Padding.from_mask(mask).indices is None  # CPU: masked SDPA needs no packed metadata (no sync)


def dropout_statistics(backend: str, device: str, dtype: torch.dtype, draws: int) -> None:
    """With dropout the output changes, each draw keeps about (1 - p) of the weights, and the mean over
    draws approaches the dropout-free output (dropout is unbiased)."""
    torch.manual_seed(0)
    q, k, _ = qkv(2, 6, dtype, grad=False, device=device, dim=64)  # 64: the model's head size (FA4 takes 64+)
    v = torch.eye(6, 64, dtype=dtype, device=device).expand(2, 2, 6, 64).contiguous()  # out = attention weights
    padding = Padding.from_mask(torch.arange(6, device=device) < torch.tensor([[6], [3]], device=device))
    assert select_backend(padding, q, 0.3) == backend
    exact = self_attention(q, k, v, padding).float()
    stack = torch.stack([self_attention(q, k, v, padding, dropout_p=0.3).float() for _ in range(draws)])
    real = padding.mask[:, None, :, None].expand_as(exact)
    assert not torch.equal(stack[0], exact)
    kept = (stack != 0)[:, real & (exact != 0)].float().mean()
    assert abs(kept.item() - 0.7) < 0.05
    assert ((stack.mean(0) - exact)[real]).abs().max() < 0.15 * exact.abs().max()


@pytest.mark.parametrize("name", ["nested", "flash_attn", "masked"])
def test_dropout_is_applied_and_unbiased(name: str, monkeypatch: pytest.MonkeyPatch, fakes) -> None:
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", name)
    dropout_statistics(name, "cpu", torch.bfloat16 if name == "flash_attn" else torch.float32, 400)


def test_model_outputs_equal_across_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from spidr_fast import SpidR, SpidRConfig
    from tests.models.test_padding import LENGTHS, TINY, padded_batch

    model = SpidR(SpidRConfig(**TINY)).eval()
    waveforms, lengths = padded_batch(LENGTHS), torch.tensor(LENGTHS)
    frames = model.feature_extractor.output_lengths(lengths)
    outputs = {}
    for name in ("masked", "nested"):
        monkeypatch.setenv("SPIDR_FAST_ATTENTION", name)
        with torch.no_grad():
            outputs[name] = model.get_intermediate_outputs(waveforms, lengths=lengths)
    for a, b in zip(outputs["masked"], outputs["nested"], strict=True):
        for i, n in enumerate(frames.tolist()):
            assert (a[i, :n] - b[i, :n]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ a compiled layer


@torch.library.custom_op("spidr_fast_test::varlen", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    return _per_sequence(q, k, v, cu, max_seqlen)


@_varlen_op.register_fake
def _(q, k, v, cu, max_seqlen):
    return torch.empty_like(q)


def test_compiled_layer_traces_a_padded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the trainer compiles them (fullgraph, dynamic): a layer given the batch's Padding traces the
    packed path (an opaque varlen op, as flash-attn's own custom ops are), without host syncs, and
    one graph serves batches of other shapes."""
    from spidr_fast.models.transformer import FeedForward, SelfAttention, TransformerLayer

    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "flash_attn")
    fake = lambda q, k, v, cu, _cu, n, _n, dropout_p: _varlen_op(q, k, v, cu, n)
    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda: fake)
    torch._dynamo.reset()
    attention_block = SelfAttention(32, 2, qkv_bias=False, dropout=0.0)
    layer = TransformerLayer(32, attention_block, FeedForward(32, 64, 0.0), 0.0, pre_ln=False)
    layer = layer.to(torch.bfloat16).eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for lengths in ([9, 4, 7], [12, 5]):
        padding, mask = make_padding(lengths)
        assert padding.backends == ("flash_attn",) and padding.indices is not None
        x = torch.randn(len(lengths), max(lengths), 32, dtype=torch.bfloat16)
        with torch.no_grad():
            out, _ = compiled(x, padding)
            ref, _ = layer(x, Padding(mask))  # masked SDPA
        assert (out - ref)[mask].abs().max() <= 3e-2


# ------------------------------------------------------------------------------ dense (unpadded) batches


def fake_flash_attn_func(q, k, v, dropout_p=0.0):
    """flash-attn 2's dense signature: (B, T, H, Dh) in and out, fp16/bf16, dropout."""
    assert q.dtype in (torch.float16, torch.bfloat16), "flash-attn takes only fp16/bf16"
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), dropout_p=dropout_p).transpose(1, 2)


def fake_forward_only_func(q, k, v):
    """FlashAttention-3/-4's dense signature (no dropout), forward only, returning (out, lse)."""
    assert q.dtype in (torch.float16, torch.bfloat16) and not (torch.is_grad_enabled() and q.requires_grad)
    return fake_flash_attn_func(q, k, v), None


@pytest.fixture
def dense_fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """The three flash libraries' dense functions faked; records the dropout of each call."""
    calls: dict[str, list[float]] = {"flash_attn": [], "flash_attn_3": [], "flash_attn_4": []}

    def counted(name, fn):
        def wrapper(*args, dropout_p=0.0):
            calls[name].append(dropout_p)
            return fn(*args, dropout_p=dropout_p) if name == "flash_attn" else fn(*args)

        return lambda: wrapper

    monkeypatch.setattr(attn, "_flash_attn_dense", counted("flash_attn", fake_flash_attn_func))
    monkeypatch.setattr(attn, "_flash_attn_3_dense", counted("flash_attn_3", fake_forward_only_func))
    monkeypatch.setattr(attn, "_flash_attn_4_dense", counted("flash_attn_4", fake_forward_only_func))
    monkeypatch.delenv("SPIDR_FAST_DENSE_ATTENTION", raising=False)
    return calls


def installed(monkeypatch: pytest.MonkeyPatch, packages: str, capability: tuple[int, int]) -> None:
    """Only the listed flash libraries import ("fa2", "fa3", "fa4"), on a GPU of this capability."""
    for name, key in (("_flash_attn_dense", "fa2"), ("_flash_attn_3_dense", "fa3"), ("_flash_attn_4_dense", "fa4")):
        monkeypatch.setattr(attn, name, (lambda: fake_flash_attn_func) if key in packages.split("+") else lambda: None)
    monkeypatch.setattr(attn, "_compute_capability", lambda device: capability)
    monkeypatch.delenv("SPIDR_FAST_DENSE_ATTENTION", raising=False)


BF16 = torch.bfloat16


@pytest.mark.parametrize(
    ("capability", "dtype", "dropout_p", "grad", "packages", "expected"),
    [
        ((9, 0), BF16, 0.1, True, "", "sdpa_cudnn"),  # H100 training: cuDNN SDPA (dropout, backward)
        ((9, 0), BF16, 0.1, True, "fa2+fa3+fa4", "sdpa_cudnn"),  # FA3/FA4 have no dropout
        ((9, 0), BF16, 0.0, True, "fa3+fa4", "sdpa_cudnn"),  # ... and are called forward only
        ((9, 0), BF16, 0.0, False, "fa2+fa3+fa4", "flash_attn_3"),  # teacher / extraction on Hopper
        ((9, 0), torch.float16, 0.0, False, "fa4", "flash_attn_4"),
        ((9, 0), BF16, 0.0, False, "", "sdpa_cudnn"),
        ((10, 0), BF16, 0.0, False, "fa3+fa4", "flash_attn_4"),
        ((10, 0), BF16, 0.0, False, "fa3", "sdpa_cudnn"),  # FA3 is built for sm_90 only
        ((10, 0), BF16, 0.1, True, "fa2", "sdpa_cudnn"),
        ((8, 0), BF16, 0.1, True, "fa2", "sdpa_flash"),  # A100: flash SDPA, then FA2
        ((8, 0), BF16, 0.0, False, "fa2+fa3+fa4", "sdpa_flash"),  # FA3/FA4 need Hopper
        ((8, 6), torch.float16, 0.1, True, "", "sdpa_flash"),
        ((7, 5), BF16, 0.1, True, "fa2", "sdpa"),  # older GPUs: PyTorch's own choice
        ((9, 0), torch.float32, 0.1, True, "fa2+fa3+fa4", "sdpa"),  # fp32: today's SDPA
        ((9, 0), torch.float32, 0.0, False, "fa2+fa3+fa4", "sdpa"),
    ],
)
def test_dense_backend_choice(capability, dtype, dropout_p, grad, packages, expected, monkeypatch) -> None:
    installed(monkeypatch, packages, capability)
    assert attn.choose_dense_backend(CUDA, dtype, dropout_p, grad) == expected
    assert attn.choose_dense_backend(torch.device("cpu"), dtype, dropout_p, grad) == "sdpa"  # CPU: today's SDPA
    q = torch.zeros(1, 1, 2, 8, dtype=dtype, requires_grad=True)  # a CPU tensor: "sdpa" with or without grad
    assert attn.dense_backend(q, dropout_p) == "sdpa"


def test_dense_choice_on_cuda_traces_without_importing_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a compiled layer the package probes run eagerly: dynamo cannot trace an import that fails
    (FlashAttention-3 is not installed here), which would break every fullgraph layer on a Hopper without it."""
    import importlib.util

    for package in ("flash_attn_interface", "flash_attn"):
        if importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed here: its probe would not fail")
    monkeypatch.setattr(attn, "_compute_capability", lambda device: (9, 0))
    monkeypatch.delenv("SPIDR_FAST_DENSE_ATTENTION", raising=False)
    torch._dynamo.reset()

    def chosen_length(x: torch.Tensor) -> torch.Tensor:  # inference on Hopper: FA3 first, if it imported
        return x + len(attn.choose_dense_backend(CUDA, BF16, 0.0, False))

    out = torch.compile(chosen_length, fullgraph=True, backend="eager")(torch.zeros(1))
    assert out.item() == len("sdpa_cudnn")


def test_importing_attention_imports_neither_dynamo_nor_triton() -> None:
    """`_constant_result` is `torch.compiler.assume_constant_result`'s mark, set without importing torch._dynamo
    (which imports triton: the kernel tests must set TRITON_INTERPRET=1 first)."""
    import subprocess
    import sys

    code = "import sys, spidr_fast.kernels.attention; print(sorted({'torch._dynamo', 'triton'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked) == vars(attn._constant_result(lambda: None)) == {"_dynamo_marked_constant": True}


def test_dense_order_is_one_table_from_newest_to_oldest() -> None:
    minimums = [minimum for minimum, _ in attn.DENSE_ORDER]
    assert minimums == sorted(minimums, reverse=True) and minimums[-1] == (0, 0)  # every device has a row
    assert all(set(order) <= set(attn.DENSE_BACKENDS) - {"sdpa"} for _, order in attn.DENSE_ORDER)
    assert attn.dense_order((9, 0)) == attn.dense_order((9, 7)) != attn.dense_order((8, 9))


def test_reference_settings_and_forced_dense_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    installed(monkeypatch, "fa2+fa3+fa4", (9, 0))
    choose = attn.choose_dense_backend
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "flash_attn")
    assert choose(CUDA, BF16, 0.1, True) == "flash_attn"
    assert choose(torch.device("cpu"), BF16, 0.1, True) == "flash_attn"  # forced: on any device
    assert choose(CUDA, torch.float32, 0.1, True) == "sdpa"  # ... where it can run the call
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "flash_attn_4")
    assert choose(CUDA, BF16, 0.0, False) == "flash_attn_4"
    assert choose(CUDA, BF16, 0.1, False) == choose(CUDA, BF16, 0.0, True) == "sdpa"  # no dropout, forward only
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "sdpa_cudnn")
    assert choose(CUDA, BF16, 0.1, True) == "sdpa_cudnn" and choose(torch.device("cpu"), BF16, 0.1, True) == "sdpa"
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "sdpa_flash")
    assert choose(torch.device("cpu"), torch.float32, 0.0, True) == "sdpa_flash"  # SDPA's CPU flash kernel,
    assert choose(torch.device("cpu"), torch.float32, 0.1, True) == "sdpa"  # which has no dropout
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "sdpa")
    assert choose(CUDA, BF16, 0.1, True) == "sdpa"
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match=r"SPIDR_FAST_DENSE_ATTENTION must be one of .*'sdpa_cudnn'.*got 'cudnn'"):
        choose(CUDA, BF16, 0.1, True)
    for variable, value in (("SPIDR_FAST_BACKEND", "reference"), ("SPIDR_FAST_REFERENCE_OPS", "attention")):
        monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "flash_attn")
        monkeypatch.setenv(variable, value)  # the reference settings win over a forced backend and the table
        assert choose(CUDA, BF16, 0.1, True) == "sdpa"
        monkeypatch.delenv("SPIDR_FAST_DENSE_ATTENTION")
        assert choose(CUDA, BF16, 0.1, True) == "sdpa"
        monkeypatch.delenv(variable)
    assert choose(CUDA, BF16, 0.1, True) == "sdpa_cudnn"


@pytest.mark.parametrize(
    ("name", "dtype", "grad", "tol"),
    [
        ("sdpa", torch.float32, True, 0.0),
        ("sdpa_flash", torch.float32, True, 1e-5),
        ("sdpa_flash", BF16, True, 2e-2),
        ("flash_attn", BF16, True, 2e-2),
        ("flash_attn_3", BF16, False, 2e-2),
        ("flash_attn_4", torch.float16, False, 2e-3),
    ],
)
def test_dense_backends_match_reference(name, dtype, grad, tol, dense_fakes, monkeypatch) -> None:
    """Each dense backend (the flash libraries faked with their dense signatures) equals plain SDPA, the
    reference, forward and (where the backend runs one) backward."""
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", name)
    q, k, v = qkv(3, 11, dtype, grad=grad)
    with torch.set_grad_enabled(grad):
        assert attn.dense_backend(q, 0.0) == name
        out = self_attention(q, k, v, None)
    ref = self_attention_ref(q, k, v)
    assert out.shape == ref.shape and (out.float() - ref.float()).abs().max() <= tol
    assert len(dense_fakes.get(name, [])) == (1 if name.startswith("flash") else 0)
    if grad:
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        for g, rg in zip(grads, ref_grads, strict=True):
            assert (g.float() - rg.float()).abs().max() <= tol * max(1.0, rg.abs().max().item())


def test_dense_dropout_reaches_the_backend(dense_fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "flash_attn")
    q, k, v = qkv(2, 6, BF16)
    self_attention(q, k, v, None, dropout_p=0.1)
    assert dense_fakes["flash_attn"] == [0.1]
    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "flash_attn_4")  # no dropout: SDPA runs it instead
    with torch.no_grad():
        self_attention(q, k, v, None, dropout_p=0.1)
    assert dense_fakes["flash_attn_4"] == []
    with pytest.raises(ValueError, match="has no dropout"):
        attn.dense_attention(q, k, v, 0.1, "flash_attn_4")


def test_sdpa_backend_is_first_then_sdpa_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chosen SDPA backend runs first; one that cannot take the call (cuDNN on CPU) falls back to
    SDPA's others, unless strict (a benchmark's view: an error, not another kernel)."""
    q, k, v = qkv(2, 5, torch.float32, grad=False)
    ref = self_attention_ref(q, k, v)
    assert torch.equal(attn.dense_attention(q, k, v, 0.0, "sdpa_cudnn"), ref)  # CPU has no cuDNN attention
    with pytest.raises(RuntimeError):
        attn.dense_attention(q, k, v, 0.0, "sdpa_cudnn", strict=True)
    with pytest.raises(ValueError, match="unknown dense attention backend"):
        attn.dense_attention(q, k, v, 0.0, "nested")


def _aot_graphs(compiled_graphs: list[str]):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, _):
        compiled_graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


@pytest.mark.parametrize("first", ["flash", "math"])
def test_dense_path_compiles_in_one_graph_with_its_backend(first: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled transformer layer (fullgraph, dynamic, as the trainer compiles it) on an unpadded batch
    traces the `sdpa_kernel` context without a graph break, and the compiled graph runs the backend the
    context enables (math alone in flash's place shows that the context reaches the compiled graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.attention import SDPBackend

    from spidr_fast.models.transformer import FeedForward, SelfAttention, TransformerLayer

    monkeypatch.setenv("SPIDR_FAST_DENSE_ATTENTION", "sdpa_flash")
    if first == "math":
        monkeypatch.setitem(attn._SDPA_BACKENDS, "sdpa_flash", SDPBackend.MATH)  # and nothing else enabled (on
        monkeypatch.setattr(attn, "_SDPA_FALLBACKS", (SDPBackend.MATH,))  # CPU, SDPA ignores the priority order)
    torch._dynamo.reset()
    layer = TransformerLayer(32, SelfAttention(32, 2, qkv_bias=False, dropout=0.0), FeedForward(32, 64, 0.0), 0.0,
                             pre_ln=False)  # fmt: skip
    graphs: list[str] = []
    counter = CompileCounterWithBackend(_aot_graphs(graphs))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for batch, seq in ((2, 9), (3, 12)):
        x = torch.randn(batch, seq, 32, requires_grad=True)
        out, _ = compiled(x)  # fullgraph: a graph break would raise
        ref, _ = layer(x)
        assert (out - ref).abs().max() <= 1e-5
        out.square().sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] == frames[1]  # no recompilation for the second shape
    code = "".join(graphs)  # forward and backward
    assert ("_scaled_dot_product_flash_attention_for_cpu" in code) == (first == "flash")
    assert ("_safe_softmax" in code) == (first == "math")  # SDPA's math backend, decomposed
    monkeypatch.delenv("SPIDR_FAST_DENSE_ATTENTION")
    assert attn.dense_backend(x, 0.0) == "sdpa"  # CPU default: plain SDPA


# ------------------------------------------------------------------------------ on a GPU


def gpu_backends() -> list[str]:
    return list(packed_backends(CUDA)) if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash_attn_4", "flash_attn", "nested"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backend_matches_sdpa(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each installed backend against SDPA with a key mask: forward, and backward where the backend runs one."""
    if name not in gpu_backends():
        pytest.skip(f"{name} is not installed or not supported on this GPU")
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", name)
    lengths = [300, 17, 256, 1]
    q, k, v = qkv(4, 300, dtype, device="cuda", dim=64)  # the model's head size (FA4: 64, 96, 128)
    q, k, v = (x.detach().mul(0.5).requires_grad_() for x in (q, k, v))
    mask = torch.arange(300, device="cuda") < torch.tensor(lengths, device="cuda")[:, None]
    padding = Padding.from_mask(mask)
    real = mask[:, None, :, None].expand_as(q)
    ref = self_attention_ref(*(x.float() for x in (q, k, v)), Padding(mask))
    backward = name != "flash_attn_4"
    with torch.set_grad_enabled(backward):
        assert select_backend(padding, q, 0.0) == name
        out = self_attention(q, k, v, padding)
    assert (out.float() - ref)[real].abs().max() <= 1e-2
    assert (out[~real] == 0).all()
    if backward:
        grads = torch.autograd.grad((out * real).float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * real).square().sum(), (q, k, v))
        for g, rg in zip(grads, ref_grads, strict=True):
            assert (g.float() - rg).abs().max() <= 2e-2 * max(1.0, rg.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash_attn", "nested", "masked"])
def test_gpu_dropout_statistics(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name != "masked" and name not in gpu_backends():
        pytest.skip(f"{name} is not installed on this machine")
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", name)
    dropout_statistics(name, "cuda", torch.bfloat16, 2000)


@pytest.mark.gpu
def test_gpu_fp32_padded_batch_falls_back() -> None:
    """flash-attn takes only fp16/bf16: an fp32 padded batch on CUDA runs SDPA (nested or masked)."""
    padding = Padding.from_mask(torch.arange(8, device="cuda") < torch.tensor([[8], [3]], device="cuda"))
    q, k, v = qkv(2, 8, torch.float32, grad=False, device="cuda")
    assert select_backend(padding, q, 0.0) in ("nested", "masked")
    real = padding.mask[:, None, :, None].expand_as(q)
    assert (self_attention(q, k, v, padding) - self_attention_ref(q, k, v, padding))[real].abs().max() <= 1e-5


def gpu_dense_reason(name: str) -> str | None:
    """Why dense backend `name` cannot run on this GPU, or None."""
    if not torch.cuda.is_available():
        return "needs CUDA"
    capability = attn._compute_capability(CUDA)
    if not attn._dense_installed(name, capability):
        return f"{name} is not installed or not built for sm_{capability[0]}{capability[1]}"
    if name == "sdpa_cudnn" and capability < (8, 0):
        return "cuDNN attention needs sm_80 or newer"
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("name", [b for b in attn.DENSE_BACKENDS if b != "sdpa"])
def test_gpu_dense_backend_matches_sdpa(name: str) -> None:
    """Each dense backend, alone (strict: no SDPA fallback), against fp32 SDPA: forward, and backward
    where the backend runs one."""
    if reason := gpu_dense_reason(name):
        pytest.skip(reason)
    q, k, v = qkv(2, 300, BF16, device="cuda", dim=64)
    q, k, v = (x.detach().mul(0.5).requires_grad_() for x in (q, k, v))
    ref = self_attention_ref(*(x.float() for x in (q, k, v)))
    backward = name not in attn.FORWARD_ONLY
    with torch.set_grad_enabled(backward):
        out = attn.dense_attention(q, k, v, 0.0, name, strict=True)
    assert (out.float() - ref).abs().max() <= 1e-2
    if backward:
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for g, rg in zip(grads, ref_grads, strict=True):
            assert (g.float() - rg).abs().max() <= 2e-2 * max(1.0, rg.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa_cudnn", "sdpa_flash", "flash_attn"])
def test_gpu_dense_dropout_is_applied_and_unbiased(name: str) -> None:
    if reason := gpu_dense_reason(name):
        pytest.skip(reason)
    torch.manual_seed(0)
    q, k, _ = qkv(2, 6, BF16, grad=False, device="cuda", dim=64)
    v = torch.eye(6, 64, dtype=BF16, device="cuda").expand(2, 2, 6, 64).contiguous()  # out = attention weights
    exact = attn.dense_attention(q, k, v, 0.0, name, strict=True).float()
    stack = torch.stack([attn.dense_attention(q, k, v, 0.3, name, strict=True).float() for _ in range(2000)])
    kept = (stack != 0)[:, exact != 0].float().mean()
    assert abs(kept.item() - 0.7) < 0.05
    assert (stack.mean(0) - exact).abs().max() < 0.15 * exact.abs().max()
