"""One definition each of SpidR's framing, sample rate, compute dtypes and standardisation, and the
framing agrees with the model's conv stack."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from spidr_fast import framing
from spidr_fast.config import DinoSRConfig
from spidr_fast.models.feature_extractor import ConvFeatureExtractor

ROOT = Path(__file__).resolve().parent.parent
SINGLE = ("SAMPLE_RATE", "DTYPE_NAMES", "DTYPES", "standardize", "num_frames", "HOP", "RECEPTIVE_FIELD", "CONV_LAYERS")


def module_level_definitions(path: Path) -> set[str]:
    """Names a module defines at top level (def, class, assignment), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            names.add(node.target.id)
    return names


def test_each_is_defined_once_in_the_package_and_bench() -> None:
    files = sorted([*(ROOT / "spidr_fast").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
    where: dict[str, list[str]] = {name: [] for name in SINGLE}
    for path in files:
        for name in module_level_definitions(path) & set(SINGLE):
            where[name].append(str(path.relative_to(ROOT)))
    # DTYPES is built on first use by spidr_fast.config.__getattr__ (no torch import at module load).
    assert where.pop("DTYPES") == [], "DTYPES belongs to spidr_fast.config.__getattr__"
    assert {name: paths for name, paths in where.items() if len(paths) != 1} == {}


def test_framing_is_the_models_conv_rule() -> None:
    cfg = DinoSRConfig()
    conv = ConvFeatureExtractor(cfg.extractor_conv_layer_config, cfg.extractor_mode, bias=False)
    samples = torch.arange(0, 5000)
    assert torch.equal(torch.from_numpy(framing.num_frames(samples.numpy())), conv.output_lengths(samples))
    assert (framing.HOP, framing.RECEPTIVE_FIELD) == (320, 400)
    assert framing.num_frames(framing.RECEPTIVE_FIELD - 1) == 0 and framing.num_frames(framing.RECEPTIVE_FIELD) == 1
    assert framing.num_frames(framing.RECEPTIVE_FIELD + 7 * framing.HOP) == 8
