"""LR schedules (vs the reference's SequentialLR chains, `spidr.optimizer.build_scheduler`) and EMA schedules
(the formulas of `spidr.models.spidr.exp_ema_scheduler` and `spidr.models.dinosr.ema_scheduler`)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from spidr_fast import DinoSR, DinoSRConfig, SpidR, SpidRConfig
from spidr_fast.config import OptimizerConfig
from spidr_fast.train.config import preset_model_fields
from spidr_fast.train.optim import build_optimizer, lr_factor

# The schedules' reference values below are for the default EMA steps (freeze at 200k, not tiny's 1000).
TINY = preset_model_fields("tiny", freeze_step=200_000)
SHORT = {"warmup_steps": 10, "hold_steps": 20, "decay_steps": 30, "max_steps": 60, "rsqrt_timescale": 7}


def test_tristage_at_chosen_steps() -> None:
    f = lr_factor(OptimizerConfig())
    assert f(0) == pytest.approx(0.01)
    assert f(6_000) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(12_000) == f(100_000) == f(199_999) == 1.0
    assert f(300_000) == pytest.approx(math.sqrt(0.01))
    assert f(400_000) == pytest.approx(0.01)


@pytest.mark.parametrize("scheduler", ["tristage", "cosine", "rsqrt", "constant"])
@pytest.mark.parametrize("overrides", [{}, SHORT, {**SHORT, "rsqrt_shift": 3}, {**SHORT, "warmup_steps": 0}])
def test_schedules_match_reference(scheduler: str, overrides: dict) -> None:
    from spidr.config import OptimizerConfig as ReferenceConfig
    from spidr.optimizer import build_scheduler

    ref_cfg, cfg = ReferenceConfig(scheduler=scheduler, **overrides), OptimizerConfig(scheduler=scheduler, **overrides)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    steps = cfg.max_steps if overrides else 2_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = build_scheduler(opt, ref_cfg)
        factor = lr_factor(cfg)
        for step in range(steps):
            assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * factor(step), rel=1e-9, abs=1e-15), step
            opt.step()
            ref.step()


def test_optimizer_excludes_teacher_and_frozen() -> None:
    model = SpidR(SpidRConfig(**TINY))
    opt, _ = build_optimizer(model, OptimizerConfig())
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in owned}
    assert not any(n.startswith("teacher") for n in names)
    assert "student.layers.1.final_layer_norm.weight" not in names
    assert "mask_embedding" in names and "feature_extractor.conv_layers.0.conv.weight" in names
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["eps"]) == (5e-4 * 0.01, (0.9, 0.95), 0.01, 1e-6)


@pytest.mark.parametrize("step", [0, 1, 1_000, 20_000, 100_000, 290_000, 300_000])
def test_ema_schedules_match_the_reference_formulas(step: int) -> None:
    spidr = 1 - (1 - 0.999) * math.exp(-step / 20_000)
    spidr = spidr if 1 - spidr > 1e-7 else 1.0
    assert SpidR(SpidRConfig(**TINY)).update_ema(step) == pytest.approx(spidr, rel=0, abs=1e-15)
    dinosr = 0.9999 - (0.9999 - 0.999) * (1 - step / 30_000) if step < 30_000 else (0.9999 if step < 200_000 else 1.0)
    assert DinoSR(DinoSRConfig(**TINY)).update_ema(step) == pytest.approx(dinosr, rel=0, abs=1e-15)
