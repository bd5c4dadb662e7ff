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
