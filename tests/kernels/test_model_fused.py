"""The tiny-spidr fixture's training step with the fused kernels (codebooks, heads CE) in the model."""

from __future__ import annotations

import spidr_fast
from spidr_fast.kernels import codebook, heads_ce
from tests.conftest import FIXTURE_DIR
from tests.models.test_fixture import close


def test_fixture_training_step_on_fused_kernels(triton_backend, cases, monkeypatch):
    launched = []
    for module, name in [(codebook, "_assign_launch"), (codebook, "_accumulate_launch"), (heads_ce, "_fwd_launch")]:
        launch = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launch, _n=name: launched.append(_n) or _f(*a))

    model = spidr_fast.load_model(FIXTURE_DIR / "model.pt").to(triton_backend)
    model.train()
    waveforms, mask_indices = cases["train_waveforms"].to(triton_backend), cases["mask_indices"].to(triton_backend)
    losses, ppl = model(waveforms, mask_indices=mask_indices)
    assert sorted(set(launched)) == ["_accumulate_launch", "_assign_launch", "_fwd_launch"]
    close(losses.cpu(), cases["train_losses"], 1e-4)
    for name in ("target_ppl", "pred_ppl"):
        close(ppl[name].cpu(), cases["train_ppl"][name], 1e-4)
    for name, expected in cases["codebooks_after"].items():
        close(model.state_dict()[name].cpu(), expected, 1e-5)

    losses.mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(cases["grads"])
    for name, expected in cases["grads"].items():
        close(grads[name].cpu(), expected, 2e-3)
