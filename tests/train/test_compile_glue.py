"""The trainer's compiled regions (parallelize.COMPILED_REGIONS): each traces as one graph with no break, on
padded and unpadded batches with layer drop on, and the compiled training step equals the eager one."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from spidr_fast import DinoSR, SpidR
from spidr_fast.config import MaskingConfig
from spidr_fast.data.batching import num_frames
from spidr_fast.data.masks import compute_mask_indices
from spidr_fast.kernels import _dispatch
from spidr_fast.train.config import read_config
from spidr_fast.train.parallelize import GLUE_REGIONS, region_paths
from spidr_fast.train.step import StepContext, layer_drop_generator, train_step
from tests.train import test_compile

SAMPLES = 12_000


def tiny(cls: type = SpidR, *extra: str) -> torch.nn.Module:
    model_type = "spidr" if cls is SpidR else "dinosr"
    cfg = read_config("tiny", [f"run.model_type={model_type}", "model.encoder_layer_drop=0.5", *extra]).model
    torch.manual_seed(0)
    return cls(cfg).train()


def masks(lengths: list[int], samples: int, seed: int) -> torch.Tensor:
    """Mask indices as the trainer's batcher builds them (per-row frame counts: a padded row is masked
    within its real frames)."""
    frames = [int(num_frames(n)) for n in lengths]
    shape = (len(lengths), int(num_frames(samples)))
    return torch.from_numpy(compute_mask_indices(shape, lengths=frames, config=MaskingConfig(mask_length=3), rng=seed))


def record_region_calls(model: torch.nn.Module) -> dict[str, list[tuple[Callable, tuple, dict]]]:
    """path -> [(the region's callable, args, kwargs)] of every call of a compiled region from now on."""
    calls: dict[str, list[tuple[Callable, tuple, dict]]] = collections.defaultdict(list)
    for path, owner, attr in region_paths(model):
        target = getattr(owner, attr)
        if isinstance(target, torch.nn.Module):
            target.register_forward_pre_hook(
                lambda m, args, kwargs, path=path: calls[path].append((m.forward, args, kwargs)), with_kwargs=True
            )
        else:

            def recorder(*args: Any, _fn: Callable = target, _path: str = path, **kwargs: Any) -> Any:
                calls[_path].append((_fn, args, kwargs))
                return _fn(*args, **kwargs)

            setattr(owner, attr, recorder)
    return calls


@pytest.mark.parametrize(("cls", "targets_path"), [(SpidR, "reference"), (DinoSR, "reference"), (SpidR, "fast")])
def test_every_region_is_one_graph_without_break(cls: type, targets_path: str, monkeypatch) -> None:
    """Each region compiled alone (fullgraph) on the inputs a training forward gives it: a padded batch
    (lengths) and an unpadded one, layer drop on. "fast": the teacher targets' one-pass path (CUDA's default)."""
    if targets_path == "fast":
        use_fused = _dispatch.use_fused
        monkeypatch.setattr(_dispatch, "use_fused", lambda d, op, **kw: op == "targets" or use_fused(d, op, **kw))
    torch._dynamo.reset()
    model = tiny(cls)
    model.student.layer_drop_generator = layer_drop_generator(0, 1)
    calls = record_region_calls(model)
    for lengths in ([SAMPLES, SAMPLES, SAMPLES], [SAMPLES, 9_000, 7_000]):
        waveforms = torch.randn(len(lengths), SAMPLES)
        padded = dict(lengths=torch.tensor(lengths)) if min(lengths) < SAMPLES else {}
        losses, _ = model(waveforms, mask_indices=masks(lengths, SAMPLES, seed=1), **padded)
        losses.sum().backward()
    assert set(calls) == {path for path, _, _ in region_paths(model)}  # every region ran, the list is the model's
    for path, recorded in calls.items():
        # the first unpadded and the first padded call (the two graphs each region has in training)
        kinds = {}
        for fn, args, kwargs in recorded:
            padding = [a for a in (*args, *kwargs.values()) if type(a).__name__ == "Padding"]
            kinds.setdefault(bool(padding), (fn, args, kwargs))
        for fn, args, kwargs in kinds.values():
            torch._dynamo.reset()
            counter = CompileCounter()  # fullgraph, as the trainer compiles: a graph break raises
            torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)(*args, **kwargs)
            assert counter.frame_count == 1 and counter.op_count > 0, path


def test_glue_regions_are_the_trainer_regions_past_the_layers() -> None:
    model = tiny()
    paths = [p for p, _, _ in region_paths(model)]
    assert paths[:4] == ["student.layers.0", "student.layers.1", "teacher.layers.0", "teacher.layers.1"]
    assert paths[4:] == list(GLUE_REGIONS)
    with pytest.raises(ValueError, match=r"'student\._embedd'"):
        region_paths(model, ("student._embedd",))


# ---------------------------------------------------------------- compiled step == eager step (inductor)
# Batches of one bucket, (size, samples): the compiled regions see new shapes at every step (dynamic).
SHAPES = [(3, 12_800), (2, 12_480), (4, 12_960)]


def make_step(compile: bool) -> tuple[StepContext, list[dict[str, torch.Tensor]]]:
    """The trainer's step, inductor-compiled or eager, and the gradients of every step. Layer drop on: a
    compiled layer whose output is left unused (SpidR reads a dropped layer's FFN output, not its output)
    returns zero gradients for its last LayerNorm where eager autograd leaves None (and AdamW would move a
    parameter with a zero gradient): the step must set them back to None."""
    ctx = test_compile.make_step(compile, "inductor", ("model.encoder_layer_drop=0.5",))
    grads: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in ctx.core.named_parameters()}
    ctx.optimizer.register_step_pre_hook(
        lambda *_: grads.append({names[id(p)]: p.grad.clone() for p in ctx.params if p.grad is not None})
    )
    return ctx, grads


def test_compiled_step_equals_eager_step() -> None:
    torch._dynamo.reset()
    (compiled, compiled_grads), (eager, eager_grads) = make_step(compile=True), make_step(compile=False)
    assert isinstance(compiled.core._targets, Callable) and "_targets" in vars(compiled.core)  # compiled in place
    dropped: set[int] = set()
    for step, (size, samples) in enumerate(SHAPES, start=1):
        waveforms = torch.randn(size, samples, generator=torch.Generator().manual_seed(step))
        mask = masks([samples] * size, samples, seed=step)
        with torch._dynamo.config.patch(error_on_recompile=step > 1):  # dynamic shapes: one graph per region
            got = train_step(compiled, waveforms, mask, step)
        want = train_step(eager, waveforms, mask, step)
        dropped.update(eager.core.student.dropped_layers)
        assert compiled.core.student.dropped_layers == eager.core.student.dropped_layers
        for key in ("loss", "grad_norm", "target_ppl", "pred_ppl"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"step {step} {key}")
        assert compiled_grads[-1].keys() == eager_grads[-1].keys()
        for name, grad in eager_grads[-1].items():
            torch.testing.assert_close(compiled_grads[-1][name], grad, rtol=1e-4, atol=1e-6, msg=f"{step} {name}")
    assert dropped - {len(eager.core.student.layers) - 1}, "no layer below the last was dropped: nothing tested"
    for name, buffer in eager.core.state_dict().items():  # codebooks and teacher moved alike
        torch.testing.assert_close(compiled.core.state_dict()[name], buffer, rtol=1e-4, atol=1e-6, msg=name)
