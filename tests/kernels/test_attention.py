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
