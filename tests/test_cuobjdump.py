"""`cuobjdump --dump-resource-usage` is parsed in one place (bench/sm90.py `resource_usage`), which both the
offline sm_90 compiles (bench/sm90.py) and `make gpu-check`'s kernel census (bench/gpu_env.py) read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_env
import sm90

# Triton 3.x's bundled cuobjdump on a kernel compiled offline for sm_90.
USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function add_one:
  REG:8 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SPILLING = """
Resource usage:
 Common:
  GLOBAL:0
 Function _heads_ce_bwd_kernel:
  REG:255 STACK:96 SHARED:0 LOCAL:0 CONSTANT[0]:612 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_reads_the_function_line() -> None:
    fields = sm90.resource_usage(USAGE)
    assert fields == {"REG": 8, "STACK": 0, "SHARED": 0, "LOCAL": 0, "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}
    assert sm90.resource_usage(SPILLING)["STACK"] == 96
    assert sm90.resource_usage(USAGE + SPILLING)["REG"] == 255  # the last function's
    assert sm90.resource_usage("cuobjdump fatal   : Could not open input file") is None
    assert sm90.resource_usage("") is None


def test_gpu_env_reads_registers_through_the_one_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = {"--dump-resource-usage": SPILLING}
    calls = []

    def fake_cuobjdump(cubin: bytes, tools: dict, *flags: str, check: bool = True) -> list[str]:
        calls.append((cubin, flags))
        return [outputs[f] for f in flags]

    monkeypatch.setattr(sm90, "triton_tools", lambda: {"cuobjdump": "cuobjdump", "ptxas": "ptxas"})
    monkeypatch.setattr(sm90, "cuobjdump", fake_cuobjdump)
    assert gpu_env.cubin_resources(b"cubin") == (255, 96)
    assert calls == [(b"cubin", ("--dump-resource-usage",))]
    outputs["--dump-resource-usage"] = "no resource lines"
    assert gpu_env.cubin_resources(b"cubin") == (None, None)
    assert gpu_env.cubin_resources(None) == (None, None)
