"""The model traces with torch.compile(fullgraph=True): a full SpidR training forward + loss, no graph break."""

from __future__ import annotations

import pytest
import torch

from spidr_fast import DinoSR, DinoSRConfig, SpidR, SpidRConfig
from tests.models.test_padding import TINY


@pytest.mark.parametrize("cls", [SpidR, DinoSR])
def test_training_forward_fullgraph(cls: type) -> None:
    """aot_eager traces forward and backward graphs exactly as inductor would, without codegen time."""
    torch._dynamo.reset()
    # Layer drop draws a host random number per layer (a graph break by design); dropout off so that the
    # compiled and eager runs can be compared value for value.
    fields = dict(TINY, encoder_layer_drop=0.0, encoder_dropout=0.0, encoder_attention_dropout=0.0)
    config = (SpidRConfig if cls is SpidR else DinoSRConfig)(**fields)
    torch.manual_seed(0)
    eager, compiled_model = cls(config).train(), cls(config).train()
    compiled_model.load_state_dict(eager.state_dict())
    waveforms = torch.randn(2, 8000)
    mask_indices = torch.arange(0, 24, 2).expand(2, -1)

    def step(model: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        losses, ppl = model(waveforms, mask_indices=mask_indices)
        return losses.mean(), ppl

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, ppl = compiled(compiled_model)
    ref_loss, ref_ppl = step(eager)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(ppl["target_ppl"], ref_ppl["target_ppl"])
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    for name, buffer in eager.state_dict().items():  # the codebook EMA step ran inside the graph too
        torch.testing.assert_close(compiled_model.state_dict()[name], buffer, msg=name)


def test_inference_fullgraph() -> None:
    torch._dynamo.reset()
    model = SpidR(SpidRConfig(**TINY)).eval()
    waveforms = torch.randn(1, 6000)
    compiled = torch.compile(lambda w: model.get_intermediate_outputs(w), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for a, b in zip(compiled(waveforms), model.get_intermediate_outputs(waveforms), strict=True):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ whole model, padded batches

USES = ["train", "train_attention_mask", "intermediate_lengths", "intermediate_attention_mask"]
USES += ["codebooks_lengths", "codebooks_attention_mask"]


def padded_call(model: torch.nn.Module, use: str, device: str = "cpu") -> tuple:
    """(function, args) of one use of the model on a padded batch (lengths or the reference's mask)."""
    from spidr_fast.models.padding import attention_mask_from_lengths
    from tests.models.test_padding import LENGTHS, padded_batch

    waveforms, lengths = padded_batch(LENGTHS[:2]).to(device), torch.tensor(LENGTHS[:2], device=device)
    frames = model.feature_extractor.output_lengths(lengths)
    padding = attention_mask_from_lengths(frames, model.feature_extractor.num_frames(waveforms.shape[-1]))
    kind = "attention_mask" if use.endswith("attention_mask") else "lengths"
    arg = padding if kind == "attention_mask" else lengths
    mask_indices = torch.arange(0, 10, 2, device=device).expand(2, -1)

    def train(w: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, dict]:
        losses, ppl = model(w, mask_indices=mask_indices, **{kind: a})
        return losses.mean(), ppl

    if use.startswith("train"):
        return train, (waveforms, arg)
    method = model.get_intermediate_outputs if use.startswith("intermediate") else model.get_codebooks
    return (lambda w, a: method(w, **{kind: a})), (waveforms, arg)


def whole_model(cls: type, mode: str, device: str = "cpu") -> torch.nn.Module:
    # Layer drop draws a host random number per layer: a graph break by design (off here).
    config = (SpidRConfig if cls is SpidR else DinoSRConfig)(**TINY, extractor_mode=mode, encoder_layer_drop=0.0)
    return cls(config).to(device)


@pytest.mark.parametrize("use", USES)
@pytest.mark.parametrize(("cls", "mode"), [(SpidR, "layer_norm"), (DinoSR, "group_norm")])
def test_whole_model_has_no_graph_break(cls: type, mode: str, use: str) -> None:
    """As the reference's users compile it: the whole model, padded batches, zero graph breaks
    (before: 3 for training, 6 and 3 for the inference calls, from `int(tensor)` frame counts and
    the padding path's host syncs)."""
    torch._dynamo.reset()
    model = whole_model(cls, mode)
    model.train(use.startswith("train"))
    fn, args = padded_call(model, use)
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


def test_whole_model_compiled_padded_training_matches_eager() -> None:
    """fullgraph + dynamic (the reference's `model.compile(dynamic=True)`) on a padded batch: same loss
    and gradients as eager, for batches of two shapes."""
    torch._dynamo.reset()
    fields = dict(TINY, extractor_mode="group_norm", encoder_layer_drop=0.0, encoder_dropout=0.0)
    fields.update(encoder_attention_dropout=0.0, encoder_projection_dropout=0.0, encoder_ff_interm_dropout=0.0)
    torch.manual_seed(0)
    eager, compiled_model = SpidR(SpidRConfig(**fields)).train(), SpidR(SpidRConfig(**fields)).train()
    compiled_model.load_state_dict(eager.state_dict())

    def step(model: torch.nn.Module, w: torch.Tensor, n: torch.Tensor, mask_indices: torch.Tensor) -> torch.Tensor:
        return model(w, mask_indices=mask_indices, lengths=n)[0].mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for lengths in ([9_000, 6_417], [7_000, 5_000, 3_000]):
        mask_indices = torch.arange(0, 12, 3).expand(len(lengths), -1)
        args = torch.randn(len(lengths), max(lengths)), torch.tensor(lengths), mask_indices
        loss, ref_loss = compiled(compiled_model, *args), step(eager, *args)
        torch.testing.assert_close(loss, ref_loss)
        loss.backward()
        ref_loss.backward()
        for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("use", USES)
def test_gpu_whole_model_has_no_graph_break(use: str) -> None:
    """On CUDA, under bf16 autocast (the packed-attention metadata is skipped inside a compiled region)."""
    torch._dynamo.reset()
    model = whole_model(SpidR, "layer_norm", "cuda")
    model.train(use.startswith("train"))
    fn, args = padded_call(model, use, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, dynamic=True)(*args)
    assert out is not None


def test_compiled_forward_with_a_packed_backend_has_no_graph_break(monkeypatch: pytest.MonkeyPatch) -> None:
    """As `FeatureExtractor(compile=True)` on CUDA: a key mask that becomes a Padding inside the compiled
    region, with a packed backend available, no longer breaks the graph in every layer (the `nonzero`
    and `.item()` of the packed metadata are skipped there; the layers run masked SDPA)."""
    monkeypatch.setenv("SPIDR_FAST_ATTENTION", "nested")  # a packed backend, as on CUDA
    torch._dynamo.reset()
    model = whole_model(SpidR, "layer_norm").eval()
    features = torch.randn(2, 20, TINY["encoder_embed_dim"])
    key_mask = torch.arange(20) < torch.tensor([[20], [11]])

    def layers(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return [out for out, _ in model.student.iter_layer_outputs(x, mask)]

    explanation = torch._dynamo.explain(layers)(features, key_mask)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    with torch.no_grad():
        eager = layers(features, key_mask)  # eagerly: the packed (nested) backend
        compiled = torch.compile(layers, fullgraph=True, backend="eager")(features, key_mask)
    for a, b in zip(compiled, eager, strict=True):
        assert (a - b)[key_mask].abs().max() <= 1e-5
