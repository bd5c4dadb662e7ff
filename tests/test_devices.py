"""One table of GPU peaks (spidr_fast/devices.py) serves the trainer's MFU, the benchmarks' %-of-peak
(bench/common.py) and the roofline predictor (bench/roofline.py, its short names kept as aliases)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spidr_fast import devices
from spidr_fast.train import flops

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import roofline  # noqa: E402

# What torch.cuda.get_device_name returns on each part -> the table's key.
NAMES = {
    "NVIDIA A100-SXM4-80GB": "A100 SXM",
    "NVIDIA A100-SXM4-40GB": "A100 40GB",
    "NVIDIA A100-PCIE-40GB": "A100 40GB",
    "NVIDIA A100 80GB PCIe": "A100 PCIe",
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA L40S": "L40S",
    "NVIDIA B200": "B200",
}


@pytest.mark.parametrize(("name", "key"), NAMES.items())
def test_device_names_resolve_to_their_part(name: str, key: str) -> None:
    assert devices.lookup(name).name == key


def test_unknown_devices_have_no_peaks() -> None:
    assert devices.lookup("NVIDIA GeForce RTX 4090") is None
    assert common.device_peaks("cpu x86_64") is None
    with pytest.raises(ValueError, match="RTX 4090"):
        roofline.device_peaks("NVIDIA GeForce RTX 4090")


@pytest.mark.parametrize("name", NAMES)
def test_every_reader_sees_the_same_peaks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = devices.lookup(name)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops(torch.device("cuda", 0)) == d.bf16
    assert common.device_peaks(name) == pytest.approx(
        {
            "bf16_tflops": d.bf16 / 1e12,
            "tf32_tflops": d.tf32 / 1e12,
            "fp32_tflops": d.fp32 / 1e12,
            "hbm_gbs": d.hbm / 1e9,
        }
    )
    assert roofline.device_peaks(name) == {"bf16": d.bf16, "fp32": d.fp32, "hbm": d.hbm}


def test_h100_pcie_is_not_an_sxm() -> None:
    pcie, sxm = devices.lookup("NVIDIA H100 PCIe"), devices.lookup("NVIDIA H100 80GB HBM3")
    assert (pcie.bf16, pcie.fp32, pcie.hbm) == (756e12, 51e12, 2000e9)
    assert (sxm.bf16, sxm.fp32, sxm.hbm) == (989e12, 67e12, 3350e9)


def test_roofline_short_names_are_aliases_of_the_sxm_parts() -> None:
    assert set(roofline.DEVICES) == set(devices.ALIASES) == {"A100", "H100", "H200"}
    for alias, key in devices.ALIASES.items():
        d = devices.DEVICES[key]
        assert roofline.DEVICES[alias] == {"bf16": d.bf16, "fp32": d.fp32, "hbm": d.hbm}
        assert devices.lookup(alias) is d
    assert roofline.mfu(989e12 * 0.5, 1000.0, "H100") == pytest.approx(0.5)


def test_peak_flops_override_and_cpu() -> None:
    assert flops.peak_flops(torch.device("cpu")) == 0.0
    assert flops.peak_flops(torch.device("cpu"), override=1e12) == 1e12
