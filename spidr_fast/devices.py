"""Datasheet peaks of the GPUs spidr_fast runs on: the one table the trainer's MFU, the benchmarks' %-of-peak
and `bench/roofline.py`'s predictions read.

Dense (no sparsity) peaks: bf16 and TF32 on tensor cores, fp32 on CUDA cores (no TF32), in FLOP/s; HBM
bandwidth in bytes/s. Datasheets quote tensor-core peaks "with sparsity": the dense figure is half of it.
Sources:
- A100: NVIDIA A100 Tensor Core GPU datasheet (2021): bf16 312 T, TF32 156 T, fp32 19.5 T; HBM2e 80 GB
  2,039 GB/s (SXM4), 1,935 GB/s (PCIe); 40 GB (SXM4 or PCIe) 1,555 GB/s.
- H100: NVIDIA H100 Tensor Core GPU datasheet (2023): SXM5 bf16 1,979 T sparse, TF32 989 T sparse, fp32
  67 T, 3.35 TB/s; PCIe bf16 1,513 T sparse, TF32 756 T sparse, fp32 51 T, 2 TB/s; NVL bf16 1,671 T sparse,
  TF32 835 T sparse, fp32 60 T, 3.9 TB/s.
- H200: NVIDIA H200 datasheet (2024): SXM as H100 SXM's compute, 4.8 TB/s HBM3e; NVL as H100 NVL's
  compute, 4.8 TB/s.
- GH200: NVIDIA GH200 Grace Hopper Superchip datasheet (2023): the Hopper GPU at H100 SXM's compute,
  96 GB HBM3 at 4 TB/s (the 144 GB HBM3e part: 4.9 TB/s).
- L40S: NVIDIA L40S datasheet (2023): bf16 362 T, TF32 183 T, fp32 91.6 T, 864 GB/s.
- B200: NVIDIA HGX B200 datasheet (2024), per GPU: bf16 2.25 P, TF32 1.1 P, fp32 75 T, 8 TB/s.

`lookup(name)` takes what `torch.cuda.get_device_name` returns ("NVIDIA H100 80GB HBM3", "NVIDIA H100
PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA GH200 480GB", ...), a key of `DEVICES`,
or a short alias (`ALIASES`: "A100", "H100", "H200" name the SXM parts). An unknown name gives None: the
trainer then reports no MFU (unless `run.flops_per_device` is set) and the benchmarks no %-of-peak.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    bf16: float  # dense bf16 tensor-core FLOP/s
    tf32: float  # dense TF32 tensor-core FLOP/s
    fp32: float  # fp32 CUDA-core FLOP/s (no TF32)
    hbm: float  # HBM bytes/s


T, G = 1e12, 1e9
DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("A100 SXM", 312 * T, 156 * T, 19.5 * T, 2039 * G),
        Device("A100 PCIe", 312 * T, 156 * T, 19.5 * T, 1935 * G),
        Device("A100 40GB", 312 * T, 156 * T, 19.5 * T, 1555 * G),
        Device("H100 SXM", 989 * T, 494 * T, 67 * T, 3350 * G),
        Device("H100 PCIe", 756 * T, 378 * T, 51 * T, 2000 * G),
        Device("H100 NVL", 835 * T, 418 * T, 60 * T, 3900 * G),
        Device("H200", 989 * T, 494 * T, 67 * T, 4800 * G),
        Device("H200 NVL", 835 * T, 418 * T, 60 * T, 4800 * G),
        Device("GH200", 989 * T, 494 * T, 67 * T, 4000 * G),
        Device("L40S", 362 * T, 183 * T, 91.6 * T, 864 * G),
        Device("B200", 2250 * T, 1100 * T, 75 * T, 8000 * G),
    )
}
ALIASES = {"A100": "A100 SXM", "H100": "H100 SXM", "H200": "H200"}

# (words that must all be in the upper-cased device name, key): the first match wins, so the more specific
# names come first ("GH200" before "H200", "H100 PCIe" before "H100").
_MATCH: tuple[tuple[tuple[str, ...], str], ...] = (
    (("A100", "40GB"), "A100 40GB"),
    (("A100", "PCIE"), "A100 PCIe"),
    (("A100",), "A100 SXM"),
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100", "NVL"), "H100 NVL"),
    (("H100",), "H100 SXM"),
    (("GH200",), "GH200"),
    (("H200", "NVL"), "H200 NVL"),
    (("H200",), "H200"),
    (("L40S",), "L40S"),
    (("B200",), "B200"),
)


def lookup(name: str) -> Device | None:
    """The peaks of a device (a `torch.cuda.get_device_name`, a `DEVICES` key or an alias); None if unknown."""
    key = ALIASES.get(name, name)
    if key in DEVICES:
        return DEVICES[key]
    upper = name.upper()
    return next((DEVICES[key] for words, key in _MATCH if all(w in upper for w in words)), None)
