"""spidr_fast packaging.

One distribution, one import root: the top-level `kernels/` folder is installed as
`spidr_fast.kernels` (a top-level `kernels` package would clash with an unrelated PyPI package).
The C++ span masker (`csrc/`) is a plain pybind11 extension with no torch headers, so building it
never pulls torch into pip's build environment; SPIDR_FAST_SKIP_EXT=1 skips it (a NumPy fallback
is used then).
"""

import os
from glob import glob

from setuptools import find_packages, setup

ext_modules = []
if os.environ.get("SPIDR_FAST_SKIP_EXT") != "1" and glob("csrc/*.cpp"):
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules = [
        Pybind11Extension("spidr_fast._C", sorted(glob("csrc/*.cpp")), cxx_std=17, extra_compile_args=["-O3"])
    ]

setup(
    name="spidr_fast",
    version="0.1.0",
    description="Fast, drop-in reimplementation of SpidR and DinoSR (self-supervised speech units)",
    python_requires=">=3.10",
    # Every package under spidr_fast/ (found, never listed: a listed one goes missing from wheels), plus kernels/.
    packages=[
        *find_packages(include=["spidr_fast", "spidr_fast.*"]),
        "spidr_fast.kernels",
        *(f"spidr_fast.kernels.{name}" for name in find_packages("kernels")),
    ],
    package_dir={"spidr_fast": "spidr_fast", "spidr_fast.kernels": "kernels"},
    package_data={"spidr_fast": ["configs/*.toml"]},
    ext_modules=ext_modules,
    install_requires=["torch>=2.8", "numpy", "soundfile", "tqdm", "tomli; python_version < '3.11'"],
    extras_require={
        "abx": ["fastabx; python_version >= '3.12'"],  # spidr-fast abx
        # CUDA builds of torch bring triton; CPU development installs it explicitly (pinned: interpreter
        # behaviour changes between releases).
        "dev": ["triton==3.9.0", "pytest", "pytest-benchmark", "ruff", "pybind11>=2.12", "setuptools>=64"],
    },
    entry_points={"console_scripts": ["spidr-fast=spidr_fast.__main__:main"]},
)
